//! Fetcher counters shared between the supervisor and its children: a memfd of atomic
//! u64s that every fetcher generation maps, so nothing is lost when one is SIGKILLed.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use crate::sys::SharedCounters;

/// Named counters; their index is their slot in the shared file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Opens,
    OpensRefused,
    Closes,
    ReadsServed,
    ReadsFailed,
    FetchRetries,
    BytesFetched,
    BytesWritten,
    Restores,
    FaultsFired,
    /// CLOCK_MONOTONIC ns of the first READ completed by the current child; the
    /// supervisor clears it before each spawn to measure failover gaps.
    FirstReadDoneNs,
    /// CLOCK_MONOTONIC ns at which the supervisor reaped the previous child (0 for the
    /// first): the current child's first completed READ records the gap from it.
    PredecessorDiedNs,
    /// Bytes the chunk checks refused (a registry or mirror sent bytes not the layer's).
    VerifyFailures,
    /// Registry HTTP attempts by outcome (range reads, manifests, tokens excluded).
    RegistryOk,
    RegistryClientError,
    RegistryServerError,
    RegistryTransportError,
    /// Fetcher children replaced after they died.
    Restarts,
    /// Units fetched ahead of a forward-walking reader (no READ asked for them yet).
    ReadAheadFetches,
    /// Units of an image's start-up region fetched as its object was opened.
    StartupFetches,
    /// Readaheads not started: the bytes in flight ahead of READs were at their bound.
    ReadAheadSkipped,
}

const NAMED: usize = Counter::ReadAheadSkipped as usize + 1;

/// Latency histograms; bucket i holds latencies below 2^(i/4) µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Histogram {
    /// Kernel READ received → completed.
    Read,
    /// One registry HTTP attempt.
    Registry,
    /// Fetcher failover: previous child reaped → first READ completed by the next.
    Failover,
}

const BUCKETS: usize = 4 * 36;
const HISTOGRAMS: usize = Histogram::Failover as usize + 1;
const SLOTS: usize = NAMED + HISTOGRAMS * BUCKETS;

pub struct Stats {
    shared: SharedCounters,
}

impl std::fmt::Debug for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stats").finish_non_exhaustive()
    }
}

impl Stats {
    pub fn create() -> std::io::Result<Self> {
        Ok(Self {
            shared: SharedCounters::create("lazy-erofs-fetcher-stats", SLOTS)?,
        })
    }

    pub fn from_fd(fd: OwnedFd) -> std::io::Result<Self> {
        Ok(Self {
            shared: SharedCounters::map(fd, SLOTS)?,
        })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.shared.fd()
    }

    fn slot(&self, i: usize) -> &AtomicU64 {
        &self.shared.counters()[i]
    }

    pub fn add(&self, counter: Counter, n: u64) {
        self.slot(counter as usize).fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, counter: Counter) -> u64 {
        self.slot(counter as usize).load(Ordering::Relaxed)
    }

    pub fn set(&self, counter: Counter, value: u64) {
        self.slot(counter as usize).store(value, Ordering::SeqCst);
    }

