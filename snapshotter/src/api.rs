//! The snapshotter interface, shaped like `containerd-snapshots`' `Snapshotter` trait
//! (same methods, arguments and types), so a maintained release of that crate can take
//! its place; its 0.3.0 pins tonic 0.9 / h2 0.3, which carry a security advisory.

use std::collections::HashMap;
use std::time::SystemTime;

use containerd_client::types::Mount;
use serde::{Deserialize, Serialize};

/// What a snapshot is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    #[default]
    Unknown,
    View,
    Active,
    Committed,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Unknown => "unknown",
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Information about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub kind: Kind,
    /// Key (active, view) or name (committed).
    pub name: String,
    /// Name of the parent snapshot, empty for none.
    pub parent: String,
    pub labels: HashMap<String, String>,
    pub created_at: SystemTime,
    pub updated_at: SystemTime,
}

impl Default for Info {
    fn default() -> Self {
        Self {
            kind: Kind::default(),
            name: String::new(),
            parent: String::new(),
            labels: HashMap::new(),
            created_at: SystemTime::UNIX_EPOCH,
            updated_at: SystemTime::UNIX_EPOCH,
        }
    }
}

/// Resources a snapshot uses, parents excluded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub inodes: i64,
    pub size: i64,
}

/// Errors with the meaning containerd gives them (each maps to one gRPC code).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0:?}: not found")]
    NotFound(String),
    #[error("snapshot {0:?}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata store: {0}")]
    Store(String),
    /// The store was written by a newer lazy-erofs (a downgrade): refused untouched.
    #[error(
        "metadata store {path}: schema version {found}, this lazy-erofs {ours} reads up to \
         {supported}: run the newer lazy-erofs again, or move the snapshotter root aside"
    )]
    NewerStore {
        path: String,
        found: u64,
        supported: u64,
        ours: &'static str,
    },
    /// The disk is full (ENOSPC, EDQUOT): retry once space is freed.
    #[error("{0}: no space left on the device")]
    NoSpace(String),
}

impl SnapshotError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| {
            if is_no_space(&source) {
                SnapshotError::NoSpace(context)
            } else {
                SnapshotError::Io { context, source }
            }
        }
    }
}

/// Whether `error` says the filesystem (or the caller's quota) is full.
pub fn is_no_space(error: &std::io::Error) -> bool {
    // By kind: wrapped errors (a path added) keep it, not the raw errno.
    matches!(
        error.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

impl From<SnapshotError> for tonic::Status {
    fn from(error: SnapshotError) -> Self {
        let message = error.to_string();
        match error {
            SnapshotError::NotFound(_) => tonic::Status::not_found(message),
            SnapshotError::AlreadyExists(_) => tonic::Status::already_exists(message),
            SnapshotError::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            SnapshotError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            SnapshotError::Unavailable(_) => tonic::Status::unavailable(message),
            SnapshotError::NoSpace(_) => tonic::Status::resource_exhausted(message),
            SnapshotError::Io { .. }
            | SnapshotError::Store(_)
            | SnapshotError::NewerStore { .. } => tonic::Status::internal(message),
        }
    }
}

/// A containerd snapshotter.
#[async_trait::async_trait]
pub trait Snapshotter: Send + Sync + 'static {
    /// Convertible to the gRPC status containerd expects.
    type Error: std::fmt::Debug + Into<tonic::Status> + Send;

    /// The info of an active or committed snapshot by key or name.
    async fn stat(&self, key: String) -> Result<Info, Self::Error>;

    /// Updates the mutable properties (labels) of a snapshot; `fieldpaths` like
    /// `labels` or `labels.<key>` say which, none means all labels.
    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, Self::Error>;

    /// Resources used by a snapshot, parents excluded.
    async fn usage(&self, key: String) -> Result<Usage, Self::Error>;

    /// The mounts of an active snapshot or view.
    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Self::Error>;

    /// Creates an active snapshot `key` on committed `parent` ("" for none).
    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error>;

    /// Like `prepare`, read-only and never committable.
    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error>;

    /// Freezes active snapshot `key` as committed snapshot `name`.
    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Self::Error>;

    /// Removes a snapshot that has no children.
    async fn remove(&self, key: String) -> Result<(), Self::Error>;

    /// Releases resources no snapshot refers to any more.
    async fn clear(&self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The stream `list` returns.
    type InfoStream: futures::Stream<Item = Result<Info, Self::Error>> + Send + 'static;

    /// Every snapshot matching any of `filters` (all when empty).
    async fn list(
        &self,
        snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Self::Error>;
}
