//! Removing a cache volume's objects through the kernel, as cachefilesd does: `cull
//! <name>` on the bound device moves an object the kernel is not using into the
//! graveyard (an object in use is refused with EBUSY, so a live mount's data is never
//! removed from under it), and the graveyard is then emptied by us.
//!
//! The kernel resolves `<name>` in the writer's current directory, which is per process:
//! the culls run on a thread of their own that first unshares its filesystem context
//! (`unshare(CLONE_FS)`), so the daemon's other threads keep their directory.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::device::{Device, DeviceError};

/// What culling one volume did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Culled {
    /// Objects moved to the graveyard, and their bytes on disk.
    pub objects: u64,
    pub bytes: u64,
    /// Objects the kernel refused because it still uses them.
    pub busy: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CullError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cull thread: {0}")]
    Thread(String),
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// Culls every object file under `volume` (a volume directory of the bound cache:
/// fan-out directories holding object files). Blocks until done.
pub fn cull_volume(device: &Device, volume: &Path) -> Result<Culled, CullError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| cull_on_this_thread(device, volume))
            .join()
            .map_err(|_| CullError::Thread("panicked".into()))?
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CullError + '_ {
    move |source| CullError::Io {
        path: path.to_owned(),
        source,
    }
}

fn cull_on_this_thread(device: &Device, volume: &Path) -> Result<Culled, CullError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
        .map_err(|e| CullError::Thread(format!("unshare(CLONE_FS): {e}")))?;
    let mut culled = Culled::default();
    let mut dirs = vec![volume.to_owned()];
    for entry in std::fs::read_dir(volume).map_err(io(volume))?.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            dirs.push(entry.path());
        }
    }
    for dir in &dirs {
        std::env::set_current_dir(dir).map_err(io(dir))?;
        for entry in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            match device.command(&format!("cull {name}")) {
                Ok(()) => {
                    culled.objects += 1;
                    culled.bytes += meta.blocks() * 512;
                }
                Err(DeviceError::Command { source, .. })
                    if source.raw_os_error() == Some(nix::libc::EBUSY) =>
                {
                    culled.busy += 1;
                }
                // Gone meanwhile (culled by the kernel itself, or a racing pass).
                Err(DeviceError::Command { source, .. })
                    if source.raw_os_error() == Some(nix::libc::ENOENT)
                        || source.raw_os_error() == Some(nix::libc::ESTALE) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(culled)
}

/// Empties the cache's graveyard (`<cache dir>/graveyard`), where culled objects go;
/// returns the bytes freed.
pub fn reap_graveyard(cache_dir: &Path) -> u64 {
    let graveyard = cache_dir.join("graveyard");
    let Ok(entries) = std::fs::read_dir(&graveyard) else {
        return 0;
    };
    let mut freed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let bytes = tree_bytes(&path);
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match removed {
            Ok(()) => freed += bytes,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot reap a culled object")
            }
        }
    }
    freed
}

/// Bytes on disk of the files under `path` (or of `path`).
pub fn tree_bytes(path: &Path) -> u64 {
    walk(path).iter().map(|m| m.blocks() * 512).sum()
}

fn walk(path: &Path) -> Vec<std::fs::Metadata> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Vec::new();
    };
    if !meta.is_dir() {
        return vec![meta];
    }
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            out.extend(walk(&entry.path()));
        }
    }
    out
}
