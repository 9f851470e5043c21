//! The start-up region of an object (the files its image reads as it starts, laid out
//! first by `convert --prefetch`): fetched as the object opens, before any READ asks,
//! behind the foreground.
//!
//! Why behind: on a slow link every response queues behind the bytes already in flight
//! (4 runs of 4 MiB hold a 100 Mbit/s link for 1.3 s). While an image is pulled its
//! layers are mounted, and each mount waits on READs of its metadata view; start-up runs
//! started beside them made the pull wait for them. So a run starts only while no READ
//! of an object without a start-up region (metadata views, layers recorded without one)
//! is in flight. A READ that needs a unit of a queued run starts that run at once.

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;

use super::{ChunkFetch, Fetcher, Object, RUN_BYTES};
use crate::kernel::{CacheObject, Kernel};
use crate::stats::Counter;

/// Start-up runs in flight at once per object.
const STARTUP_FETCHES: usize = 4;

/// Foreground READs in flight: those the start-up runs give way to.
#[derive(Debug)]
pub(super) struct Foreground {
    busy: watch::Sender<usize>,
}

/// One foreground READ, from its arrival until it is completed.
pub(super) struct ForegroundRead<'a>(&'a Foreground);

impl Drop for ForegroundRead<'_> {
    fn drop(&mut self) {
        self.0.busy.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Foreground {
    pub(super) fn new() -> Self {
        Self {
            busy: watch::Sender::new(0),
        }
    }

    /// Counts a READ as in flight until the returned guard is dropped.
    pub(super) fn enter(&self) -> ForegroundRead<'_> {
        self.busy.send_modify(|n| *n += 1);
        ForegroundRead(self)
    }

    /// Resolves once no foreground READ is in flight.
    pub(super) async fn idle(&self) {
        let mut busy = self.busy.subscribe();
        // The sender lives as long as `self`: the wait cannot fail.
        let _ = busy.wait_for(|n| *n == 0).await;
    }
}

impl<K: Kernel> Fetcher<K> {
    /// Whether a READ of `object` holds back start-up runs.
    pub(super) fn is_foreground(object: &Object<K::Object>) -> bool {
        object.source.startup_len() == 0
    }

    /// The fetch of the object's start-up region, to spawn once the object is open:
    /// runs of up to [`RUN_BYTES`] bytes, one range request each, [`STARTUP_FETCHES`]
    /// at a time, each started once no foreground READ is in flight. A READ of a unit
    /// joins its run's fetch, or starts it at once if it is still queued. Units a
    /// previous fetcher wrote are skipped. `None` when there is nothing to fetch.
    pub(super) fn fetch_startup(
        &self,
        object_id: u32,
        object: &Arc<Object<K::Object>>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let size = object.source.size();
        let units = object.source.startup_len().min(size).div_ceil(object.unit);
        let per_run = (RUN_BYTES / object.unit).max(1);
        let held = |index: u64| {
            let start = index * object.unit;
            object.anon.holds(start, object.unit.min(size - start))
        };
        let (mut fetches, mut fetched, mut index) = (Vec::new(), 0, 0);
        while index < units {
            if held(index) {
                index += 1;
                continue;
            }
            let mut len = 1;
            while len < per_run && index + len < units && !held(index + len) {
                len += 1;
            }
            let run = self.run(object_id, object, index, len, None);
            fetched += run.started();
            index += run.covered;
            fetches.push(run.fetch);
        }
        if fetches.is_empty() {
            return None;
        }
        let (cookie, stats) = (object.cookie.clone(), self.parts.stats.clone());
        let foreground = self
            .parts
            .config
            .startup_yields
            .then(|| self.foreground.clone());
        // Counted once it runs: an object whose copen fails never fetches its region.
        Some(async move {
            stats.add(Counter::StartupFetches, fetched);
            let started = Instant::now();
            let runs = fetches.len();
            let first_run = Arc::new(std::sync::OnceLock::new());
            let gated: Vec<BoxFuture<'static, _>> = fetches
                .into_iter()
                .map(|fetch: ChunkFetch| {
                    let (foreground, first_run) = (foreground.clone(), first_run.clone());
                    async move {
                        if let Some(foreground) = foreground {
                            foreground.idle().await;
                        }
                        first_run.get_or_init(|| started.elapsed());
                        fetch.await
                    }
                    .boxed()
                })
                .collect();
            let failed = futures::stream::iter(gated)
                .buffer_unordered(STARTUP_FETCHES)
                .filter(|result| futures::future::ready(result.is_err()))
                .count()
                .await;
            // A failed unit is fetched again by the READ that needs it.
            tracing::info!(
                %cookie, units = fetched, runs, failed,
                held_back = ?first_run.get().copied().unwrap_or_default(),
                elapsed = ?started.elapsed(),
                "start-up region fetched"
            );
        })
    }
}
