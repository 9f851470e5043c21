//! Mounts of lazy layers, one per layer (by fsid) under `<root>/layers/mnt/`, shared by
//! every snapshot and image holding that layer; overlay lowerdirs point at them.
//!
//! With ondemand mode the mount is EROFS over fscache (`fsid`, `domain_id`): the kernel
//! asks the fetcher for bytes as they are read. A mount of the same fsid in the same
//! domain is refused by the kernel, and a domain outlives a cachefiles fd for as long as
//! any of its mounts do; so mounts left by a previous run are unmounted at start, and
//! when one cannot be (a container still uses it) this run takes a new domain.

use std::collections::HashSet;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lazy_erofs_image::registry::Registry;
use lazy_erofs_ondemand::BlobTable;
use nix::mount::{MntFlags, MsFlags};

use super::{LazyRecord, View, whole};
use crate::api::SnapshotError;

/// How lazy layers reach the kernel.
#[derive(Debug, Clone)]
pub enum Backend {
    /// EROFS over fscache, served by the fetcher from the supervisor's blob table.
    Fscache { blobs: BlobTable, tag: String },
    /// Fetched whole and mounted file-backed (kernels without ondemand mode).
    FileBacked,
}

pub struct LayerMounts {
    mnt_dir: PathBuf,
    blob_dir: PathBuf,
    backend: Backend,
    registry: Arc<Registry>,
    domain: String,
    /// fsids mounted by this process (anything else under `mnt/` is stale).
    mounted: Mutex<HashSet<String>>,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    SnapshotError::io(context)
}

fn make_dir(path: &Path) -> Result<(), SnapshotError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(format!("creating {}", path.display())))
}

/// Whether `path` is the root of a mount (a different device from its parent).
pub fn is_mountpoint(path: &Path) -> bool {
    let parent = path.parent().unwrap_or(path);
    match (std::fs::metadata(path), std::fs::metadata(parent)) {
        (Ok(m), Ok(p)) => m.dev() != p.dev(),
        _ => false,
    }
}

/// Unmounts what a previous run left mounted under `mnt_dir` (detached when busy);
/// returns how many were busy (still used by containers).
pub fn clear_stale_mounts(mnt_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(mnt_dir) else {
        return 0;
    };
    let mut busy = 0;
    for path in entries.flatten().map(|e| e.path()) {
        if !is_mountpoint(&path) || nix::mount::umount(&path).is_ok() {
            continue;
        }
        busy += 1;
        if let Err(e) = nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
            tracing::warn!(path = %path.display(), error = %e, "cannot detach a stale layer mount");
        }
    }
    busy
}

