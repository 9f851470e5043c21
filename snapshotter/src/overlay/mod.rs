//! Ordinary layers, with the semantics of containerd's overlayfs snapshotter: each
//! snapshot owns `<root>/snapshots/<id>/{fs,work}`; the first layer is a bind mount,
//! the others overlay with the parent chain as lowerdirs; views are read-only; commit
//! freezes an active snapshot; remove refuses parents; cleanup drops orphans.
//!
//! Lazy layers (when enabled): a Prepare carrying the remote-snapshot labels for a
//! layer its manifest marks lazy goes to [`LazyLayers::prepare`], which mounts that
//! layer and has this store record the committed snapshot under the target name; the
//! Prepare answers AlreadyExists, as containerd expects of a remote snapshotter. In parent chains such a snapshot's lowerdir is the
//! layer's mount.
//!
//! Crash safety: a directory is built under a `new-*` name and renamed to its id inside
//! the store transaction that records it; removal forgets the record first, then deletes
//! the directory. Whatever a kill -9 interrupts leaves a directory no record names, which
//! `recover` (at start) and `clear` (Cleanup) delete.

mod cache;
mod usage;

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_client::types::Mount;

use crate::api::{Info, Kind, SnapshotError, Snapshotter, Usage};
use crate::filter::Filters;
use crate::labels;
use crate::lazy::{Backend, LayerMounts, LazyLayers, LazyRecord, RemoteLayerRef, RemotePrepare};
use crate::store::{Record, Store};
pub use usage::disk_usage;

pub struct OverlaySnapshotter {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    store: Store,
    lazy: Option<LazyLayers>,
    /// Held shared by everything that makes or moves snapshot directories, exclusively
    /// by orphan removal: containerd's GC calls Cleanup while pods are created, and a
    /// directory being built (or just recorded) must not look like an orphan.
    dirs: std::sync::RwLock<()>,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    SnapshotError::io(context)
}

fn bind(source: &Path, writable: bool) -> Mount {
    Mount {
        r#type: "bind".into(),
        source: source.display().to_string(),
        target: String::new(),
        options: vec![if writable { "rw" } else { "ro" }.into(), "rbind".into()],
    }
}

