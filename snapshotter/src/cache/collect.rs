//! One garbage collection pass: stock taken, the plan made, each chosen layer's cache
//! removed unless the kernel says a mount still uses it (then it is skipped, and the
//! report says so).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::inventory::{self, Entry, State};
use super::plan::{self, Candidate, Reason};
use super::{CacheLimits, now_secs};
use crate::api::SnapshotError;
use crate::lazy::{Backend, LayerMounts};
use crate::metrics::Metrics;
use crate::store::Store;

/// A layer whose cache went (or would go, in a dry run).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evicted {
    pub key: String,
    pub bytes: u64,
    pub reason: Reason,
    /// Seconds since its last use.
    pub idle_secs: u64,
}

/// A layer chosen but kept: a mount still reads it, or removing it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub key: String,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub limits: CacheLimits,
    pub layers_before: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub evicted: Vec<Evicted>,
    pub skipped: Vec<Skipped>,
}

/// Runs one pass (see the module documentation). Call on a blocking thread.
pub fn collect(
    store: &Store,
    mounts: &LayerMounts,
    limits: &CacheLimits,
    dry_run: bool,
    metrics: Option<&Metrics>,
) -> Result<GcReport, SnapshotError> {
    // No layer is mounted while the pass removes caches (and none removed while one is).
    let _exclusive = (!dry_run).then(|| mounts.exclusive());
    let stock = inventory::take(store, mounts)?;
    let now = now_secs();
    let in_use: Vec<(String, u64)> = stock
        .entries
        .iter()
        .filter(|e| e.state != State::Unreferenced)
        .map(|e| (e.key.clone(), now))
        .collect();
    let candidates: Vec<Candidate> = stock
        .entries
        .iter()
        .map(|e| Candidate {
            bytes: e.bytes,
            last_used: e.last_used,
            in_use: e.state != State::Unreferenced,
        })
        .collect();
    let chosen = plan::plan(&candidates, limits, now, stock.space);
    let mut report = GcReport {
        dry_run,
        limits: limits.clone(),
        layers_before: stock.entries.len(),
        bytes_before: stock.bytes(),
        bytes_after: stock.bytes(),
        evicted: Vec::new(),
        skipped: Vec::new(),
    };
    let mut gone = Vec::new();
    for (i, reason) in chosen {
        let entry = &stock.entries[i];
        let freed = if dry_run {
            Ok(entry.bytes)
        } else {
            evict(mounts, entry)
        };
        match freed {
            Ok(freed) => {
                tracing::info!(key = %entry.key, bytes = freed, reason = reason.as_str(), dry_run, "layer cache evicted");
                if let Some(metrics) = metrics.filter(|_| !dry_run) {
                    metrics.evicted(reason.as_str(), freed);
                }
                report.bytes_after = report.bytes_after.saturating_sub(entry.bytes);
                report.evicted.push(Evicted {
                    key: entry.key.clone(),
                    bytes: freed,
                    reason,
                    idle_secs: now.saturating_sub(entry.last_used),
                });
                gone.push(entry.key.clone());
            }
            Err(why) => {
                tracing::info!(key = %entry.key, %why, "layer cache kept");
                report.skipped.push(Skipped {
                    key: entry.key.clone(),
                    why,
                });
            }
        }
    }
    if !dry_run {
        store.record_layer_uses(&in_use, &gone)?;
    }
    Ok(report)
}

/// Removes one unreferenced layer's cache; `Err` says why it stays.
fn evict(mounts: &LayerMounts, entry: &Entry) -> Result<u64, String> {
    match mounts.backend() {
        Backend::Fscache {
            device, cache_dir, ..
        } => {
            let mut freed = 0;
            let mut busy = 0;
            for volume in &entry.paths {
                let culled = lazy_erofs_ondemand::cachefiles::cull::cull_volume(device, volume)
                    .map_err(|e| e.to_string())?;
                freed += culled.bytes;
                busy += culled.busy;
            }
            lazy_erofs_ondemand::cachefiles::cull::reap_graveyard(cache_dir);
            if busy > 0 {
                return Err(format!("the kernel still uses {busy} of its objects"));
            }
            Ok(freed)
        }
        Backend::Fanotify { broker, .. } => evict_files(entry, |data| {
            broker
                .forget_layer(data)
                .map(drop)
                .map_err(|e| e.to_string())
        }),
        Backend::FileBacked => evict_files(entry, |_| Ok(())),
    }
}

/// Files of a layer no mount holds open (the metadata image is every mount's backing
/// file; a whole layer's data file its device): the broker forgets the data file first.
fn evict_files(entry: &Entry, forget: impl Fn(&Path) -> Result<(), String>) -> Result<u64, String> {
    use lazy_erofs_ondemand::fanotify::layer;
    for path in &entry.paths {
        let kind = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        // Without its metadata image a layer cannot be mounted.
        if kind == "meta" && layer::in_use(path).map_err(|e| format!("{}: {e}", path.display()))? {
            return Err(format!("{} is open (a mount reads it)", path.display()));
        }
    }
    let mut freed = 0;
    for path in &entry.paths {
        if path.extension().is_some_and(|e| e == "data") {
            forget(path)?;
        }
    }
    for path in &entry.paths {
        freed += layer::discard(path).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(freed)
}
