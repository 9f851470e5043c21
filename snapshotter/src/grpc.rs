//! The containerd `Snapshots` gRPC service over any [`Snapshotter`]. Every request is
//! logged with its key and outcome; errors carry the gRPC code containerd expects.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use containerd_client::services::v1::snapshots as pb;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::api::{Info, Kind, Snapshotter};
use crate::metrics::Metrics;

mod generated {
    #![allow(clippy::all, clippy::pedantic, clippy::unwrap_used)]
    tonic::include_proto!("containerd.services.snapshots.v1");
}
use generated::snapshots_server::Snapshots;
pub use generated::snapshots_server::SnapshotsServer;

/// Infos per `List` reply message.
const LIST_BATCH: usize = 100;

pub struct SnapshotsService<S> {
    snapshotter: Arc<S>,
    metrics: Option<Arc<Metrics>>,
}

impl<S: Snapshotter> SnapshotsService<S> {
    pub fn new(snapshotter: Arc<S>) -> Self {
        Self {
            snapshotter,
            metrics: None,
        }
    }

    /// Counts every call by method and code, with its latency.
    pub fn with_metrics(mut self, metrics: Option<Arc<Metrics>>) -> Self {
        self.metrics = metrics;
        self
    }

    fn finish<T, E: Into<Status>>(
        &self,
        started: Instant,
        call: &'static str,
        key: &str,
        result: Result<T, E>,
    ) -> Result<T, Status> {
        let result = finish(call, key, result);
        if let Some(metrics) = &self.metrics {
            let code = result.as_ref().err().map_or(tonic::Code::Ok, Status::code);
            metrics.grpc_call(call, code, started.elapsed());
        }
        result
    }

    pub fn into_server(self) -> SnapshotsServer<Self> {
        SnapshotsServer::new(self)
    }
}

fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
    }
}