impl OverlaySnapshotter {
    /// Opens the snapshotter rooted at `root` (created 0700 if missing) and removes what
    /// an interrupted operation left behind.
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        Self::open_inner(root, None)
    }

    /// Like [`open`](Self::open), also serving lazy layers from registries through
    /// `backend`; layer mounts live under `<root>/layers`.
    pub fn open_lazy(
        root: &Path,
        backend: Backend,
        registry: Arc<lazy_erofs_image::registry::Registry>,
    ) -> Result<Self, SnapshotError> {
        let mounts = LayerMounts::open(&root.join("layers"), backend, registry.clone())?;
        let lazy = LazyLayers::new(registry, mounts);
        let snapshotter = Self::open_inner(root, Some(lazy))?;
        snapshotter.adopt_kept_layers()?;
        Ok(snapshotter)
    }

    /// Takes over the layer mounts a previous process left on a cache that is still
    /// bound (their blob descriptions go back into the supervisor's table before its
    /// first fetcher starts); unmounts kept mounts no layer record claims.
    fn adopt_kept_layers(&self) -> Result<(), SnapshotError> {
        let Some(lazy) = &self.inner.lazy else {
            return Ok(());
        };
        let mut adopted = 0;
        for (_, record) in self.inner.store.list()? {
            if let Some(layer) = &record.lazy
                && lazy.mounts().adopt(layer)
            {
                adopted += 1;
            }
        }
        let stale = lazy.mounts().clear_unadopted();
        if adopted + stale > 0 {
            tracing::info!(
                adopted,
                stale,
                "layer mounts of the previous process taken over"
            );
        }
        Ok(())
    }

    fn open_inner(root: &Path, lazy: Option<LazyLayers>) -> Result<Self, SnapshotError> {
        let snapshots = root.join("snapshots");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&snapshots)
            .map_err(io(format!("creating {}", snapshots.display())))?;
        let store = Store::open(&root.join("metadata.redb"))?;
        let inner = Inner {
            root: root.to_path_buf(),
            store,
            lazy,
            dirs: std::sync::RwLock::default(),
        };
        let removed = inner.remove_orphans()?;
        if !removed.is_empty() {
            tracing::info!(
                count = removed.len(),
                "removed directories left by interrupted operations"
            );
        }
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Mounts every lazy layer a committed snapshot stands on (after a restart the kernel
    /// re-opens them from the cache). Meant to run after the socket serves: a Mounts
    /// call needing a layer mounts it itself meanwhile. Returns how many are mounted.
    pub async fn mount_lazy_layers(&self) -> Result<usize, SnapshotError> {
        self.blocking(|inner| {
            let Some(lazy) = &inner.lazy else {
                return Ok(0);
            };
            let mut count = 0;
            for (key, record) in inner.store.list()? {
                if let Some(layer) = &record.lazy {
                    match lazy.mounts().ensure(layer) {
                        Ok(_) => count += 1,
                        Err(e) => {
                            tracing::warn!(snapshot = %key, error = %e, "cannot mount lazy layer")
                        }
                    }
                }
            }
            Ok(count)
        })
        .await
    }

    /// At shutdown: unmounts the lazy layer mounts; returns how many refused.
    pub fn unmount_layers(&self) -> usize {
        self.inner
            .lazy
            .as_ref()
            .map_or(0, |lazy| lazy.mounts().unmount_all())
    }

    /// Where the lazy layer `fsid` is mounted, if this process mounted it.
    pub fn layer_mount(&self, fsid: &str) -> Option<PathBuf> {
        let mounts = self.inner.lazy.as_ref()?.mounts();
        mounts.is_mounted(fsid).then(|| mounts.path(fsid))
    }

    /// How many containers' overlays stack lazy layers right now.
    pub fn overlays_using_layers(&self) -> usize {
        self.inner
            .lazy
            .as_ref()
            .map_or(0, |lazy| lazy.mounts().overlays_using())
    }

    /// Runs `f` on a blocking thread: store commits fsync, directory walks take time.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, SnapshotError> + Send + 'static,
    ) -> Result<T, SnapshotError> {
        let (inner, span) = (self.inner.clone(), tracing::Span::current());
        tokio::task::spawn_blocking(move || span.in_scope(|| f(&inner)))
            .await
            .map_err(|e| SnapshotError::Unavailable(format!("worker failed: {e}")))?
    }
}

