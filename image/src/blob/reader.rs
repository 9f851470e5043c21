//! Reading a lazy layer blob by ranges, verifying everything before returning it.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{
    BlobError, ChunkEntry, ENTRY_SIZE, HEADER_SIZE, Header, MAX_REGION_SIZE, hex, max_stored_len,
};

/// The most stored bytes one range request of [`BlobReader::read_data`] asks for.
pub const MAX_MERGED_READ: u64 = 8 << 20;

/// Ranged access to a blob (a local file, or a registry with range requests).
pub trait RangeRead {
    /// Exactly `len` bytes at `offset`, or an error.
    fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>>;
}

impl RangeRead for std::fs::File {
    fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; usize::try_from(len).map_err(std::io::Error::other)?];
        self.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

impl RangeRead for &[u8] {
    fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len() as u64);
        match end {
            Some(end) => Ok(self[offset as usize..end as usize].to_vec()),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "range past the end",
            )),
        }
    }
}

/// A blob whose verified region (header, metadata, chunk table) matched the digest from
/// the manifest. Metadata bytes and data-space bytes it returns are verified.
pub struct BlobReader<R> {
    source: R,
    header: Header,
    metadata: Vec<u8>,
    entries: Vec<ChunkEntry>,
}

impl<R: RangeRead> BlobReader<R> {
    /// Reads and verifies the region `[0, data_offset)` against `verified_digest`
    /// (`sha256:<hex>`), in one read after the header.
    pub fn open(source: R, verified_digest: &str) -> Result<Self, BlobError> {
        Self::open_region(source, verified_digest, HEADER_SIZE)
    }