    /// Sets `counter` to `value` only if it is still zero; true if this call set it.
    pub fn set_if_zero(&self, counter: Counter, value: u64) -> bool {
        self.slot(counter as usize)
            .compare_exchange(0, value, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Atomically claims a one-shot event (e.g. an injected fault) across generations.
    pub fn claim_once(&self, counter: Counter) -> bool {
        self.set_if_zero(counter, 1)
    }

    pub fn record_read_latency(&self, latency: Duration) {
        self.record(Histogram::Read, latency);
    }

    pub fn record(&self, histogram: Histogram, latency: Duration) {
        let micros = latency.as_micros().max(1) as f64;
        let bucket = ((micros.log2() * 4.0).ceil() as usize).min(BUCKETS - 1);
        self.slot(NAMED + histogram as usize * BUCKETS + bucket)
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Marks the current child's first completed READ; the first one after a failover
    /// records the gap since its predecessor died.
    pub fn first_read_done(&self) {
        let now = monotonic_ns();
        if self.set_if_zero(Counter::FirstReadDoneNs, now) {
            let died = self.get(Counter::PredecessorDiedNs);
            if died != 0 && now > died {
                self.record(Histogram::Failover, Duration::from_nanos(now - died));
            }
        }
    }

    fn counts(&self, histogram: Histogram) -> Vec<u64> {
        (0..BUCKETS)
            .map(|b| {
                self.slot(NAMED + histogram as usize * BUCKETS + b)
                    .load(Ordering::Relaxed)
            })
            .collect()
    }

    /// Cumulative counts at power-of-two bounds (seconds), for an exposition format:
    /// `(upper bound, observations at or below it)`, the last bound covering all.
    pub fn cumulative(&self, histogram: Histogram) -> Vec<(f64, u64)> {
        let counts = self.counts(histogram);
        let mut seen = 0;
        let mut out = Vec::new();
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            // Every fourth bucket bounds a power of two µs: 16 µs .. ~18 min.
            if bucket % 4 == 0 && (16..=120).contains(&bucket) {
                out.push((2f64.powf(bucket as f64 / 4.0) / 1e6, seen));
            }
        }
        // The exposition's `+Inf` (prometheus-client writes f64::MAX so).
        out.push((f64::MAX, seen));
        out
    }

    /// The latency below which `quantile` of recorded READs completed (bucket upper bound,
    /// so within 19 % above the true value).
    pub fn read_latency_quantile(&self, quantile: f64) -> Option<Duration> {
        self.quantile(Histogram::Read, quantile)
    }

    pub fn quantile(&self, histogram: Histogram, quantile: f64) -> Option<Duration> {
        let counts = self.counts(histogram);
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let target = ((total as f64) * quantile).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= target {
                return Some(Duration::from_micros(
                    2f64.powf(bucket as f64 / 4.0).round() as u64,
                ));
            }
        }
        None
    }

    pub fn summary(&self) -> StatsSummary {
        let ms = |q| {
            self.read_latency_quantile(q)
                .map(|d| d.as_secs_f64() * 1000.0)
        };
        StatsSummary {
            opens: self.get(Counter::Opens),
            opens_refused: self.get(Counter::OpensRefused),
            closes: self.get(Counter::Closes),
            reads_served: self.get(Counter::ReadsServed),
            reads_failed: self.get(Counter::ReadsFailed),
            fetch_retries: self.get(Counter::FetchRetries),
            bytes_fetched: self.get(Counter::BytesFetched),
            bytes_written: self.get(Counter::BytesWritten),
            restores: self.get(Counter::Restores),
            read_p50_ms: ms(0.5),
            read_p99_ms: ms(0.99),
        }
    }
}

/// What the fetchers did, summed over all generations.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StatsSummary {
    pub opens: u64,
    pub opens_refused: u64,
    pub closes: u64,
    pub reads_served: u64,
    pub reads_failed: u64,
    pub fetch_retries: u64,
    pub bytes_fetched: u64,
    pub bytes_written: u64,
    pub restores: u64,
    pub read_p50_ms: Option<f64>,
    pub read_p99_ms: Option<f64>,
}

/// CLOCK_MONOTONIC now, in ns: comparable across processes on this host.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            (t.tv_sec() as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(t.tv_nsec() as u64)
        })
        .unwrap_or(0)
}

/// p-quantile of a sample, by nearest rank.
pub fn quantile(samples: &[Duration], q: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let rank = ((sorted.len() as f64) * q).ceil().max(1.0) as usize;
    sorted.get(rank.min(sorted.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_come_from_the_histogram() {
        let stats = Stats::create().expect("memfd");
        for _ in 0..98 {
            stats.record_read_latency(Duration::from_millis(2));
        }
        stats.record_read_latency(Duration::from_millis(100));
        stats.record_read_latency(Duration::from_millis(100));
        let p50 = stats.read_latency_quantile(0.5).expect("p50");
        let p99 = stats.read_latency_quantile(0.99).expect("p99");
        assert!(
            p50 >= Duration::from_millis(2) && p50 < Duration::from_micros(2400),
            "{p50:?}"
        );
        assert!(
            p99 >= Duration::from_millis(100) && p99 < Duration::from_millis(120),
            "{p99:?}"
        );
    }

    #[test]
    fn counters_and_one_shot_claims() {
        let stats = Stats::create().expect("memfd");
        stats.add(Counter::ReadsServed, 3);
        assert_eq!(stats.summary().reads_served, 3);
        assert!(stats.claim_once(Counter::FaultsFired));
        assert!(!stats.claim_once(Counter::FaultsFired));
    }

    #[test]
    fn nearest_rank_quantile() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&samples, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&samples, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
