//! Which 4 KiB pages of a layer's data file hold fetched, verified bytes.
//!
//! The record on disk (`<layer>.present`) is written only after the data file is synced,
//! so it never claims a page the disk does not hold: after a crash it may miss pages
//! (fetched again), never the other way round. A page not in the record is never let
//! through to a reader: the sparse file holds zeros there.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Granularity of the record: the kernel's page, the EROFS block.
pub const PAGE: u64 = 4096;
const MAGIC: &[u8; 8] = b"LZEPRES1";

#[derive(Debug, Clone)]
pub struct Present {
    /// Bytes in the data file.
    size: u64,
    bits: Vec<u64>,
    count: u64,
    /// Changed since the last [`Present::save`].
    dirty: bool,
}

impl Present {
    pub fn new(size: u64) -> Self {
        let pages = size.div_ceil(PAGE);
        Self {
            size,
            bits: vec![0; usize::try_from(pages.div_ceil(64)).unwrap_or(0)],
            count: 0,
            dirty: false,
        }
    }

    /// The record at `path` for a data file of `size` bytes; an empty one if the file is
    /// missing or does not match (wrong size, damaged): refetching is always safe.
    pub fn load(path: &Path, size: u64) -> Self {
        let mut present = Self::new(size);
        let Ok(bytes) = std::fs::read(path) else {
            return present;
        };
        let words = present.bits.len();
        if bytes.len() != 16 + words * 8
            || &bytes[..8] != MAGIC
            || bytes[8..16] != size.to_le_bytes()
        {
            tracing::warn!(path = %path.display(), "present-chunk record does not match its layer; starting empty");
            return present;
        }
        for (word, raw) in present.bits.iter_mut().zip(bytes[16..].chunks_exact(8)) {
            *word = u64::from_le_bytes(raw.try_into().unwrap_or_default());
        }
        present.trim_tail();
        present.count = present.bits.iter().map(|w| u64::from(w.count_ones())).sum();
        present
    }

    /// Writes the record atomically (temp file, sync, rename). Call only after the data
    /// file itself is synced.
    pub fn save(&mut self, path: &Path) -> io::Result<()> {
        let tmp = PathBuf::from(format!("{}.tmp", path.display()));
        let mut file = File::create(&tmp)?;
        let mut bytes = Vec::with_capacity(16 + self.bits.len() * 8);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&self.size.to_le_bytes());
        for word in &self.bits {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        self.dirty = false;
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    pub fn is_complete(&self) -> bool {
        self.count == self.size.div_ceil(PAGE)
    }

    /// Bytes present, in whole pages.
    pub fn bytes(&self) -> u64 {
        let pages = self.size.div_ceil(PAGE);
        let short_tail = pages * PAGE - self.size;
        let tail_present = pages > 0 && self.contains((pages - 1) * PAGE, 1);
        self.count * PAGE - if tail_present { short_tail } else { 0 }
    }

    /// Records `[offset, offset + len)` as present. Only whole pages count, except the
    /// file's last page, which counts once written up to the end of the file.
    pub fn insert(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        let first = offset.div_ceil(PAGE);
        let last = if end == self.size {
            end.div_ceil(PAGE)
        } else {
            end / PAGE
        };
        for page in first..last {
            let (word, bit) = Self::slot(page);
            if self.bits[word] & bit == 0 {
                self.bits[word] |= bit;
                self.count += 1;
                self.dirty = true;
            }
        }
    }

    /// Whether every byte of `[offset, offset + len)` (clamped to the file) is present.
    /// Reads past the end of the file are the kernel's to answer (short reads).
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return true;
        }
        (offset / PAGE..end.div_ceil(PAGE)).all(|page| {
            let (word, bit) = Self::slot(page);
            self.bits[word] & bit != 0
        })
    }

    fn slot(page: u64) -> (usize, u64) {
        (
            usize::try_from(page / 64).unwrap_or(usize::MAX),
            1 << (page % 64),
        )
    }

    /// Clears bits past the last page (a damaged record must not count them).
    fn trim_tail(&mut self) {
        let pages = self.size.div_ceil(PAGE);
        if let Some(last) = self.bits.last_mut()
            && !pages.is_multiple_of(64)
        {
            *last &= (1u64 << (pages % 64)) - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_written_pages_count() {
        let mut present = Present::new(10 * PAGE + 100);
        present.insert(100, PAGE); // covers no whole page
        assert!(!present.contains(0, 1));
        assert!(!present.contains(PAGE, 1));
        present.insert(PAGE, 2 * PAGE);
        assert!(present.contains(PAGE, 2 * PAGE));
        assert!(!present.contains(PAGE, 2 * PAGE + 1));
        // The short last page counts once written to the end of the file.
        present.insert(10 * PAGE, 100);
        assert!(present.contains(10 * PAGE, PAGE * 5));
        assert!(
            present.contains(20 * PAGE, 1),
            "past the end is not ours to hold back"
        );
        assert_eq!(present.bytes(), 2 * PAGE + 100);
        assert!(!present.is_complete());
        present.insert(0, 11 * PAGE);
        assert!(present.is_complete());
    }

    #[test]
    fn record_round_trips_and_a_mismatch_starts_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("layer.present");
        let mut present = Present::new(100 * PAGE);
        present.insert(3 * PAGE, 5 * PAGE);
        present.save(&path).expect("save");
        assert!(!present.is_dirty());
        let loaded = Present::load(&path, 100 * PAGE);
        assert!(loaded.contains(3 * PAGE, 5 * PAGE));
        assert!(!loaded.contains(2 * PAGE, 1));
        assert_eq!(loaded.bytes(), 5 * PAGE);
        // Another size (a different layer under the name, or damage): nothing present.
        assert_eq!(Present::load(&path, 99 * PAGE).bytes(), 0);
        std::fs::write(&path, b"garbage").expect("write");
        assert_eq!(Present::load(&path, 100 * PAGE).bytes(), 0);
    }
}
