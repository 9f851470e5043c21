//! The daemon's Prometheus metrics (text exposition, served by [`http`]): gRPC calls by
//! method and code with latency, cache evictions, and at each scrape the fetchers'
//! shared counters ([`fetcher`]: READs, bytes, registry requests, restarts, failover
//! gaps) and the cache by layer state.

mod fetcher;
pub mod http;

use std::sync::Arc;
use std::time::Duration;

use lazy_erofs_ondemand::stats::Stats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use fetcher::StatsObserver;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// Layers and bytes of the cache in one state (`mounted`, `referenced`, `unreferenced`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheState {
    pub state: &'static str,
    pub layers: u64,
    pub bytes: u64,
}

/// Where the cache figures come from at scrape time (the last cache inventory).
pub type CacheFigures = Arc<dyn Fn() -> Vec<CacheState> + Send + Sync>;

fn call_histogram() -> Histogram {
    // 100 µs .. ~1.6 min.
    Histogram::new(exponential_buckets(1e-4, 2.0, 20))
}

pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<MethodLabels, Histogram, fn() -> Histogram>,
    evictions: Family<ReasonLabels, Counter>,
    evicted_bytes: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// `stats`: the fetchers' shared counters (none without a lazy backend).
    pub fn new(stats: Option<Arc<Stats>>, cache: CacheFigures) -> Self {
        let mut registry = Registry::with_prefix("lazyerofs");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "grpc_calls",
            "Snapshots gRPC calls by method and status code",
            calls.clone(),
        );
        let call_seconds =
            Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                call_histogram,
            );
        registry.register(
            "grpc_call_seconds",
            "Snapshots gRPC call latency by method",
            call_seconds.clone(),
        );
        let evictions = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "cache_evictions",
            "Layers whose cache the garbage collector removed, by reason",
            evictions.clone(),
        );
        let evicted_bytes = Counter::default();
        registry.register(
            "cache_evicted_bytes",
            "Bytes of layer cache the garbage collector freed",
            evicted_bytes.clone(),
        );
        if let Some(stats) = stats {
            registry.register_collector(Box::new(fetcher::FetcherCollector(stats)));
        }
        registry.register_collector(Box::new(CacheCollector(cache)));
        Self {
            registry,
            calls,
            call_seconds,
            evictions,
            evicted_bytes,
        }
    }

    pub fn grpc_call(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.calls
            .get_or_create(&CallLabels {
                method: method.to_owned(),
                code: format!("{code:?}"),
            })
            .inc();
        self.call_seconds
            .get_or_create(&MethodLabels {
                method: method.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn evicted(&self, reason: &str, bytes: u64) {
        self.evictions
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
        self.evicted_bytes.inc_by(bytes);
    }

    /// The exposition text (OpenMetrics text, which Prometheus reads).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        text
    }
}

struct CacheCollector(CacheFigures);

impl std::fmt::Debug for CacheCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheCollector")
    }
}

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let states = (self.0)();
        for (name, help, value) in [
            (
                "cache_layers",
                "Layers in the cache by state",
                (|s: &CacheState| s.layers) as fn(&CacheState) -> u64,
            ),
            (
                "cache_bytes",
                "Bytes on disk of the layer cache by state",
                |s: &CacheState| s.bytes,
            ),
        ] {
            let kind = ConstGauge::new(0i64).metric_type();
            let mut family = encoder.encode_descriptor(name, help, None, kind)?;
            for state in &states {
                let labels = [("state", state.state)];
                let metric = family.encode_family(&labels)?;
                ConstGauge::new(i64::try_from(value(state)).unwrap_or(i64::MAX)).encode(metric)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use lazy_erofs_ondemand::stats::{Counter as C, Histogram as H};
    use prometheus_parse::{Scrape, Value};

    use super::*;

    fn scrape(metrics: &Metrics) -> Scrape {
        let text = metrics.encode();
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses")
    }

    fn value(scrape: &Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .unwrap_or_else(|| panic!("no {name} {label:?} in {:#?}", scrape.samples));
        match &sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn a_prometheus_parser_reads_every_series_and_they_follow_the_counters() {
        let stats = Arc::new(Stats::create().unwrap());
        let cache: CacheFigures = Arc::new(|| {
            vec![CacheState {
                state: "mounted",
                layers: 2,
                bytes: 4096,
            }]
        });
        let metrics = Metrics::new(Some(stats.clone()), cache);
        let before = scrape(&metrics);
        assert_eq!(value(&before, "lazyerofs_fetched_bytes_total", None), 0.0);
        stats.add(C::BytesFetched, 1 << 20);
        stats.add(C::Restarts, 2);
        stats.add(C::RegistryServerError, 1);
        stats.record(H::Read, Duration::from_millis(3));
        metrics.grpc_call("Prepare", tonic::Code::Ok, Duration::from_millis(1));
        metrics.evicted("unreferenced", 8192);
        let after = scrape(&metrics);
        let v = |name, label| value(&after, name, label);
        assert_eq!(v("lazyerofs_fetched_bytes_total", None), 1048576.0);
        assert_eq!(v("lazyerofs_fetcher_restarts_total", None), 2.0);
        assert_eq!(
            v(
                "lazyerofs_registry_requests_total",
                Some(("outcome", "server_error"))
            ),
            1.0
        );
        assert_eq!(v("lazyerofs_kernel_read_seconds", None), 1.0);
        assert_eq!(
            v("lazyerofs_grpc_calls_total", Some(("method", "Prepare"))),
            1.0
        );
        assert_eq!(
            v(
                "lazyerofs_cache_evictions_total",
                Some(("reason", "unreferenced"))
            ),
            1.0
        );
        assert_eq!(v("lazyerofs_cache_evicted_bytes_total", None), 8192.0);
        assert_eq!(
            v("lazyerofs_cache_bytes", Some(("state", "mounted"))),
            4096.0
        );
    }
}
