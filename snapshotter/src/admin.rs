//! The daemon's Admin service on the snapshotter socket: `Status` (backend, fetcher,
//! layers, cache, recent errors) and `Gc` (a cache collection pass, or its dry run).
//! Replies are JSON of the types below, which the CLI reads back.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tonic::{Request, Response};

use crate::api::SnapshotError;
use crate::cache::{CacheLimits, GcReport, State};

mod generated {
    #![allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
    tonic::include_proto!("lazyerofs.admin.v1");
}
pub use generated::admin_client::AdminClient;
pub use generated::admin_server::AdminServer;
pub use generated::{GcRequest, JsonReply, StatusRequest};

/// What `lazy-erofs status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub pid: u32,
    pub root: String,
    /// Where `/metrics` is served (`http://ADDRESS/metrics`), if it is.
    pub metrics_address: Option<String>,
    pub backend: BackendStatus,
    pub fetcher: Option<FetcherStatus>,
    pub cache: CacheStatus,
    pub layers: Vec<LayerStatus>,
    /// The latest warnings and errors of the daemon's log, oldest first.
    pub recent_errors: Vec<LogEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// `cachefiles`, `fanotify` or `whole`.
    pub name: String,
    /// The running kernel's release.
    pub kernel: String,
    /// Whether the kernel handle outlives this process (systemd keeps it).
    pub kept_by_systemd: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetcherStatus {
    pub pid: Option<u32>,
    pub generation: u64,
    pub restarts: u64,
    pub reads_served: u64,
    pub reads_failed: u64,
    pub bytes_fetched: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheStatus {
    pub dir: String,
    pub bytes: u64,
    pub limits: CacheLimits,
    pub filesystem_free_percent: f64,
    pub layers_mounted: u64,
    pub layers_referenced: u64,
    pub layers_unreferenced: u64,
    /// Every layer's cache on disk, snapshots referencing it or not.
    pub entries: Vec<EntryStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryStatus {
    /// What `lazy-erofs gc` names it by.
    pub key: String,
    pub state: State,
    pub bytes: u64,
    /// Seconds since it was last in use.
    pub idle_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerStatus {
    pub digest: String,
    pub image: String,
    pub fsid: String,
    /// Its cache entry ([`EntryStatus::key`]).
    pub cache_key: String,
    pub state: State,
    /// Bytes of it on disk, and its full size (metadata image + data space).
    pub bytes: u64,
    pub size: u64,
    pub fetched_percent: f64,
    /// Where it is mounted (while it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Unix seconds.
    pub at: u64,
    pub level: String,
    pub message: String,
}

/// What the daemon answers the Admin calls with.
#[tonic::async_trait]
pub trait Control: Send + Sync + 'static {
    async fn status(&self) -> Result<StatusReport, SnapshotError>;
    /// A collection pass; `max_bytes` replaces the configured limit for it.
    async fn gc(&self, dry_run: bool, max_bytes: Option<u64>) -> Result<GcReport, SnapshotError>;
}

pub struct AdminService {
    control: Arc<dyn Control>,
}

impl AdminService {
    pub fn new(control: Arc<dyn Control>) -> AdminServer<Self> {
        AdminServer::new(Self { control })
    }
}

fn reply<T: Serialize>(
    result: Result<T, SnapshotError>,
) -> Result<Response<JsonReply>, tonic::Status> {
    let value = result.map_err(tonic::Status::from)?;
    let json = serde_json::to_string(&value).map_err(|e| tonic::Status::internal(e.to_string()))?;
    Ok(Response::new(JsonReply { json }))
}

#[tonic::async_trait]
impl generated::admin_server::Admin for AdminService {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<JsonReply>, tonic::Status> {
        reply(self.control.status().await)
    }

    async fn gc(&self, request: Request<GcRequest>) -> Result<Response<JsonReply>, tonic::Status> {
        let request = request.into_inner();
        reply(self.control.gc(request.dry_run, request.max_bytes).await)
    }
}