fn system_time(ts: Option<prost_types::Timestamp>) -> SystemTime {
    ts.and_then(|ts| {
        let nanos = u32::try_from(ts.nanos).ok()?;
        let secs = u64::try_from(ts.seconds).ok()?;
        SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
    })
    .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn to_pb(info: Info) -> pb::Info {
    let kind = match info.kind {
        Kind::Unknown => pb::Kind::Unknown,
        Kind::View => pb::Kind::View,
        Kind::Active => pb::Kind::Active,
        Kind::Committed => pb::Kind::Committed,
    };
    pb::Info {
        name: info.name,
        parent: info.parent,
        kind: kind as i32,
        created_at: Some(timestamp(info.created_at)),
        updated_at: Some(timestamp(info.updated_at)),
        labels: info.labels,
    }
}

fn from_pb(info: pb::Info) -> Info {
    let kind = match pb::Kind::try_from(info.kind) {
        Ok(pb::Kind::View) => Kind::View,
        Ok(pb::Kind::Active) => Kind::Active,
        Ok(pb::Kind::Committed) => Kind::Committed,
        _ => Kind::Unknown,
    };
    Info {
        kind,
        name: info.name,
        parent: info.parent,
        labels: info.labels,
        created_at: system_time(info.created_at),
        updated_at: system_time(info.updated_at),
    }
}

/// Logs the outcome of one call and turns errors into statuses.
fn finish<T, E: Into<Status>>(call: &str, key: &str, result: Result<T, E>) -> Result<T, Status> {
    match result {
        Ok(value) => {
            tracing::debug!(call, key, "ok");
            Ok(value)
        }
        Err(error) => {
            let status: Status = error.into();
            if status.code() == tonic::Code::Internal {
                tracing::error!(call, key, error = status.message(), "failed");
            } else {
                tracing::debug!(call, key, code = ?status.code(), error = status.message(), "refused");
            }
            Err(status)
        }
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<pb::ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Snapshotter> Snapshots for SnapshotsService<S> {
    async fn prepare(
        &self,
        request: Request<pb::PrepareSnapshotRequest>,
    ) -> Result<Response<pb::PrepareSnapshotResponse>, Status> {
        let started = Instant::now();
        let r = request.into_inner();
        let key = r.key.clone();
        let mounts = self.snapshotter.prepare(r.key, r.parent, r.labels).await;
        self.finish(started, "prepare", &key, mounts)
            .map(|mounts| Response::new(pb::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<pb::ViewSnapshotRequest>,
    ) -> Result<Response<pb::ViewSnapshotResponse>, Status> {
        let started = Instant::now();
        let r = request.into_inner();
        let key = r.key.clone();
        let mounts = self.snapshotter.view(r.key, r.parent, r.labels).await;
        self.finish(started, "view", &key, mounts)
            .map(|mounts| Response::new(pb::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<pb::MountsRequest>,
    ) -> Result<Response<pb::MountsResponse>, Status> {
        let started = Instant::now();
        let key = request.into_inner().key;
        let mounts = self.snapshotter.mounts(key.clone()).await;
        self.finish(started, "mounts", &key, mounts)
            .map(|mounts| Response::new(pb::MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let started = Instant::now();
        let r = request.into_inner();
        let key = r.key.clone();
        let result = self.snapshotter.commit(r.name, r.key, r.labels).await;
        self.finish(started, "commit", &key, result)
            .map(Response::new)
    }

    async fn remove(
        &self,
        request: Request<pb::RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let started = Instant::now();
        let key = request.into_inner().key;
        let result = self.snapshotter.remove(key.clone()).await;
        self.finish(started, "remove", &key, result)
            .map(Response::new)
    }

    async fn stat(
        &self,
        request: Request<pb::StatSnapshotRequest>,
    ) -> Result<Response<pb::StatSnapshotResponse>, Status> {
        let started = Instant::now();
        let key = request.into_inner().key;
        let info = self.snapshotter.stat(key.clone()).await;
        self.finish(started, "stat", &key, info).map(|info| {
            Response::new(pb::StatSnapshotResponse {
                info: Some(to_pb(info)),
            })
        })
    }

    async fn update(
        &self,
        request: Request<pb::UpdateSnapshotRequest>,
    ) -> Result<Response<pb::UpdateSnapshotResponse>, Status> {
        let started = Instant::now();
        let r = request.into_inner();
        let Some(info) = r.info else {
            return Err(Status::invalid_argument("update without snapshot info"));
        };
        let key = info.name.clone();
        let paths = r.update_mask.map(|mask| mask.paths);
        let info = self.snapshotter.update(from_pb(info), paths).await;
        self.finish(started, "update", &key, info).map(|info| {
            Response::new(pb::UpdateSnapshotResponse {
                info: Some(to_pb(info)),
            })
        })
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<ListStream>, Status> {
        let started = Instant::now();
        let r = request.into_inner();
        let stream = self.snapshotter.list(r.snapshotter, r.filters).await;
        let stream = self.finish(started, "list", "", stream)?;
        let batches = stream
            .map(|item| item.map(to_pb).map_err(Into::into))
            .chunks(LIST_BATCH)
            .map(|batch: Vec<Result<pb::Info, Status>>| {
                batch
                    .into_iter()
                    .collect::<Result<Vec<_>, _>>()
                    .map(|info| pb::ListSnapshotsResponse { info })
            });
        Ok(Response::new(Box::pin(batches)))
    }

    async fn usage(
        &self,
        request: Request<pb::UsageRequest>,
    ) -> Result<Response<pb::UsageResponse>, Status> {
        let started = Instant::now();
        let key = request.into_inner().key;
        let usage = self.snapshotter.usage(key.clone()).await;
        self.finish(started, "usage", &key, usage).map(|u| {
            Response::new(pb::UsageResponse {
                size: u.size,
                inodes: u.inodes,
            })
        })
    }

    async fn cleanup(&self, _request: Request<pb::CleanupRequest>) -> Result<Response<()>, Status> {
        let started = Instant::now();
        let result = self.snapshotter.clear().await;
        self.finish(started, "cleanup", "", result)
            .map(Response::new)
    }
}
