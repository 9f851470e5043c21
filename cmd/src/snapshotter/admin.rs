//! The daemon's answers to `lazy-erofs status` and `lazy-erofs gc` (the Admin service on
//! its socket), and the periodic cache collection.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use lazy_erofs_ondemand::Event;
use lazy_erofs_ondemand::stats::{Counter, Stats};
use lazy_erofs_snapshotter::admin::{
    BackendStatus, CacheStatus, Control, EntryStatus, FetcherStatus, LayerStatus, StatusReport,
};
use lazy_erofs_snapshotter::api::SnapshotError;
use lazy_erofs_snapshotter::cache::{CacheLimits, GcReport, Inventory, State};
use lazy_erofs_snapshotter::metrics::Metrics;
use lazy_erofs_snapshotter::overlay::OverlaySnapshotter;

/// The current fetcher child, followed from the supervisor's events.
#[derive(Debug, Clone, Default)]
pub struct FetcherInfo {
    pub pid: Option<u32>,
    pub generation: u64,
}

impl FetcherInfo {
    pub fn follow(&mut self, event: &Event) {
        match event {
            Event::Started {
                pid, generation, ..
            } => {
                self.pid = Some(*pid);
                self.generation = *generation;
            }
            Event::Exited { .. } => self.pid = None,
            Event::StartFailed { generation, .. } => {
                self.pid = None;
                self.generation = *generation;
            }
        }
    }
}

pub struct DaemonControl {
    pub snapshotter: Arc<OverlaySnapshotter>,
    /// `None` without a supervised fetcher (whole layers).
    pub fetcher: Option<Arc<Mutex<FetcherInfo>>>,
    pub stats: Arc<Stats>,
    pub limits: CacheLimits,
    pub metrics: Option<Arc<Metrics>>,
    pub metrics_address: Option<std::net::SocketAddr>,
    pub backend: &'static str,
    pub kept_by_systemd: bool,
    pub root: PathBuf,
}

fn blocking_failed(e: tokio::task::JoinError) -> SnapshotError {
    SnapshotError::Unavailable(format!("blocking task: {e}"))
}

impl DaemonControl {
    fn report(&self, inventory: Option<Inventory>) -> StatusReport {
        let fetcher = self.fetcher.as_ref().map(|info| {
            let info = info
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            FetcherStatus {
                pid: info.pid,
                generation: info.generation,
                restarts: self.stats.get(Counter::Restarts),
                reads_served: self.stats.get(Counter::ReadsServed),
                reads_failed: self.stats.get(Counter::ReadsFailed),
                bytes_fetched: self.stats.get(Counter::BytesFetched),
            }
        });
        let mut layers = Vec::new();
        let mut cache = CacheStatus {
            dir: self
                .snapshotter
                .cache_dir()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            bytes: 0,
            limits: self.limits.clone(),
            filesystem_free_percent: 0.0,
            layers_mounted: 0,
            layers_referenced: 0,
            layers_unreferenced: 0,
            entries: Vec::new(),
        };
        if let Some(inventory) = inventory {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            cache.bytes = inventory.bytes();
            if inventory.space.total > 0 {
                cache.filesystem_free_percent =
                    inventory.space.free as f64 * 100.0 / inventory.space.total as f64;
            }
            for entry in &inventory.entries {
                match entry.state {
                    State::Mounted => cache.layers_mounted += 1,
                    State::Referenced => cache.layers_referenced += 1,
                    State::Unreferenced => cache.layers_unreferenced += 1,
                }
                cache.entries.push(EntryStatus {
                    key: entry.key.clone(),
                    state: entry.state,
                    bytes: entry.bytes,
                    idle_secs: now.saturating_sub(entry.last_used),
                });
                for layer in &entry.layers {
                    let fetched = if layer.size == 0 {
                        100.0
                    } else {
                        (entry.bytes as f64 * 100.0 / layer.size as f64).min(100.0)
                    };
                    layers.push(LayerStatus {
                        digest: layer.digest.clone(),
                        image: layer.image.clone(),
                        fsid: layer.fsid.clone(),
                        cache_key: entry.key.clone(),
                        state: entry.state,
                        bytes: entry.bytes,
                        size: layer.size,
                        fetched_percent: (fetched * 10.0).round() / 10.0,
                        mount: self
                            .snapshotter
                            .layer_mount(&layer.fsid)
                            .map(|p| p.display().to_string()),
                    });
                }
            }
        }
        StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            root: self.root.display().to_string(),
            metrics_address: self.metrics_address.map(|a| a.to_string()),
            backend: BackendStatus {
                name: self.backend.into(),
                kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .map(|r| r.trim().to_owned())
                    .unwrap_or_default(),
                kept_by_systemd: self.kept_by_systemd,
            },
            fetcher,
            cache,
            layers,
            recent_errors: crate::recent_errors::recent(),
        }
    }
}

#[tonic::async_trait]
impl Control for DaemonControl {
    async fn status(&self) -> Result<StatusReport, SnapshotError> {
        let snapshotter = self.snapshotter.clone();
        let inventory = tokio::task::spawn_blocking(move || snapshotter.cache_inventory())
            .await
            .map_err(blocking_failed)??;
        Ok(self.report(inventory))
    }

    async fn gc(&self, dry_run: bool, max_bytes: Option<u64>) -> Result<GcReport, SnapshotError> {
        let mut limits = self.limits.clone();
        if let Some(max_bytes) = max_bytes {
            limits.max_bytes = max_bytes;
        }
        collect(&self.snapshotter, &limits, dry_run, self.metrics.clone()).await
    }
}

async fn collect(
    snapshotter: &Arc<OverlaySnapshotter>,
    limits: &CacheLimits,
    dry_run: bool,
    metrics: Option<Arc<Metrics>>,
) -> Result<GcReport, SnapshotError> {
    let (snapshotter, limits) = (snapshotter.clone(), limits.clone());
    tokio::task::spawn_blocking(move || {
        snapshotter.collect_cache(&limits, dry_run, metrics.as_deref())
    })
    .await
    .map_err(blocking_failed)?
}

/// Collects every `limits.gc_interval` (not at all when it is zero).
pub fn spawn_collector(
    snapshotter: Arc<OverlaySnapshotter>,
    limits: CacheLimits,
    metrics: Option<Arc<Metrics>>,
) {
    if limits.gc_interval.is_zero() || snapshotter.cache_dir().is_none() {
        return;
    }
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(limits.gc_interval);
        tick.tick().await; // the first tick is immediate: let the start settle first
        loop {
            tick.tick().await;
            match collect(&snapshotter, &limits, false, metrics.clone()).await {
                Ok(report) if !report.evicted.is_empty() => tracing::info!(
                    layers = report.evicted.len(),
                    freed = report.bytes_before - report.bytes_after,
                    "cache collected"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cache collection failed"),
            }
        }
    });
}
