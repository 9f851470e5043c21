//! The fetchers' counters (shared memory every fetcher generation writes) as metrics,
//! read at each scrape; and the registry client's observer that counts into them, so a
//! fetcher child's registry requests and the daemon's own land in one place.

use std::sync::Arc;
use std::time::Duration;

use lazy_erofs_image::registry::observe::{Observer, Outcome};
use lazy_erofs_ondemand::stats::{Counter, Histogram, Stats};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;

/// Counts registry attempts into the shared counters.
#[derive(Debug, Clone)]
pub struct StatsObserver(pub Arc<Stats>);

impl Observer for StatsObserver {
    fn attempt(&self, outcome: Outcome, elapsed: Duration) {
        let counter = match outcome {
            Outcome::Ok => Counter::RegistryOk,
            Outcome::ClientError => Counter::RegistryClientError,
            Outcome::ServerError => Counter::RegistryServerError,
            Outcome::Transport => Counter::RegistryTransportError,
        };
        self.0.add(counter, 1);
        self.0.record(Histogram::Registry, elapsed);
    }
}

#[derive(Debug)]
pub(super) struct FetcherCollector(pub Arc<Stats>);

type Labelled<'a> = &'a [(&'a str, Counter)];

impl FetcherCollector {
    fn counter(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        label: &str,
        values: Labelled<'_>,
    ) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        if label.is_empty() {
            if let Some((_, counter)) = values.first() {
                ConstCounter::new(self.0.get(*counter)).encode(family)?;
            }
            return Ok(());
        }
        for (value, counter) in values {
            let labels = [(label, *value)];
            ConstCounter::new(self.0.get(*counter)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn histogram(
        &self,
        encoder: &mut DescriptorEncoder<'_>,
        name: &str,
        help: &str,
        histogram: Histogram,
    ) -> Result<(), std::fmt::Error> {
        let cumulative = self.0.cumulative(histogram);
        let count = cumulative.last().map_or(0, |(_, n)| *n);
        // prometheus-client sums the buckets itself: hand it each bucket's own count. The
        // shared counters keep no sum; the bucket bounds give an upper estimate (the
        // overflow bucket counted at the last finite bound).
        let mut buckets = Vec::with_capacity(cumulative.len());
        let (mut previous, mut sum, mut last_bound) = (0, 0.0, 0.0);
        for (bound, seen) in cumulative {
            if bound < f64::MAX {
                last_bound = bound;
            }
            sum += (seen - previous) as f64 * last_bound;
            buckets.push((bound, seen - previous));
            previous = seen;
        }
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
        family.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }
}

impl Collector for FetcherCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        self.counter(
            e,
            "kernel_reads",
            "Kernel READ requests the fetchers answered, by result",
            "result",
            &[
                ("served", Counter::ReadsServed),
                ("failed", Counter::ReadsFailed),
            ],
        )?;
        self.counter(
            e,
            "fetched_bytes",
            "Bytes fetched from registries by the fetchers",
            "",
            &[("", Counter::BytesFetched)],
        )?;
        self.counter(
            e,
            "served_bytes",
            "Bytes the fetchers wrote for the kernel",
            "",
            &[("", Counter::BytesWritten)],
        )?;
        self.counter(
            e,
            "readahead_fetches",
            "Units fetched ahead of a reader walking forward, before any READ asked for them",
            "",
            &[("", Counter::ReadAheadFetches)],
        )?;
        self.counter(
            e,
            "readahead_skipped",
            "Readaheads not started because the bytes in flight ahead of readers were at their bound",
            "",
            &[("", Counter::ReadAheadSkipped)],
        )?;
        self.counter(
            e,
            "startup_fetches",
            "Units of an image's start-up files fetched as their layer was opened, before any READ",
            "",
            &[("", Counter::StartupFetches)],
        )?;
        self.counter(
            e,
            "fetch_retries",
            "Chunk fetches retried",
            "",
            &[("", Counter::FetchRetries)],
        )?;
        self.counter(
            e,
            "verification_failures",
            "Fetched chunks refused because their digest did not match",
            "",
            &[("", Counter::VerifyFailures)],
        )?;
        self.counter(
            e,
            "registry_requests",
            "Registry HTTP attempts (range reads, manifests) by outcome",
            "outcome",
            &[
                ("ok", Counter::RegistryOk),
                ("client_error", Counter::RegistryClientError),
                ("server_error", Counter::RegistryServerError),
                ("transport_error", Counter::RegistryTransportError),
            ],
        )?;
        self.counter(
            e,
            "fetcher_restarts",
            "Fetcher children replaced after they died",
            "",
            &[("", Counter::Restarts)],
        )?;
        self.histogram(
            e,
            "kernel_read_seconds",
            "Kernel READ latency, received to completed",
            Histogram::Read,
        )?;
        self.histogram(
            e,
            "registry_request_seconds",
            "Registry HTTP attempt latency",
            Histogram::Registry,
        )?;
        self.histogram(
            e,
            "failover_gap_seconds",
            "Dead fetcher reaped to first READ completed by its replacement",
            Histogram::Failover,
        )
    }
}
