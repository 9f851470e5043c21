//! Writing a lazy layer blob: the data space is chunked and compressed as it streams in
//! (to a temporary file), then header, metadata, table and data are assembled.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::sealer::{Sealed, Sealer};
use super::{BlobError, ChunkEntry, Compression, ENTRY_SIZE, HEADER_SIZE, Header, hex};

/// Streams the layer's file contents into the data space: fixed-size chunks, each
/// hashed and compressed independently as soon as it is full, on several threads
/// ([`super::sealer`]). Memory: the chunks in flight plus the encoders.
pub struct DataSpaceWriter {
    compression: Compression,
    sealer: Sealer,
    chunk_size: usize,
    buf: Vec<u8>,
    position: u64,
    stored: BufWriter<File>,
    stored_len: u64,
    entries: Vec<ChunkEntry>,
}

/// A finished data space, ready to be assembled into a blob.
pub struct DataSpace {
    compression: Compression,
    chunk_size: u32,
    pub entries: Vec<ChunkEntry>,
    pub size: u64,
    /// The stored chunks, in data-space order: one file per lane (see [`Self::then`]).
    stored: Vec<(File, u64)>,
    pub stored_len: u64,
    /// Bytes at the start holding the files the image reads as it starts (0: none).
    pub startup_size: u64,
}

impl DataSpace {
    /// This data space (the start-up lane, a whole number of chunks) followed by `rest`,
    /// whose data-space offsets move up by [`Self::size`].
    pub fn then(mut self, rest: DataSpace) -> Result<DataSpace, BlobError> {
        if !self.size.is_multiple_of(u64::from(self.chunk_size)) {
            return Err(BlobError::Io(io::Error::other(
                "a start-up lane must end on a chunk boundary",
            )));
        }
        self.startup_size = self.size;
        for mut entry in rest.entries {
            entry.offset += self.size;
            entry.stored_offset += self.stored_len;
            self.entries.push(entry);
        }
        self.size += rest.size;
        self.stored_len += rest.stored_len;
        self.stored.extend(rest.stored);
        Ok(self)
    }
}

impl DataSpaceWriter {
    /// A writer sealing chunks on every core ([`Self::with_threads`] 0).
    pub fn new(
        compression: Compression,
        chunk_size: u32,
        temp_dir: &Path,
    ) -> Result<Self, BlobError> {
        Self::with_threads(compression, chunk_size, 0, temp_dir)
    }

    /// `threads` seal chunks (0: this machine's cores); the output is the same for any.
    pub fn with_threads(
        compression: Compression,
        chunk_size: u32,
        threads: usize,
        temp_dir: &Path,
    ) -> Result<Self, BlobError> {
        Ok(Self {
            compression,
            sealer: Sealer::new(compression, threads, chunk_size as usize),
            chunk_size: chunk_size as usize,
            buf: Vec::with_capacity(chunk_size as usize),
            position: 0,
            stored: BufWriter::new(tempfile::tempfile_in(temp_dir)?),
            stored_len: 0,
            entries: Vec::new(),
        })
    }

    /// Current offset in the data space.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Pads with zeros to the next chunk boundary (where a following lane starts).
    pub fn align_chunk(&mut self) -> Result<(), BlobError> {
        let chunk = self.chunk_size as u64;
        let pad = (self.position.div_ceil(chunk) * chunk - self.position) as usize;
        self.write(&vec![0u8; pad])
    }

    /// Pads with zeros to the next multiple of 4 KiB (file data starts block-aligned).
    pub fn align_block(&mut self) -> Result<(), BlobError> {
        let pad = (self.position.div_ceil(4096) * 4096 - self.position) as usize;
        self.write(&vec![0u8; pad])
    }

    pub fn write(&mut self, mut bytes: &[u8]) -> Result<(), BlobError> {
        while !bytes.is_empty() {
            let room = self.chunk_size - self.buf.len();
            let n = room.min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            self.position += n as u64;
            bytes = &bytes[n..];
            if self.buf.len() == self.chunk_size {
                self.flush_chunk()?;
            }
        }
        Ok(())
    }