impl Inner {
    fn dirs_shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.dirs
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The directory for new snapshot `id`, cleared if a create whose store write then
    /// failed (disk full, I/O error) left it: no record can own an id the store is only
    /// now handing out, and a leftover would fail every later create.
    fn unused_dir(&self, id: u64) -> Result<PathBuf, SnapshotError> {
        let dir = self.dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                tracing::warn!(dir = %dir.display(), "removed a directory a failed create left")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("clearing {}", dir.display()))(e)),
        }
        Ok(dir)
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir().join(id.to_string())
    }

    fn fs(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    /// Where a committed snapshot's files are: its layer mount or its own directory.
    fn layer_dir(&self, record: &Record) -> Result<PathBuf, SnapshotError> {
        match (&record.lazy, &self.lazy) {
            (Some(layer), Some(lazy)) => lazy.mounts().ensure(layer),
            (Some(layer), None) => Err(SnapshotError::FailedPrecondition(format!(
                "snapshot stands on lazy layer {} but lazy layers are off",
                layer.digest
            ))),
            (None, _) => Ok(self.fs(record.id)),
        }
    }

    /// Directories of the parent chain, nearest first.
    fn parent_dirs(&self, record: &Record) -> Result<Vec<PathBuf>, SnapshotError> {
        let mut dirs = Vec::new();
        let mut parent = record.parent.clone();
        while !parent.is_empty() {
            let p = self.store.get(&parent)?.ok_or_else(|| {
                SnapshotError::Store(format!("parent {parent:?} of a snapshot is missing"))
            })?;
            dirs.push(self.layer_dir(&p)?);
            parent = p.parent;
        }
        Ok(dirs)
    }

    fn mounts(&self, record: &Record) -> Result<Vec<Mount>, SnapshotError> {
        let parents = self.parent_dirs(record)?;
        let writable = record.kind == Kind::Active;
        if parents.is_empty() {
            return Ok(vec![bind(&self.fs(record.id), writable)]);
        }
        if !writable && parents.len() == 1 {
            return Ok(vec![bind(&parents[0], false)]);
        }
        let lower: Vec<String> = parents.iter().map(|p| p.display().to_string()).collect();
        let mut options = Vec::new();
        if writable {
            options.push(format!(
                "workdir={}",
                self.dir(record.id).join("work").display()
            ));
            options.push(format!("upperdir={}", self.fs(record.id).display()));
        }
        options.push(format!("lowerdir={}", lower.join(":")));
        Ok(vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }])
    }

    /// A remote Prepare of a lazy layer: mount it and record `target` committed (the
    /// caller answers AlreadyExists so containerd skips the download). False when the
    /// target was there already.
    fn create_lazy(
        &self,
        remote: &RemoteLayerRef,
        parent: &str,
        labels: HashMap<String, String>,
        layer: LazyRecord,
    ) -> Result<bool, SnapshotError> {
        labels::validate(&labels)?;
        let lazy = self
            .lazy
            .as_ref()
            .ok_or_else(|| SnapshotError::FailedPrecondition("lazy layers are off".into()))?;
        if self.store.get(&remote.target)?.is_some() {
            return Ok(false);
        }
        lazy.mounts().ensure(&layer)?;
        let _dirs = self.dirs_shared();
        self.store
            .create_lazy(&remote.target, parent, labels, layer, |id| {
                let dir = self.unused_dir(id)?;
                std::fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))
            })?;
        tracing::info!(snapshot = %remote.target, layer = %remote.layer_digest, "lazy layer committed");
        Ok(true)
    }

    fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        if key.is_empty() {
            return Err(SnapshotError::InvalidArgument(
                "snapshot key is empty".into(),
            ));
        }
        labels::validate(&labels)?;
        let _dirs = self.dirs_shared();
        let staging = tempfile::Builder::new()
            .prefix("new-")
            .tempdir_in(self.snapshots_dir())
            .map_err(io("creating a snapshot directory"))?;
        let fs = staging.path().join("fs");
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&fs)
            .and_then(|()| std::fs::set_permissions(&fs, std::fs::Permissions::from_mode(0o755)))
            .map_err(io(format!("creating {}", fs.display())))?;
        if kind == Kind::Active {
            let work = staging.path().join("work");
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&work)
                .map_err(io(format!("creating {}", work.display())))?;
        }
        let record = self.store.create(key, kind, parent, labels, |id| {
            let target = self.unused_dir(id)?;
            std::fs::rename(staging.path(), &target).map_err(io(format!(
                "moving snapshot directory to {}",
                target.display()
            )))
        })?;
        // The directory was moved; nothing left for the guard to delete.
        let _ = staging.keep();
        self.mounts(&record)
    }

    fn commit(
        &self,
        name: &str,
        key: &str,
        labels: HashMap<String, String>,
    ) -> Result<(), SnapshotError> {
        if name.is_empty() {
            return Err(SnapshotError::InvalidArgument(
                "snapshot name is empty".into(),
            ));
        }
        labels::validate(&labels)?;
        let record = self.store.require(key)?;
        if record.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key:?} is {}, only active snapshots can be committed",
                record.kind.name()
            )));
        }
        let usage = disk_usage(&self.fs(record.id))?;
        self.store.commit(name, key, labels, usage)?;
        Ok(())
    }

    fn remove(&self, key: &str) -> Result<(), SnapshotError> {
        let record = self.store.remove(key)?;
        if let (Some(layer), Some(lazy)) = (&record.lazy, &self.lazy) {
            let still_used = self
                .store
                .list()?
                .iter()
                .any(|(_, r)| r.lazy.as_ref().is_some_and(|l| l.fsid == layer.fsid));
            if !still_used {
                lazy.mounts().release(layer);
                // Its last use: the cache GC evicts the longest unreferenced first.
                if let Some(cache_key) = lazy.mounts().cache_key(layer) {
                    let now = crate::cache::now_secs();
                    if let Err(e) = self.store.record_layer_uses(&[(cache_key, now)], &[]) {
                        tracing::warn!(error = %e, "cannot record a layer's last use");
                    }
                }
            }
        }
        // Forgotten first: if this deletion is interrupted, the directory is an orphan.
        let dir = self.dir(record.id);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "snapshot removed, its directory not yet; Cleanup will retry");
        }
        Ok(())
    }

    /// Deletes directories under `snapshots/` that no record names (interrupted
    /// creations and removals). Returns what it deleted.
    fn remove_orphans(&self) -> Result<Vec<PathBuf>, SnapshotError> {
        let _dirs = self
            .dirs
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let ids = self.store.ids()?;
        let mut removed = Vec::new();
        let dir = self.snapshots_dir();
        for entry in std::fs::read_dir(&dir).map_err(io(format!("listing {}", dir.display())))? {
            let entry = entry.map_err(io(format!("listing {}", dir.display())))?;
            let name = entry.file_name();
            let known = name
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if known {
                continue;
            }
            let path = entry.path();
            match std::fs::remove_dir_all(&path) {
                Ok(()) => removed.push(path),
                Err(e) => tracing::warn!(dir = %path.display(), error = %e, "cannot remove orphan"),
            }
        }
        Ok(removed)
    }

    fn usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        let record = self.store.require(key)?;
        match record.usage {
            Some(frozen) => Ok(frozen),
            None => disk_usage(&self.fs(record.id)),
        }
    }

    fn update(&self, info: Info, fieldpaths: Vec<String>) -> Result<Info, SnapshotError> {
        // Every label that can end up stored comes from `info`: validating it suffices.
        labels::validate(&info.labels)?;
        let record = self.store.update_labels(&info.name, |current| {
            labels::apply_update(current, &info.labels, &fieldpaths)
        })?;
        Ok(record.info(&info.name))
    }
}

