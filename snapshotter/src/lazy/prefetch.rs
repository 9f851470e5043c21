//! Prefetch after a lazy pull: the paths an image lists on its manifest
//! ([`annotation::PREFETCH`](lazy_erofs_image::manifest::annotation::PREFETCH)) are read
//! through the layer mounts in the background, so the kernel asks the fetcher for them
//! before the container does. A path is read from the topmost layer holding it (a
//! whiteout there ends the search); a directory is read whole in every layer holding it,
//! which may read files an upper layer hides — a few bytes more, never wrong ones.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::fcntl::{AT_FDCWD, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, SFlag, fstat};

use lazy_erofs_image::manifest::{annotation, parse_prefetch_list};
use oci_spec::image::ImageManifest;

/// What to read for one image once all its layers are mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchPlan {
    pub image: String,
    pub paths: Vec<String>,
    /// fsids of the image's layers, topmost first.
    pub layers: Vec<String>,
}

impl PrefetchPlan {
    /// The plan for `manifest` when it lists paths; a malformed list is logged and
    /// skipped (prefetch is a hint, the image works without it).
    pub fn from_manifest(
        image: &str,
        manifest: &ImageManifest,
        layers: Vec<String>,
    ) -> Option<Self> {
        let list = manifest.annotations().as_ref()?.get(annotation::PREFETCH)?;
        match parse_prefetch_list(list) {
            Ok(paths) if !paths.is_empty() => Some(Self {
                image: image.to_owned(),
                paths,
                layers,
            }),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(image, error = %e, "ignoring the image's prefetch list");
                None
            }
        }
    }
}

/// Images prefetched at once; more wait in a queue of [`PREFETCH_QUEUE`] (a node pulling
/// hundreds of images must not start hundreds of readers).
pub const PREFETCH_WORKERS: usize = 2;
pub const PREFETCH_QUEUE: usize = 64;

/// A bounded pool of prefetch threads, started on first use.
pub struct PrefetchQueue {
    mnt_dir: PathBuf,
    tx: std::sync::OnceLock<std::sync::mpsc::SyncSender<PrefetchPlan>>,
}

impl PrefetchQueue {
    pub fn new(mnt_dir: PathBuf) -> Self {
        Self {
            mnt_dir,
            tx: std::sync::OnceLock::new(),
        }
    }

