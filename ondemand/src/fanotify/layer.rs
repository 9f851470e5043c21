//! A lazy layer's files under the cache directory and its file-backed mount.
//!
//! `<name>.meta`: the verified metadata image, whole (the kernel reads metadata through
//! the page cache at mount time, raising no events, so it cannot be lazy).
//! `<name>.data`: the data space as a sparse file of its full size, filled on demand.
//! `<name>.present`: which of its pages are filled. `<name>.region`: the rest of the
//! blob's verified region (header and chunk table), so the fetcher reads the region from
//! the node instead of the registry. `name` derives from the layer's verified digest, so
//! two images sharing a layer share its files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use super::broker::LayerFiles;

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting {meta} (device {data}) at {target}: {source}")]
    Mount {
        meta: PathBuf,
        data: PathBuf,
        target: PathBuf,
        #[source]
        source: nix::errno::Errno,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LayerError + '_ {
    move |source| LayerError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Paths of layer `name`'s files in `dir`.
pub fn files(dir: &Path, name: &str) -> (PathBuf, LayerFiles) {
    let meta = dir.join(format!("{name}.meta"));
    let files = LayerFiles {
        name: name.to_owned(),
        data: dir.join(format!("{name}.data")),
        present: dir.join(format!("{name}.present")),
    };
    (meta, files)
}

/// Path of layer `name`'s kept region file in `dir` (besides the metadata image).
pub fn region(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.region"))
}

/// Whether the verified metadata image is in place (it is renamed in last).
pub fn has_metadata(meta: &Path) -> bool {
    meta.is_file()
}

/// Writes the verified metadata image atomically.
pub fn write_metadata(meta: &Path, bytes: &[u8]) -> Result<(), LayerError> {
    let dir = meta.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    tmp.write_all(bytes).map_err(io_err(meta))?;
    tmp.as_file().sync_all().map_err(io_err(meta))?;
    tmp.persist(meta).map_err(|e| io_err(meta)(e.error))?;
    Ok(())
}

/// Creates the sparse data file of `size` bytes unless it exists at that size. A file of
/// another size is not this layer's: it is replaced, its record with it.
pub fn ensure_data_file(files: &LayerFiles, size: u64) -> Result<(), LayerError> {
    if let Ok(meta) = std::fs::metadata(&files.data)
        && meta.len() == size
    {
        return Ok(());
    }
    let _ = std::fs::remove_file(&files.present);
    let file: File = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&files.data)
        .map_err(io_err(&files.data))?;
    file.set_len(size).map_err(io_err(&files.data))?;
    file.sync_all().map_err(io_err(&files.data))?;
    Ok(())
}

/// Mounts the metadata image read-only at `target`, file-backed, with the data file as
/// its device. Through mount(2): `mount(8)` would set up a loop device, whose reads
/// raise no fanotify events.
pub fn mount(meta: &Path, data: Option<&Path>, target: &Path) -> Result<(), LayerError> {
    let options = data.map(|d| format!("device={}", d.display()));
    nix::mount::mount(
        Some(meta),
        target,
        Some("erofs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        options.as_deref(),
    )
    .map_err(|source| LayerError::Mount {
        meta: meta.to_owned(),
        data: data.map(Path::to_owned).unwrap_or_default(),
        target: target.to_owned(),
        source,
    })
}

/// Whether anyone but this call has `path` open: a mount's backing file counts, attached
/// or detached (see [`crate::sys::nobody_else_has_open`]). A missing file is not in use.
pub fn in_use(path: &Path) -> std::io::Result<bool> {
    use std::os::fd::AsFd;
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => Ok(!crate::sys::nobody_else_has_open(file.as_fd())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes a layer file, first freeing its blocks (a process still holding it, such as a
/// fetcher's write handle, would otherwise keep them). Only for files no mount uses.
/// Returns the bytes freed.
pub fn discard(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let file = match OpenOptions::new().write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let freed = meta.blocks() * 512;
    if meta.len() > 0 {
        let len = i64::try_from(meta.len()).unwrap_or(i64::MAX);
        nix::fcntl::fallocate(
            &file,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            0,
            len,
        )
        .map_err(std::io::Error::from)?;
    }
    std::fs::remove_file(path)?;
    Ok(freed)
}

/// Unmounts `target`; one still in use is detached instead (its open files keep
/// reading, so whoever holds the group must keep answering for them).
pub fn unmount(target: &Path) -> nix::Result<()> {
    match nix::mount::umount(target) {
        Err(nix::errno::Errno::EBUSY) => {
            tracing::info!(target = %target.display(), "layer busy; detached");
            nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH)
        }
        other => other,
    }
}
