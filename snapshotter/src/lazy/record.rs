//! What an image read as it started. After one run of a container on freshly mounted
//! lazy layers, the files with pages in the page cache are the ones it read: the kernel
//! reads a file only into its page cache, and a fresh layer mount starts with none.
//! Their paths are the image's start-up set, written as a prefetch list for
//! `lazy-erofs convert --prefetch`, which lays those files out first.
//!
//! Page-cache residency, not the fetcher's READs, because it names files (what the
//! converter lays out), on every backend, without parsing the EROFS metadata. It counts
//! the kernel's own readahead too, which is what a run would read again.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use lazy_erofs_ondemand::cached_bytes;

/// The start-up set of the layers walked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StartupSet {
    /// Absolute paths inside the image, sorted; a path read in several layers once.
    pub paths: BTreeSet<String>,
    /// Bytes of those files in the page cache: what the run read.
    pub bytes: u64,
    /// Their sizes, summed: what laying them out first makes a fetcher fetch.
    pub file_bytes: u64,
    /// Regular files looked at.
    pub files_walked: u64,
    /// Files whose page cache could not be looked at (logged, left out).
    pub failed: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("walking {path}")]
    Walk {
        path: PathBuf,
        #[source]
        source: walkdir::Error,
    },
}

/// Walks each layer root in `layers` (a mounted layer, or any directory tree), never
/// following a symlink or leaving its filesystem, and collects the regular files with
/// pages in the page cache. A file that cannot be opened is skipped (it was not read).
pub fn startup_set(layers: &[PathBuf]) -> Result<StartupSet, RecordError> {
    let mut set = StartupSet::default();
    for root in layers {
        walk(root, &mut set)?;
    }
    Ok(set)
}

fn walk(root: &Path, set: &mut StartupSet) -> Result<(), RecordError> {
    let entries = walkdir::WalkDir::new(root)
        .follow_links(false)
        .same_file_system(true);
    for entry in entries {
        let entry = entry.map_err(|source| RecordError::Walk {
            path: root.to_owned(),
            source,
        })?;
        if !entry.file_type().is_file() {
            continue;
        }
        set.files_walked += 1;
        // O_NONBLOCK: never wait on a file lock; opening reads no data.
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW)
            .open(entry.path())
        else {
            continue;
        };
        let size = file.metadata().map_or(0, |m| m.len());
        let Ok(cached) = cached_bytes(file.as_fd(), size) else {
            tracing::warn!(path = %entry.path().display(), "cannot tell what of it was read");
            set.failed += 1;
            continue;
        };
        if cached == 0 {
            continue;
        }
        set.bytes += cached;
        set.file_bytes += size;
        let Ok(relative) = entry.path().strip_prefix(root) else {
            continue;
        };
        // A prefetch list is text, one path per line: a name it cannot hold is left out.
        match relative.to_str() {
            Some(path) if !path.contains('\n') => {
                set.paths.insert(format!("/{path}"));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// Evicts a file's pages (written and synced first, so they can go).
    fn evict(path: &Path) {
        let file = std::fs::File::open(path).expect("open");
        nix::fcntl::posix_fadvise(
            &file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .expect("fadvise");
    }

    #[test]
    fn only_files_read_since_their_pages_were_dropped_are_listed() {
        // In the source tree, not /tmp: tmpfs pages cannot be dropped.
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).expect("tempdir");
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
        for (name, len) in [("usr/bin/python3", 300_000), ("usr/bin/perl", 200_000)] {
            let mut file = std::fs::File::create(root.join(name)).expect("create");
            file.write_all(&vec![7u8; len]).expect("write");
            file.sync_all().expect("sync");
        }
        std::os::unix::fs::symlink("python3", root.join("usr/bin/python")).expect("symlink");
        evict(&root.join("usr/bin/python3"));
        evict(&root.join("usr/bin/perl"));
        let before = startup_set(&[root.to_owned()]).expect("walk");
        assert!(
            before.paths.is_empty(),
            "pages stayed cached after POSIX_FADV_DONTNEED: {before:?}"
        );
        let mut head = [0u8; 5000];
        std::io::Read::read_exact(
            &mut std::fs::File::open(root.join("usr/bin/python")).expect("open"),
            &mut head,
        )
        .expect("read");
        let set = startup_set(&[root.to_owned()]).expect("walk");
        assert_eq!(
            set.paths.iter().collect::<Vec<_>>(),
            ["/usr/bin/python3"],
            "the file read through its symlink, nothing else"
        );
        assert!(
            set.bytes >= 8192 && set.bytes <= 300_000 + 4096,
            "{} bytes",
            set.bytes
        );
        assert_eq!(set.files_walked, 2);
    }
}