impl LayerMounts {
    /// Prepares `<dir>/{mnt,blobs}` and clears mounts a previous run left (see the module
    /// documentation); file-backed mounts stay, they need no daemon.
    pub fn open(
        dir: &Path,
        backend: Backend,
        registry: Arc<Registry>,
    ) -> Result<Self, SnapshotError> {
        let mnt_dir = dir.join("mnt");
        let blob_dir = dir.join("blobs");
        make_dir(&mnt_dir)?;
        make_dir(&blob_dir)?;
        // File-backed mounts need no daemon and stay; fscache ones are stale.
        let mut mounted = HashSet::new();
        let busy = match backend {
            Backend::FileBacked => {
                let entries = std::fs::read_dir(&mnt_dir)
                    .map_err(io(format!("listing {}", mnt_dir.display())))?;
                for path in entries.flatten().map(|e| e.path()) {
                    if is_mountpoint(&path)
                        && let Some(name) = path.file_name().and_then(|n| n.to_str())
                    {
                        mounted.insert(name.to_owned());
                    }
                }
                0
            }
            Backend::Fscache { .. } => clear_stale_mounts(&mnt_dir),
        };
        let domain_file = dir.join("domain");
        let domain = match &backend {
            Backend::FileBacked => String::new(),
            Backend::Fscache { tag, .. } => {
                let previous = std::fs::read_to_string(&domain_file).ok();
                let domain = match previous {
                    Some(d) if busy == 0 && !d.trim().is_empty() => d.trim().to_owned(),
                    None if busy == 0 => tag.clone(),
                    _ => {
                        let secs = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        tracing::warn!(
                            busy,
                            "layer mounts of a previous run are still in use (their containers \
                             read cached data only); this run mounts layers in a new fscache domain"
                        );
                        format!("{tag}-{secs}")
                    }
                };
                std::fs::write(&domain_file, &domain)
                    .map_err(io(format!("writing {}", domain_file.display())))?;
                domain
            }
        };
        Ok(Self {
            mnt_dir,
            blob_dir,
            backend,
            registry,
            domain,
            mounted: Mutex::new(mounted),
        })
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Where the layer is (or will be) mounted.
    pub fn path(&self, fsid: &str) -> PathBuf {
        self.mnt_dir.join(fsid)
    }

    /// Mounts the layer unless this process already has. Blocks: with fscache the mount
    /// waits for the fetcher to open (and verify) the layer; file-backed, for the whole
    /// download. Call on a blocking thread of a tokio runtime.
    pub fn ensure(&self, layer: &LazyRecord) -> Result<PathBuf, SnapshotError> {
        let path = self.path(&layer.fsid);
        let mut mounted = self
            .mounted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if mounted.contains(&layer.fsid) {
            return Ok(path);
        }
        make_dir(&path)?;
        let started = std::time::Instant::now();
        match &self.backend {
            Backend::Fscache { blobs, .. } => {
                let spec = |view| {
                    serde_json::to_value(layer.spec(view))
                        .map_err(|e| SnapshotError::Store(e.to_string()))
                };
                blobs.insert(layer.fsid.clone(), spec(View::Metadata)?);
                if layer.data_space_size > 0 {
                    blobs.insert(layer.data_tag.clone(), spec(View::Data)?);
                }
                let options = format!("fsid={},domain_id={}", layer.fsid, self.domain);
                mount("none", &path, &options)?;
            }
            Backend::FileBacked => {
                let (meta, data) = whole::fetch(&self.blob_dir, layer, &self.registry)?;
                let options = data
                    .map(|d| format!("device={}", d.display()))
                    .unwrap_or_default();
                mount(&meta.display().to_string(), &path, &options)?;
            }
        }
        tracing::info!(fsid = %layer.fsid, layer = %layer.digest, elapsed = ?started.elapsed(), "lazy layer mounted");
        mounted.insert(layer.fsid.clone());
        Ok(path)
    }

    /// Unmounts a layer no snapshot uses any more (detached if still busy); its cache
    /// stays for the next image that holds it.
    pub fn release(&self, layer: &LazyRecord) {
        let path = self.path(&layer.fsid);
        let mut mounted = self
            .mounted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if mounted.remove(&layer.fsid)
            && let Err(e) = nix::mount::umount2(&path, MntFlags::MNT_DETACH)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot unmount a lazy layer");
        }
        let _ = std::fs::remove_dir(&path);
        if let Backend::Fscache { blobs, .. } = &self.backend {
            blobs.remove(&layer.fsid);
            blobs.remove(&layer.data_tag);
        }
    }

    /// At shutdown: unmounts every layer mount no container uses, so the next run can
    /// keep this fscache domain (and its cache). Returns how many stay (busy).
    pub fn unmount_idle(&self) -> usize {
        let mut mounted = self
            .mounted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if matches!(self.backend, Backend::FileBacked) {
            return 0;
        }
        mounted.retain(|fsid| nix::mount::umount(&self.mnt_dir.join(fsid)).is_err());
        mounted.len()
    }
}

fn mount(source: &str, target: &Path, options: &str) -> Result<(), SnapshotError> {
    let data = (!options.is_empty()).then_some(options);
    nix::mount::mount(
        Some(source),
        target,
        Some("erofs"),
        MsFlags::MS_RDONLY,
        data,
    )
    .map_err(|e| {
        SnapshotError::Unavailable(format!(
            "mounting lazy layer {source} ({options}) on {}: {e}",
            target.display()
        ))
    })
}
