//! A verified region kept on a node, so that a second reader of the blob there need not
//! fetch it again: the fanotify backend keeps the metadata image whole (it mounts that
//! file), and the rest of the region (the header, then the chunk table) beside it. The
//! fetcher reads both back as the blob's first bytes and checks them against the
//! manifest's digest like a region fetched from the registry: a kept file that was
//! changed, cut short or left from another blob fails that check, never a READ.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{BlobError, BlobReader, HEADER_SIZE, Header, RangeRead};

/// The header of a region kept as `rest` (see [`write_rest`]). Unverified: only good for
/// skipping a fetch when it agrees with what the caller expects (the fetcher checks the
/// whole kept region against the digest before serving from it).
pub fn kept_header(rest: &Path) -> Result<Header, BlobError> {
    let mut bytes = vec![0u8; HEADER_SIZE as usize];
    File::open(rest)?.read_exact_at(&mut bytes, 0)?;
    Header::decode(&bytes)
}

/// Writes the region of `reader`'s blob without its metadata image to `path`,
/// atomically: the header, then the chunk table, as the blob holds them. Not synced: a
/// file a crash cut short fails the digest when read, and the region is fetched instead.
pub fn write_rest<R: RangeRead>(reader: &BlobReader<R>, path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(&reader.header().encode())?;
    for entry in reader.entries() {
        tmp.write_all(&entry.encode())?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// The kept region, read as one: `[header | metadata image | chunk table]`.
pub struct KeptRegion {
    rest: File,
    metadata: File,
    metadata_len: u64,
    len: u64,
}

impl KeptRegion {
    /// The region kept as `rest` (see [`write_rest`]) and `metadata`.
    pub fn open(rest: &Path, metadata: &Path) -> io::Result<Self> {
        let (rest, metadata) = (File::open(rest)?, File::open(metadata)?);
        let metadata_len = metadata.metadata()?.len();
        let rest_len = rest.metadata()?.len();
        if rest_len < HEADER_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "kept region shorter than a header",
            ));
        }
        Ok(Self {
            rest,
            metadata,
            metadata_len,
            len: rest_len + metadata_len,
        })
    }

    /// The region's length: where the blob's data section starts.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies region bytes `[offset, offset + out.len())` from the file holding each.
    fn read_into(&self, mut offset: u64, mut out: &mut [u8]) -> io::Result<()> {
        let table_at = HEADER_SIZE + self.metadata_len;
        while !out.is_empty() {
            let (file, at, left) = if offset < HEADER_SIZE {
                (&self.rest, offset, HEADER_SIZE - offset)
            } else if offset < table_at {
                (&self.metadata, offset - HEADER_SIZE, table_at - offset)
            } else {
                (&self.rest, offset - self.metadata_len, u64::MAX)
            };
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(out.len());
            let (now, later) = out.split_at_mut(n);
            file.read_exact_at(now, at)?;
            offset += n as u64;
            out = later;
        }
        Ok(())
    }
}

/// A blob whose kept region is read from the node and everything else from `then`.
pub struct KeptFirst<R> {
    pub kept: Option<KeptRegion>,
    pub then: R,
}

impl<R: RangeRead> RangeRead for KeptFirst<R> {
    fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let Some(kept) = self.kept.as_ref().filter(|kept| offset < kept.len()) else {
            return self.then.read_range(offset, len);
        };
        // A range past the region (a hint longer than it) takes the rest from `then`.
        let local = len.min(kept.len() - offset);
        let mut buf = vec![0u8; usize::try_from(local).map_err(io::Error::other)?];
        kept.read_into(offset, &mut buf)?;
        if local < len {
            buf.extend(self.then.read_range(offset + local, len - local)?);
        }
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::blob::BlobError;

    /// A registry stand-in that counts what it is asked for.
    struct Counting<'a> {
        blob: &'a [u8],
        asked: RefCell<Vec<(u64, u64)>>,
    }

    impl RangeRead for Counting<'_> {
        fn read_range(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
            self.asked.borrow_mut().push((offset, len));
            self.blob.read_range(offset, len)
        }
    }

    /// The blob, its anchor and its region's length (the manifest's hint).
    fn blob() -> (Vec<u8>, String, u64) {
        let (blob, info) = crate::blob::tests::small_blob();
        let region = BlobReader::open(&blob[..], &info.verified_digest)
            .expect("open")
            .header()
            .data_offset;
        (blob, info.verified_digest, region)
    }

    fn keep(blob: &[u8], anchor: &str, dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let reader = BlobReader::open(blob, anchor).expect("open");
        let (rest, meta) = (dir.join("x.region"), dir.join("x.meta"));
        write_rest(&reader, &rest).expect("write rest");
        std::fs::write(&meta, reader.metadata()).expect("write meta");
        (rest, meta)
    }

    #[test]
    fn a_kept_region_is_verified_and_only_data_is_fetched() {
        let (blob, anchor, region) = blob();
        let dir = tempfile::tempdir().expect("tempdir");
        let (rest, meta) = keep(&blob, &anchor, dir.path());
        let kept = KeptRegion::open(&rest, &meta).expect("kept");
        let remote = Counting {
            blob: &blob,
            asked: RefCell::default(),
        };
        let reader = BlobReader::open_region(
            KeptFirst {
                kept: Some(kept),
                then: remote,
            },
            &anchor,
            region,
        )
        .expect("the kept region verifies");
        let from_registry = BlobReader::open(&blob[..], &anchor).expect("open");
        assert_eq!(reader.metadata(), from_registry.metadata());
        let size = reader.header().data_space_size;
        assert_eq!(
            reader.read_data(0, size).expect("data"),
            from_registry.read_data(0, size).expect("data")
        );
        let data_offset = reader.header().data_offset;
        let asked = reader_source_asked(&reader);
        assert!(!asked.is_empty(), "the data came from the registry");
        assert!(
            asked.iter().all(|&(offset, _)| offset >= data_offset),
            "the region was fetched again: {asked:?}"
        );
    }

    fn reader_source_asked(reader: &BlobReader<KeptFirst<Counting<'_>>>) -> Vec<(u64, u64)> {
        reader.source().then.asked.borrow().clone()
    }

    #[test]
    fn a_changed_kept_file_fails_the_digest() {
        let (blob, anchor, region) = blob();
        let dir = tempfile::tempdir().expect("tempdir");
        let (rest, meta) = keep(&blob, &anchor, dir.path());
        let mut bytes = std::fs::read(&rest).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&rest, &bytes).expect("write");
        let kept = KeptRegion::open(&rest, &meta).expect("kept");
        let opened = BlobReader::open_region(
            KeptFirst {
                kept: Some(kept),
                then: &blob[..],
            },
            &anchor,
            region,
        );
        assert!(
            matches!(opened, Err(BlobError::RegionDigest { .. })),
            "a changed chunk table must not verify"
        );
        std::fs::write(&rest, b"short").expect("write");
        assert!(
            KeptRegion::open(&rest, &meta).is_err(),
            "shorter than a header"
        );
    }
}