type InfoStream = futures::stream::Iter<std::vec::IntoIter<Result<Info, SnapshotError>>>;

#[async_trait::async_trait]
impl Snapshotter for OverlaySnapshotter {
    type Error = SnapshotError;

    async fn stat(&self, key: String) -> Result<Info, SnapshotError> {
        self.blocking(move |inner| Ok(inner.store.require(&key)?.info(&key)))
            .await
    }

    async fn update(
        &self,
        info: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, SnapshotError> {
        self.blocking(move |inner| inner.update(info, fieldpaths.unwrap_or_default()))
            .await
    }

    async fn usage(&self, key: String) -> Result<Usage, SnapshotError> {
        self.blocking(move |inner| inner.usage(&key)).await
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, SnapshotError> {
        self.blocking(move |inner| {
            let record = inner.store.require(&key)?;
            if record.kind == Kind::Committed {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key:?} is committed: only active snapshots and views have mounts"
                )));
            }
            inner.mounts(&record)
        })
        .await
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        mut labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        if let Some(lazy) = &self.inner.lazy
            && let Some(remote) = RemoteLayerRef::from_labels(&labels)?
        {
            let record = |remote: RemoteLayerRef, parent: String, labels, layer| {
                self.blocking(move |inner| inner.create_lazy(&remote, &parent, labels, layer))
            };
            match lazy.prepare(remote, parent.clone(), labels, record).await? {
                RemotePrepare::Committed(target) => {
                    return Err(SnapshotError::AlreadyExists(target));
                }
                RemotePrepare::Ordinary(ordinary) => labels = ordinary,
            }
        }
        self.blocking(move |inner| inner.create(Kind::Active, &key, &parent, labels))
            .await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.blocking(move |inner| inner.create(Kind::View, &key, &parent, labels))
            .await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), SnapshotError> {
        self.blocking(move |inner| inner.commit(&name, &key, labels))
            .await
    }

    async fn remove(&self, key: String) -> Result<(), SnapshotError> {
        self.blocking(move |inner| inner.remove(&key)).await
    }

    async fn clear(&self) -> Result<(), SnapshotError> {
        self.blocking(|inner| inner.remove_orphans().map(|_| ()))
            .await
    }

    type InfoStream = InfoStream;

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<InfoStream, SnapshotError> {
        let filters = Filters::parse(&filters)?;
        let infos = self
            .blocking(move |inner| {
                Ok(inner
                    .store
                    .list()?
                    .into_iter()
                    .map(|(key, record)| record.info(&key))
                    .filter(|info| filters.matches(info))
                    .map(Ok)
                    .collect::<Vec<_>>())
            })
            .await?;
        Ok(futures::stream::iter(infos))
    }
}
