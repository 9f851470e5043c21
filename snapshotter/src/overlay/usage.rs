//! Disk usage of a snapshot's own directory, as containerd counts it: allocated blocks
//! (`st_blocks` × 512) and distinct inodes, hard links counted once.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::api::{SnapshotError, Usage};

pub fn disk_usage(dir: &Path) -> Result<Usage, SnapshotError> {
    let mut seen = HashSet::new();
    let mut size = 0i64;
    for entry in walkdir::WalkDir::new(dir) {
        let entry = entry.map_err(|e| SnapshotError::Io {
            context: format!("usage of {}", dir.display()),
            source: e.into(),
        })?;
        let meta = entry.metadata().map_err(|e| SnapshotError::Io {
            context: format!("usage of {}", entry.path().display()),
            source: e.into(),
        })?;
        if seen.insert((meta.dev(), meta.ino())) {
            size += (meta.blocks() * 512) as i64;
        }
    }
    Ok(Usage {
        inodes: seen.len() as i64,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_links_count_once() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("a"), vec![1u8; 10_000])?;
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b"))?;
        std::fs::create_dir(dir.path().join("d"))?;
        let usage = disk_usage(dir.path())?;
        // The directory itself, the file (once), the subdirectory.
        assert_eq!(usage.inodes, 3);
        assert!(usage.size >= 10_000, "{usage:?}");
        Ok(())
    }
}