    /// Queues `plan`; when the queue is full the plan is dropped (prefetch is a hint).
    pub fn submit(&self, plan: PrefetchPlan) {
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<PrefetchPlan>(PREFETCH_QUEUE);
            let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
            for n in 0..PREFETCH_WORKERS {
                let (rx, mnt_dir) = (rx.clone(), self.mnt_dir.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("prefetch-{n}"))
                    .spawn(move || {
                        loop {
                            let next = rx
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .recv();
                            let Ok(plan) = next else { return };
                            run(&plan, &mnt_dir);
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a prefetch thread");
                }
            }
            tx
        });
        if let Err(e) = tx.try_send(plan) {
            let image = match &e {
                std::sync::mpsc::TrySendError::Full(p)
                | std::sync::mpsc::TrySendError::Disconnected(p) => p.image.clone(),
            };
            tracing::warn!(%image, queued = PREFETCH_QUEUE, "prefetch queue full or stopped; skipped");
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PrefetchReport {
    pub files: u64,
    pub bytes: u64,
    /// Listed paths no layer holds.
    pub missing: u64,
    /// Files that could not be read (logged).
    pub failed: u64,
}

/// Reads `plan`'s paths through the layer mounts under `mnt_dir`. Paths resolve inside
/// each layer, as the container would see them: a symlink on the way (`/x -> /`) leads
/// to the layer's own root, never the host's; no mount is crossed; devices, fifos and
/// sockets are never opened.
pub fn run(plan: &PrefetchPlan, mnt_dir: &Path) -> PrefetchReport {
    let started = Instant::now();
    let mut report = PrefetchReport::default();
    let roots: Vec<(PathBuf, Option<OwnedFd>)> = plan
        .layers
        .iter()
        .map(|fsid| {
            let path = mnt_dir.join(fsid);
            let fd = open_dir(AT_FDCWD, &path).ok();
            (path, fd)
        })
        .collect();
    for path in &plan.paths {
        let relative = match path.trim_start_matches('/') {
            "" => ".",
            rest => rest,
        };
        let mut found = false;
        for (root_path, root) in &roots {
            let Some(root) = root else { continue };
            let Ok(fd) = open_in_layer(root, relative, OFlag::O_PATH) else {
                continue;
            };
            let Ok(stat) = fstat(&fd) else { continue };
            let shown = root_path.join(relative);
            match file_type(&stat) {
                // An overlay whiteout (0/0 character device) deletes the path below.
                SFlag::S_IFCHR if stat.st_rdev == 0 => break,
                SFlag::S_IFDIR => {
                    found = true;
                    match open_dir(&fd, Path::new(".")) {
                        Ok(dir) => read_tree(dir, &shown, &mut report),
                        Err(_) => report.failed += 1,
                    }
                    continue;
                }
                SFlag::S_IFREG => {
                    found = true;
                    let file = open_in_layer(root, relative, OFlag::O_RDONLY | OFlag::O_NONBLOCK);
                    read_file(file, &shown, &mut report);
                }
                _ => found = true,
            }
            break;
        }
        if !found {
            report.missing += 1;
        }
    }
    tracing::info!(
        image = %plan.image,
        files = report.files,
        bytes = report.bytes,
        missing = report.missing,
        failed = report.failed,
        elapsed = ?started.elapsed(),
        "prefetch done"
    );
    report
}

/// Opens `relative` under the layer root `root` with the layer as `/`, not following
/// the last component, crossing no mount.
fn open_in_layer(root: &OwnedFd, relative: &str, flags: OFlag) -> nix::Result<OwnedFd> {
    // openat2 refuses O_NOCTTY beside O_PATH.
    let extra = if flags.contains(OFlag::O_PATH) {
        OFlag::empty()
    } else {
        OFlag::O_NOCTTY
    };
    let how = OpenHow::new()
        .flags(flags | extra | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_IN_ROOT
                | ResolveFlag::RESOLVE_NO_XDEV
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    openat2(root, relative, how)
}

fn open_dir<Fd: AsFd>(at: Fd, path: &Path) -> nix::Result<OwnedFd> {
    openat(
        at,
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Reads every regular file below the open directory `dir` (shown as `path` in logs);
/// entries are single names opened without following, so nothing leaves the tree.
fn read_tree(dir: OwnedFd, path: &Path, report: &mut PrefetchReport) {
    let Ok(mut listing) = nix::dir::Dir::from_fd(dir) else {
        report.failed += 1;
        return;
    };
    let names: Vec<std::ffi::CString> = listing
        .iter()
        .flatten()
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    read_entries(&listing, names, path, report);
}

fn read_entries(
    listing: &nix::dir::Dir,
    names: Vec<std::ffi::CString>,
    path: &Path,
    report: &mut PrefetchReport,
) {
    for name in names {
        let shown = path.join(std::ffi::OsStr::from_bytes(name.as_bytes()));
        let at = |flags: OFlag| {
            openat(
                listing,
                name.as_c_str(),
                flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
                Mode::empty(),
            )
        };
        let Ok(stat) = at(OFlag::O_PATH).and_then(|fd| fstat(&fd)) else {
            report.failed += 1;
            continue;
        };
        match file_type(&stat) {
            SFlag::S_IFDIR => match at(OFlag::O_RDONLY | OFlag::O_DIRECTORY) {
                Ok(dir) => read_tree(dir, &shown, report),
                Err(_) => report.failed += 1,
            },
            SFlag::S_IFREG => read_file(at(OFlag::O_RDONLY | OFlag::O_NONBLOCK), &shown, report),
            _ => {}
        }
    }
}

/// The `S_IF*` type bits of `stat`.
fn file_type(stat: &nix::sys::stat::FileStat) -> SFlag {
    SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits())
}

fn read_file(file: nix::Result<OwnedFd>, path: &Path, report: &mut PrefetchReport) {
    let result = file
        .map_err(io::Error::from)
        .and_then(|fd| io::copy(&mut std::fs::File::from(fd), &mut io::sink()));
    match result {
        Ok(bytes) => {
            report.files += 1;
            report.bytes += bytes;
        }
        Err(e) => {
            report.failed += 1;
            tracing::warn!(path = %path.display(), error = %e, "prefetch read failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, path: &str, bytes: &[u8]) {
        let target = root.join(path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, bytes).unwrap();
    }

    #[test]
    fn files_come_from_the_topmost_layer_and_directories_from_all() {
        let mnt = tempfile::tempdir().unwrap();
        let (top, bottom) = (mnt.path().join("top"), mnt.path().join("bottom"));
        write(&bottom, "bin/tool", &[1; 1000]);
        write(&top, "bin/tool", &[2; 10]);
        write(&bottom, "lib/a", &[3; 100]);
        write(&top, "lib/sub/b", &[4; 7]);
        std::os::unix::fs::symlink("/etc/shadow", top.join("link")).unwrap();
        let plan = PrefetchPlan {
            image: "test".into(),
            paths: vec![
                "/bin/tool".into(),
                "/lib".into(),
                "/nope".into(),
                "/link".into(),
            ],
            layers: vec!["top".into(), "bottom".into()],
        };
        let report = run(&plan, mnt.path());
        assert_eq!(
            report,
            PrefetchReport {
                files: 3,
                bytes: 10 + 100 + 7,
                missing: 1,
                failed: 0
            }
        );
    }

    #[test]
    fn symlinks_on_the_way_resolve_inside_the_layer() {
        let mnt = tempfile::tempdir().unwrap();
        let layer = mnt.path().join("layer");
        write(&layer, "bin/tool", &[2; 10]);
        // A hostile layer: `/x -> /` and a list naming `/x/proc/...`, `/x/etc/...`.
        std::os::unix::fs::symlink("/", layer.join("x")).unwrap();
        std::os::unix::fs::symlink("../../..", layer.join("bin/up")).unwrap();
        let plan = PrefetchPlan {
            image: "test".into(),
            paths: vec![
                "/x/proc/self/status".into(),
                "/x/bin/tool".into(),
                "/bin/up/etc/passwd".into(),
                "/x/etc".into(),
            ],
            layers: vec!["layer".into()],
        };
        let report = run(&plan, mnt.path());
        // Only the layer's own /bin/tool is read; the host's /proc and /etc are not.
        assert_eq!(
            report,
            PrefetchReport {
                files: 1,
                bytes: 10,
                missing: 3,
                failed: 0
            }
        );
    }

    #[test]
    fn malformed_lists_are_skipped() {
        let manifest = |list: &str| -> ImageManifest {
            let mut m = oci_spec::image::ImageManifestBuilder::default()
                .schema_version(2u32)
                .config(oci_spec::image::Descriptor::new(
                    oci_spec::image::MediaType::ImageConfig,
                    0,
                    oci_spec::image::Digest::try_from(format!("sha256:{}", "0".repeat(64)))
                        .unwrap(),
                ))
                .layers(vec![])
                .build()
                .unwrap();
            m.set_annotations(Some(
                [(annotation::PREFETCH.to_owned(), list.to_owned())].into(),
            ));
            m
        };
        let plan = PrefetchPlan::from_manifest("i", &manifest("/usr/bin\n"), vec!["f".into()]);
        assert_eq!(plan.map(|p| p.paths), Some(vec!["/usr/bin".to_owned()]));
        assert_eq!(
            PrefetchPlan::from_manifest("i", &manifest("usr/bin"), vec![]),
            None
        );
        assert_eq!(
            PrefetchPlan::from_manifest("i", &manifest("# none"), vec![]),
            None
        );
    }
}
