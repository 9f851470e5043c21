//! The lazy layer cache of this snapshotter: stock and garbage collection (see
//! `crate::cache`), run on the blocking pool.

use crate::api::SnapshotError;
use crate::cache::{CacheLimits, GcReport, Inventory};
use crate::metrics::Metrics;

use super::OverlaySnapshotter;

impl OverlaySnapshotter {
    /// What the lazy layer cache holds; `None` without lazy layers.
    pub fn cache_inventory(&self) -> Result<Option<Inventory>, SnapshotError> {
        let Some(lazy) = &self.inner.lazy else {
            return Ok(None);
        };
        crate::cache::inventory::take(&self.inner.store, lazy.mounts()).map(Some)
    }

    /// One collection pass (blocking: call on a blocking thread).
    pub fn collect_cache(
        &self,
        limits: &CacheLimits,
        dry_run: bool,
        metrics: Option<&Metrics>,
    ) -> Result<GcReport, SnapshotError> {
        let Some(lazy) = &self.inner.lazy else {
            return Err(SnapshotError::FailedPrecondition(
                "lazy layers are off: there is no layer cache".into(),
            ));
        };
        crate::cache::collect(&self.inner.store, lazy.mounts(), limits, dry_run, metrics)
    }

    /// The cache directory lazy layers live in.
    pub fn cache_dir(&self) -> Option<std::path::PathBuf> {
        let lazy = self.inner.lazy.as_ref()?;
        Some(match lazy.mounts().backend() {
            crate::lazy::Backend::Fscache { cache_dir, .. } => cache_dir.clone(),
            _ => lazy.mounts().blob_dir().to_owned(),
        })
    }
}