    /// Like [`open`](Self::open), reading the first `region_hint` bytes in one request:
    /// with the region's length from the manifest (see `LazyLayer::verified_region_len`)
    /// the whole verified region is one request. The header decides; a short or wrong
    /// hint only costs a second request.
    pub fn open_region(
        source: R,
        verified_digest: &str,
        region_hint: u64,
    ) -> Result<Self, BlobError> {
        // The hint comes from a manifest: bounded like the region itself.
        let hint = region_hint.clamp(HEADER_SIZE, MAX_REGION_SIZE);
        let mut head = source.read_range(0, hint)?;
        let header = Header::decode(head.get(..HEADER_SIZE as usize).ok_or(BlobError::Magic)?)?;
        let region = usize::try_from(header.data_offset)
            .map_err(|_| BlobError::Header("verified region too large".into()))?;
        if head.len() < region {
            let missing = source.read_range(head.len() as u64, (region - head.len()) as u64)?;
            head.extend_from_slice(&missing);
        }
        head.truncate(region);
        let rest = head.split_off(HEADER_SIZE as usize);
        let mut hash = Sha256::new();
        hash.update(&head);
        hash.update(&rest);
        let actual = format!("sha256:{}", hex(&hash.finalize()));
        if actual != verified_digest {
            return Err(BlobError::RegionDigest {
                expected: verified_digest.to_owned(),
                actual,
            });
        }
        let meta_end = header.metadata_len as usize;
        let metadata = rest[..meta_end].to_vec();
        let entries: Vec<ChunkEntry> = rest[meta_end..]
            .chunks_exact(ENTRY_SIZE)
            .map(ChunkEntry::decode)
            .collect();
        for (index, e) in entries.iter().enumerate() {
            let expected_offset = index as u64 * u64::from(header.chunk_size);
            let in_bounds = e
                .stored_offset
                .checked_add(u64::from(e.stored_len))
                .and_then(|end| end.checked_add(header.data_offset).map(|_| end))
                .is_some_and(|end| end <= header.data_len)
                && u64::from(e.stored_len) <= max_stored_len(header.chunk_size);
            if e.offset != expected_offset || !in_bounds {
                return Err(BlobError::Chunk {
                    index,
                    reason: "table entry out of place or out of bounds".into(),
                });
            }
        }
        Ok(Self {
            source,
            header,
            metadata,
            entries,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The chunk table (verified).
    pub fn entries(&self) -> &[ChunkEntry] {
        &self.entries
    }

    /// What the blob is read from.
    #[cfg(test)]
    pub(crate) fn source(&self) -> &R {
        &self.source
    }

    /// The EROFS metadata image (verified).
    pub fn metadata(&self) -> &[u8] {
        &self.metadata
    }

    /// Fetches, decompresses and verifies chunk `index` of the data space.
    pub fn chunk(&self, index: usize) -> Result<Vec<u8>, BlobError> {
        let entry = self.entry(index)?;
        // In bounds: checked when the table was read.
        let stored = self.source.read_range(
            self.header.data_offset.saturating_add(entry.stored_offset),
            u64::from(entry.stored_len),
        )?;
        self.decode(index, &stored)
    }

    fn entry(&self, index: usize) -> Result<&ChunkEntry, BlobError> {
        self.entries.get(index).ok_or(BlobError::Chunk {
            index,
            reason: "no such chunk".into(),
        })
    }

    /// Chunk `index` from its stored bytes: decompressed and checked against its digest.
    fn decode(&self, index: usize, stored: &[u8]) -> Result<Vec<u8>, BlobError> {
        self.decode_timed(index, stored, &mut Timings::default())
    }

    /// [`Self::decode`], adding the time it decompressed and hashed to `timings`.
    fn decode_timed(
        &self,
        index: usize,
        stored: &[u8],
        timings: &mut Timings,
    ) -> Result<Vec<u8>, BlobError> {
        let mut bytes = vec![0; self.chunk_len(index)?];
        self.decode_into(index, stored, &mut bytes, timings)?;
        Ok(bytes)
    }

    /// The uncompressed length of chunk `index`.
    fn chunk_len(&self, index: usize) -> Result<usize, BlobError> {
        let entry = self.entry(index)?;
        Ok(
            (self.header.data_space_size - entry.offset).min(u64::from(self.header.chunk_size))
                as usize,
        )
    }

    /// Chunk `index` from its stored bytes into `out` (its uncompressed length),
    /// decompressed and checked against its digest. On an error `out` holds unverified
    /// bytes: the caller must drop them.
    fn decode_into(
        &self,
        index: usize,
        stored: &[u8],
        out: &mut [u8],
        timings: &mut Timings,
    ) -> Result<(), BlobError> {
        let entry = self.entry(index)?;
        let started = Instant::now();
        let len = if entry.compressed {
            zstd::bulk::decompress_to_buffer(stored, out).map_err(|e| BlobError::Chunk {
                index,
                reason: format!("zstd: {e}"),
            })?
        } else {
            let len = stored.len().min(out.len());
            out[..len].copy_from_slice(&stored[..len]);
            stored.len()
        };
        if len != out.len() {
            return Err(BlobError::Chunk {
                index,
                reason: format!("{len} bytes, expected {}", out.len()),
            });
        }
        let decompressed = Instant::now();
        timings.decompress += decompressed - started;
        let digest: [u8; 32] = Sha256::digest(&*out).into();
        timings.verify += decompressed.elapsed();
        if digest != entry.sha256 {
            return Err(BlobError::ChunkDigest { index });
        }
        Ok(())
    }

    /// Chunks `first..last` as runs stored back to back, each run at most
    /// [`MAX_MERGED_READ`] stored bytes (a single larger chunk is a run of its own): the
    /// index range of each run and its stored bytes' offset and length in the data
    /// section.
    fn runs(
        &self,
        first: usize,
        last: usize,
    ) -> Result<Vec<(std::ops::Range<usize>, u64, u64)>, BlobError> {
        // A table shorter than the data space it claims (a hostile blob can be
        // consistent with its own digest) fails the read, like a missing chunk.
        if last > self.entries.len() {
            return Err(BlobError::Chunk {
                index: self.entries.len(),
                reason: "no such chunk".into(),
            });
        }
        let mut runs = Vec::new();
        let mut index = first;
        while index < last {
            let start = self.entries[index].stored_offset;
            let mut end = start + u64::from(self.entries[index].stored_len);
            let run_first = index;
            index += 1;
            while index < last {
                let e = &self.entries[index];
                let next_end = e.stored_offset + u64::from(e.stored_len);
                if e.stored_offset != end || next_end - start > MAX_MERGED_READ {
                    break;
                }
                end = next_end;
                index += 1;
            }
            runs.push((run_first..index, start, end - start));
        }
        Ok(runs)
    }

    /// `len` verified bytes of the data space at `offset`.
    pub fn read_data(&self, offset: u64, len: u64) -> Result<Vec<u8>, BlobError> {
        let size = self.header.data_space_size;
        let len = usize::try_from(len)
            .ok()
            .filter(|_| offset.checked_add(len).is_some_and(|e| e <= size))
            .ok_or(BlobError::OutOfRange { offset, len, size })?;
        let mut out = vec![0; len];
        self.read_data_into(offset, &mut out)?;
        Ok(out)
    }

    /// Fills `out` with verified bytes of the data space at `offset`: whole chunks are
    /// decompressed straight into it, with no copy of their own. On an error `out` holds
    /// unverified bytes: the caller must drop them.
    pub fn read_data_into(&self, offset: u64, out: &mut [u8]) -> Result<(), BlobError> {
        let size = self.header.data_space_size;
        let len = out.len() as u64;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= size)
            .ok_or(BlobError::OutOfRange { offset, len, size })?;
        let chunk = u64::from(self.header.chunk_size);
        let (first, last) = ((offset / chunk) as usize, end.div_ceil(chunk) as usize);
        let mut timings = Timings::default();
        let runs = self.runs(first, last)?;
        // Adjacent chunks are fetched in one range request: small chunks would otherwise
        // cost a round trip each.
        for (indices, stored_offset, stored_len) in &runs {
            let (indices, stored_offset) = (indices.clone(), *stored_offset);
            let asked = Instant::now();
            let stored = self.source.read_range(
                self.header.data_offset.saturating_add(stored_offset),
                *stored_len,
            )?;
            timings.range += asked.elapsed();
            for index in indices {
                let entry = &self.entries[index];
                let from = (entry.stored_offset - stored_offset) as usize;
                let piece = stored
                    .get(from..from + entry.stored_len as usize)
                    .ok_or_else(|| BlobError::Chunk {
                        index,
                        reason: "short range read".into(),
                    })?;
                let start = index as u64 * chunk;
                let chunk_len = self.chunk_len(index)? as u64;
                let (from, to) = (offset.max(start), end.min(start + chunk_len));
                let into = &mut out[(from - offset) as usize..(to - offset) as usize];
                if from == start && to == start + chunk_len {
                    self.decode_into(index, piece, into, &mut timings)?;
                } else {
                    // A chunk the range cuts: verified whole, then the part asked for.
                    let bytes = self.decode_timed(index, piece, &mut timings)?;
                    into.copy_from_slice(&bytes[(from - start) as usize..(to - start) as usize]);
                }
            }
        }
        // The per-READ trace (`RUST_LOG=…,read_trace=debug`): where a fetch's time went.
        tracing::debug!(
            target: "read_trace",
            offset,
            len,
            requests = runs.len(),
            chunks = last - first,
            range_us = timings.range.as_micros() as u64,
            decompress_us = timings.decompress.as_micros() as u64,
            verify_us = timings.verify.as_micros() as u64,
            "data"
        );
        Ok(())
    }
}

/// Time one data read spent in range requests, decompression and hashing.
#[derive(Debug, Default)]
struct Timings {
    range: Duration,
    decompress: Duration,
    verify: Duration,
}
