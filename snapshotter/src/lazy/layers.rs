//! Mounts of lazy layers, one per layer (by fsid) under `<root>/layers/mnt/`, shared by
//! every snapshot and image holding that layer; overlay lowerdirs point at them.
//!
//! With ondemand mode the mount is EROFS over fscache (`fsid`, `domain_id`): the kernel
//! asks the fetcher for bytes as they are read. Every layer gets an EROFS domain of its
//! own (`<run domain>.<fsid>`), so its cache objects live in a volume named after its
//! verified binding: a layer whose image names another layer's data tag opens an empty
//! object of its own, never the other layer's (the kernel shares objects by tag within
//! a domain). A mount of the same fsid in the same domain is refused by the kernel, and
//! a domain outlives a cachefiles fd for as long as any of its superblocks do. Unmounting a layer mount always succeeds, even under a
//! running container: overlayfs keeps private clones of its lower layers, so the
//! superblock (and the cache behind it) lives until the container's overlay goes. Who
//! still uses layers is therefore read from the overlay mounts' options; when a previous
//! run's containers do, this run takes a new domain.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use lazy_erofs_image::registry::Registry;
use lazy_erofs_ondemand::fanotify::Broker;
use lazy_erofs_ondemand::{BlobSpec, BlobTable};
use nix::mount::{MntFlags, MsFlags};

use super::{LazyRecord, View, fanotify, whole};
use crate::api::SnapshotError;

/// How lazy layers reach the kernel.
#[derive(Debug, Clone)]
pub enum Backend {
    /// EROFS over fscache, served by the fetcher from the supervisor's blob table.
    /// `kept`: the cache a previous process bound is still bound (systemd kept the
    /// device fd), so its layer mounts still work and are taken over, not replaced.
    Fscache {
        blobs: BlobTable,
        tag: String,
        kept: bool,
        /// The bound cache directory and a handle on the binding, for culling objects.
        cache_dir: PathBuf,
        device: Arc<lazy_erofs_ondemand::Device>,
    },
    /// File-backed EROFS whose data file the broker has the fetcher fill on fanotify
    /// pre-content events.
    Fanotify {
        blobs: BlobTable,
        broker: Arc<Broker>,
        /// Start-up regions are opened once the image's top layer is mounted
        /// ([`LayerMounts::open_startup`]), not as each layer is: the mounts' region
        /// fetches (made here, where the fetcher's gate cannot see them) then do not
        /// queue behind megabytes of start-up data on a slow link.
        startup_yields: bool,
    },
    /// Fetched whole and mounted file-backed (kernels without ondemand mode).
    FileBacked,
}

impl Backend {
    /// As `lazy-erofs status` and the configuration name it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Fscache { .. } => "cachefiles",
            Self::Fanotify { .. } => "fanotify",
            Self::FileBacked => "whole",
        }
    }

    /// The table the fetcher is answered from, when a fetcher serves this backend.
    pub fn blobs(&self) -> Option<&BlobTable> {
        match self {
            Self::Fscache { blobs, .. } | Self::Fanotify { blobs, .. } => Some(blobs),
            Self::FileBacked => None,
        }
    }
}

pub struct LayerMounts {
    mnt_dir: PathBuf,
    blob_dir: PathBuf,
    backend: Backend,
    registry: Arc<Registry>,
    /// This run's domain prefix (see [`LayerMounts::domain`]).
    domain: String,
    /// fsids mounted by this process (anything else under `mnt/` is stale).
    mounted: Mutex<HashSet<String>>,
    /// What each mounted layer is: a layer mounted ahead has no snapshot record yet, and
    /// the cache inventory must still see it in use.
    records: Mutex<HashMap<String, LazyRecord>>,
    /// fscache mounts a previous process left on a kept cache, until [`LayerMounts::adopt`]
    /// takes each over (or [`LayerMounts::clear_unadopted`] drops it).
    kept: Mutex<HashSet<String>>,
    /// One lock per layer, held across its mount (and whole fetch): a layer whose
    /// registry stalls holds up only Prepares of that layer.
    mounting: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Held shared by every mount, exclusively by a cache GC pass that removes caches.
    gc: RwLock<()>,
    prefetch: super::prefetch::PrefetchQueue,
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

/// Unmounts what a previous run left mounted under `mnt_dir` (detached if refused).
pub fn clear_stale_mounts(mnt_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(mnt_dir) else {
        return;
    };
    for path in entries.flatten().map(|e| e.path()) {
        if !is_mountpoint(&path) || nix::mount::umount(&path).is_ok() {
            continue;
        }
        if let Err(e) = nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
            tracing::warn!(path = %path.display(), error = %e, "cannot detach a stale layer mount");
        }
    }
}