    fn flush_chunk(&mut self) -> Result<(), BlobError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk_size));
        let sealed = self.sealer.submit(chunk)?;
        self.store(sealed)
    }

    /// Appends sealed chunks (in data-space order) to the stored bytes and the table.
    fn store(&mut self, sealed: Vec<Sealed>) -> Result<(), BlobError> {
        for chunk in sealed {
            self.stored.write_all(&chunk.bytes)?;
            let offset = self.entries.len() as u64 * self.chunk_size as u64;
            self.entries.push(ChunkEntry {
                offset,
                stored_offset: self.stored_len,
                stored_len: chunk.bytes.len() as u32,
                compressed: chunk.compressed,
                sha256: chunk.sha256,
            });
            self.stored_len += chunk.bytes.len() as u64;
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<DataSpace, BlobError> {
        self.align_block()?;
        self.flush_chunk()?;
        let rest = self.sealer.finish()?;
        self.store(rest)?;
        let stored = self
            .stored
            .into_inner()
            .map_err(|e| BlobError::Io(e.into_error()))?;
        Ok(DataSpace {
            compression: self.compression,
            chunk_size: self.chunk_size as u32,
            entries: self.entries,
            size: self.position,
            stored: vec![(stored, self.stored_len)],
            stored_len: self.stored_len,
            startup_size: 0,
        })
    }
}

/// What the manifest needs to know about a written blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// `sha256:<hex>` of the whole blob (its registry digest).
    pub digest: String,
    pub size: u64,
    /// `sha256:<hex>` of header + metadata + chunk table.
    pub verified_digest: String,
    pub metadata_len: u64,
    pub data_space_size: u64,
    pub chunk_size: u32,
    /// Data-space bytes at the start holding the image's start-up files (0: none).
    pub startup_size: u64,
}

pub struct BlobWriter;

impl BlobWriter {
    /// Writes the whole blob to `out`.
    pub fn assemble(
        metadata: &[u8],
        mut data: DataSpace,
        out: impl Write,
    ) -> Result<BlobInfo, BlobError> {
        let table: Vec<u8> = data.entries.iter().flat_map(|e| e.encode()).collect();
        debug_assert_eq!(table.len(), data.entries.len() * ENTRY_SIZE);
        let header = Header {
            compression_code: data.compression.code(),
            chunk_size: data.chunk_size,
            metadata_offset: HEADER_SIZE,
            metadata_len: metadata.len() as u64,
            table_offset: HEADER_SIZE + metadata.len() as u64,
            table_len: table.len() as u64,
            data_offset: HEADER_SIZE + metadata.len() as u64 + table.len() as u64,
            data_len: data.stored_len,
            data_space_size: data.size,
        };
        let mut out = HashingWriter {
            inner: out,
            hash: Sha256::new(),
            written: 0,
        };
        out.write_all(&header.encode())?;
        out.write_all(metadata)?;
        out.write_all(&table)?;
        let verified_digest = format!("sha256:{}", hex(&out.hash.clone().finalize()));
        // 1 MiB at a time: io::copy's 8 KiB buffer cost two syscalls per 8 KiB.
        let mut buf = vec![0u8; 1 << 20];
        for (stored, len) in &mut data.stored {
            stored.seek(SeekFrom::Start(0))?;
            let mut left = *len;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                stored
                    .read_exact(&mut buf[..n])
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::UnexpectedEof => {
                            io::Error::other("data section shorter than written")
                        }
                        _ => e,
                    })?;
                out.write_all(&buf[..n])?;
                left -= n as u64;
            }
        }
        out.flush()?;
        Ok(BlobInfo {
            digest: format!("sha256:{}", hex(&out.hash.finalize())),
            size: out.written,
            verified_digest,
            metadata_len: metadata.len() as u64,
            data_space_size: data.size,
            chunk_size: data.chunk_size,
            startup_size: data.startup_size,
        })
    }
}

struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
