//! Serving the Snapshots service on a Unix socket: its directory 0700, the socket 0660,
//! a stale socket from a dead daemon replaced, a live one refused.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::admin::{AdminService, Control};
use crate::api::Snapshotter;
use crate::grpc::SnapshotsService;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is served by another running snapshotter")]
    InUse(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> ServeError {
    move |source| ServeError::Io { context, source }
}

/// Binds `socket` (creating its directory 0700), replacing a stale socket file.
pub fn bind(socket: &Path) -> Result<UnixListener, ServeError> {
    let shown = socket.display().to_string();
    if let Some(dir) = socket.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(format!("creating {}", dir.display())))?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(ServeError::InUse(shown));
        }
        std::fs::remove_file(socket).map_err(io(format!("removing stale {shown}")))?;
    }
    let listener = UnixListener::bind(socket).map_err(io(format!("binding {shown}")))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))
        .map_err(io(format!("chmod {shown}")))?;
    Ok(listener)
}

/// What the daemon serves beside the Snapshots service.
#[derive(Default)]
pub struct Extras {
    /// The Admin service (`lazy-erofs status`, `lazy-erofs gc`).
    pub admin: Option<Arc<dyn Control>>,
    /// Counts Snapshots calls.
    pub metrics: Option<Arc<Metrics>>,
}

/// Serves until `shutdown` resolves, then lets in-flight calls finish.
pub async fn serve<S: Snapshotter>(
    listener: UnixListener,
    snapshotter: Arc<S>,
    extras: Extras,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let snapshots = SnapshotsService::new(snapshotter).with_metrics(extras.metrics);
    tonic::transport::Server::builder()
        .add_service(snapshots.into_server())
        .add_optional_service(extras.admin.map(AdminService::new))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