/// How many overlay mounts (containers' root filesystems) stack layers mounted under
/// `mnt_dir`, whether or not those layer mounts are still there.
pub fn overlays_using(mnt_dir: &Path) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map_or(0, |mountinfo| count_overlays_over(&mountinfo, mnt_dir))
}

fn count_overlays_over(mountinfo: &str, mnt_dir: &Path) -> usize {
    // mountinfo escapes blanks and backslashes in paths as octal.
    let needle = format!("{}/", mnt_dir.display())
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    mountinfo
        .lines()
        .filter_map(|line| line.split_once(" - ").map(|(_, fs)| fs))
        .filter(|fs| {
            let mut fields = fs.split(' ');
            fields.next() == Some("overlay") && fields.nth(1).is_some_and(|o| o.contains(&needle))
        })
        .count()
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
        // File-backed mounts need no daemon and stay; fscache ones are stale unless
        // their cache is still bound.
        let mut mounted = HashSet::new();
        let mut kept = HashSet::new();
        let in_use = match backend {
            Backend::Fscache { kept: true, .. } => {
                kept = mountpoints(&mnt_dir)?;
                0
            }
            Backend::FileBacked => {
                mounted = mountpoints(&mnt_dir)?;
                0
            }
            // A previous run's mounts answer to its group (kept by its keeper, which
            // this run adopts): mounted again, in this run's hands.
            Backend::Fscache { .. } | Backend::Fanotify { .. } => {
                let in_use = overlays_using(&mnt_dir);
                clear_stale_mounts(&mnt_dir);
                in_use
            }
        };
        let domain_file = dir.join("domain");
        let domain = match &backend {
            Backend::FileBacked | Backend::Fanotify { .. } => String::new(),
            Backend::Fscache { tag, .. } => {
                let previous = std::fs::read_to_string(&domain_file).ok();
                let domain = match previous {
                    Some(d) if in_use == 0 && !d.trim().is_empty() => d.trim().to_owned(),
                    None if in_use == 0 => tag.clone(),
                    _ => {
                        let secs = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        tracing::warn!(
                            containers = in_use,
                            "containers of a previous run still use lazy layers (their reads \
                             of data not cached fail); this run mounts layers in a new fscache \
                             domain, and new lazy mounts may fail (ENOBUFS) until those \
                             containers stop"
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
            prefetch: super::prefetch::PrefetchQueue::new(mnt_dir.clone()),
            mnt_dir,
            blob_dir,
            backend,
            registry,
            domain,
            mounted: Mutex::new(mounted),
            records: Mutex::default(),
            kept: Mutex::new(kept),
            mounting: Mutex::default(),
            gc: RwLock::default(),
        })
    }

    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The EROFS domain of a layer's mount: this run's prefix and the layer's fsid.
    pub fn domain(&self, fsid: &str) -> String {
        format!("{}.{fsid}", self.domain)
    }

    /// This run's EROFS domain prefix (cachefiles volumes are named after it).
    pub fn domain_prefix(&self) -> String {
        self.domain.clone()
    }

    /// Where layer files live (fanotify, whole layers).
    pub fn blob_dir(&self) -> &Path {
        &self.blob_dir
    }

    /// The name of the layer's cache on disk (see `crate::cache::inventory`).
    pub fn cache_key(&self, layer: &LazyRecord) -> Option<String> {
        match &self.backend {
            Backend::Fanotify { .. } => fanotify::name(layer).ok(),
            Backend::Fscache { .. } | Backend::FileBacked => Some(layer.fsid.clone()),
        }
    }

    pub fn is_mounted(&self, fsid: &str) -> bool {
        lock(&self.mounted).contains(fsid)
    }

    /// The layers this process has mounted.
    pub fn mounted_layers(&self) -> Vec<LazyRecord> {
        let mounted = lock(&self.mounted);
        lock(&self.records)
            .iter()
            .filter(|(fsid, _)| mounted.contains(*fsid))
            .map(|(_, record)| record.clone())
            .collect()
    }

    /// Excludes mounts while a cache GC pass removes caches.
    pub fn exclusive(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.gc
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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
        let layer_lock = lock(&self.mounting)
            .entry(layer.fsid.clone())
            .or_default()
            .clone();
        let _mounting = lock(&layer_lock);
        let _no_gc = self
            .gc
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if lock(&self.mounted).contains(&layer.fsid) {
            return Ok(path);
        }
        make_dir(&path)?;
        let started = std::time::Instant::now();
        match &self.backend {
            Backend::Fscache { blobs, .. } => {
                self.register(blobs, layer);
                let options = format!("fsid={},domain_id={}", layer.fsid, self.domain(&layer.fsid));
                mount("none", &path, &options)?;
            }
            Backend::FileBacked => {
                let (meta, data) = whole::fetch(&self.blob_dir, layer, &self.registry)?;
                let options = data
                    .map(|d| format!("device={}", d.display()))
                    .unwrap_or_default();
                mount(&meta.display().to_string(), &path, &options)?;
            }
            Backend::Fanotify {
                blobs,
                broker,
                startup_yields,
            } => {
                let (meta, data) =
                    fanotify::prepare(&self.blob_dir, layer, &self.registry, blobs, broker)?;
                let options = data
                    .as_ref()
                    .map(|d| format!("device={}", d.display()))
                    .unwrap_or_default();
                mount(&meta.display().to_string(), &path, &options)?;
                if let Some(data) = data.filter(|_| layer.startup_size > 0 && !startup_yields) {
                    fanotify::open_startup_region(data);
                }
            }
        }
        tracing::info!(fsid = %layer.fsid, layer = %layer.digest, elapsed = ?started.elapsed(), "lazy layer mounted");
        lock(&self.records).insert(layer.fsid.clone(), layer.clone());
        lock(&self.mounted).insert(layer.fsid.clone());
        Ok(path)
    }

    /// Takes over the mount a previous process left for `layer` on a kept cache: its
    /// cookies go back into the blob table (before the first fetcher writes `restore`,
    /// so the kernel's re-sent OPENs resolve). Returns whether there was one.
    pub fn adopt(&self, layer: &LazyRecord) -> bool {
        if !lock(&self.kept).remove(&layer.fsid) {
            return false;
        }
        if let Backend::Fscache { blobs, .. } = &self.backend {
            self.register(blobs, layer);
        }
        lock(&self.records).insert(layer.fsid.clone(), layer.clone());
        lock(&self.mounted).insert(layer.fsid.clone());
        tracing::info!(fsid = %layer.fsid, layer = %layer.digest, "lazy layer mount taken over");
        true
    }

    /// Unmounts the kept mounts no layer record claimed (left by a Remove the previous
    /// process did not finish); returns how many.
    pub fn clear_unadopted(&self) -> usize {
        let stale: Vec<String> = lock(&self.kept).drain().collect();
        for fsid in &stale {
            let path = self.path(fsid);
            if let Err(e) = nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
                tracing::warn!(path = %path.display(), error = %e, "cannot detach a stale layer mount");
            }
        }
        stale.len()
    }

    fn register(&self, blobs: &BlobTable, layer: &LazyRecord) {
        let spec = |view| BlobSpec::Registry(layer.spec(view));
        let domain = self.domain(&layer.fsid);
        blobs.insert_in(&domain, layer.fsid.clone(), spec(View::Metadata));
        if layer.data_space_size > 0 {
            blobs.insert_in(&domain, layer.data_tag.clone(), spec(View::Data));
        }
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
        lock(&self.records).remove(&layer.fsid);
        lock(&self.mounting).remove(&layer.fsid);
        match &self.backend {
            Backend::Fscache { blobs, .. } => {
                let domain = self.domain(&layer.fsid);
                blobs.remove_in(&domain, &layer.fsid);
                blobs.remove_in(&domain, &layer.data_tag);
            }
            // The fetcher keeps serving the data file while a detached mount reads it.
            Backend::Fanotify { .. } | Backend::FileBacked => {}
        }
    }

    /// At shutdown: unmounts every layer mount, so the next run starts clean; running
    /// containers keep their overlay's clones. Returns how many could not be unmounted.
    pub fn unmount_all(&self) -> usize {
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

    /// Starts reading `plan`'s paths in the background. Only with ondemand mode: a layer
    /// fetched whole has nothing left to fetch.
    pub fn prefetch(&self, plan: super::prefetch::PrefetchPlan) {
        if matches!(self.backend, Backend::FileBacked) {
            return;
        }
        self.prefetch.submit(plan);
    }

    /// Once an image's top layer is mounted: starts the fetch of the start-up regions of
    /// its mounted `layers` (fanotify with `startup_yields`; the cachefiles fetcher
    /// opens each layer's object at mount and holds its runs back itself).
    pub fn open_startup(&self, layers: &[LazyRecord]) {
        let Backend::Fanotify {
            startup_yields: true,
            ..
        } = &self.backend
        else {
            return;
        };
        let wanted = layers.iter().filter(|layer| {
            layer.startup_size > 0 && layer.data_space_size > 0 && self.is_mounted(&layer.fsid)
        });
        for name in wanted.filter_map(|layer| fanotify::name(layer).ok()) {
            let (_, files) = lazy_erofs_ondemand::fanotify::layer::files(&self.blob_dir, &name);
            fanotify::open_startup_region(files.data);
        }
    }

    /// How many containers' overlays stack our layers now.
    pub fn overlays_using(&self) -> usize {
        overlays_using(&self.mnt_dir)
    }
}

/// Names of the mount points directly under `mnt_dir`.
fn mountpoints(mnt_dir: &Path) -> Result<HashSet<String>, SnapshotError> {
    let entries =
        std::fs::read_dir(mnt_dir).map_err(io(format!("listing {}", mnt_dir.display())))?;
    Ok(entries
        .flatten()
        .map(|e| e.path())
        .filter(|path| is_mountpoint(path))
        .filter_map(|path| path.file_name().and_then(|n| n.to_str()).map(str::to_owned))
        .collect())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// Layers of one image mounted ahead at once.
const MOUNTS_AHEAD: usize = 4;

/// Mounts `layers` (an image's lazy layers above the one being prepared) with `ensure`,
/// [`MOUNTS_AHEAD`] at a time in the background. containerd prepares an image's layers
/// one after another and each lazy mount waits for its verified region; mounted ahead,
/// their fetches (and the start-up regions' after them) overlap instead, and each later
/// Prepare finds its layer mounted or waits on that same mount ([`LayerMounts::ensure`]
/// serialises per layer). A failure is only logged: the layer's own Prepare mounts it
/// again and reports the error. Runs on the current tokio runtime.
pub fn mount_ahead<F>(layers: Vec<LazyRecord>, ensure: F)
where
    F: Fn(&LazyRecord) -> Result<PathBuf, SnapshotError> + Send + Sync + 'static,
{
    use futures::StreamExt;
    use tracing::Instrument;
    if layers.is_empty() {
        return;
    }
    let ensure = Arc::new(ensure);
    let span = tracing::Span::current();
    let mounts = futures::stream::iter(layers).for_each_concurrent(MOUNTS_AHEAD, move |layer| {
        let ensure = ensure.clone();
        async move {
            let fsid = layer.fsid.clone();
            match tokio::task::spawn_blocking(move || ensure(&layer)).await {
                Ok(Err(e)) => {
                    tracing::warn!(%fsid, error = %e, "mounting a layer ahead failed")
                }
                Err(e) => tracing::warn!(%fsid, error = %e, "mount-ahead task failed"),
                Ok(Ok(_)) => {}
            }
        }
    });
    tokio::spawn(mounts.instrument(span));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlays_over_layer_mounts_are_counted() {
        let mountinfo = "\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw
90 22 0:50 / /run/c/a/rootfs rw,relatime - overlay overlay rw,lowerdir=/var/lib/le/layers/mnt/f2:/var/lib/le/layers/mnt/f1,upperdir=/var/lib/le/snapshots/7/fs,workdir=/var/lib/le/snapshots/7/work
91 22 0:51 / /run/c/b/rootfs rw,relatime - overlay overlay rw,lowerdir=/var/lib/other/1/fs,upperdir=/var/lib/other/2/fs,workdir=/var/lib/other/2/work
92 22 0:52 / /var/lib/le/layers/mnt/f1 ro,relatime - erofs erofs ro,fsid=f1,domain_id=d
93 22 0:53 / /run/c/d/rootfs rw,relatime - overlay overlay rw,lowerdir=/var/lib/le/layers/mntx/f1
";
        let dir = Path::new("/var/lib/le/layers/mnt");
        assert_eq!(count_overlays_over(mountinfo, dir), 1);
        assert_eq!(count_overlays_over(mountinfo, Path::new("/elsewhere")), 0);
        let spaced = "93 22 0:53 / /r rw - overlay overlay rw,lowerdir=/a\\040b/mnt/f1\n";
        assert_eq!(count_overlays_over(spaced, Path::new("/a b/mnt")), 1);
    }
}
