//! The lazy layer blob (format v1): one registry blob per layer, read by ranges.
//!
//! ```text
//! [ header, 4 KiB: magic, version, compression, chunk size, section offsets/lengths ]
//! [ EROFS metadata image ]
//! [ chunk table: per data-space chunk — offset, compressed offset/length, sha256 ]
//! [ data chunks: the data space cut into chunks, each compressed on its own ]
//! ```
//! Header, metadata and table form the *verified region*: its sha256 travels in the
//! manifest, so one check covers every chunk digest and the whole metadata image.

mod kept;
mod reader;
mod sealer;
mod writer;

pub use kept::{KeptFirst, KeptRegion, kept_header, write_rest as keep_region};
pub use reader::{BlobReader, RangeRead};
pub use sealer::default_threads;
pub use writer::{BlobInfo, BlobWriter, DataSpace, DataSpaceWriter};

use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"LZEROFS\x01";
pub const VERSION: u32 = 1;
pub const HEADER_SIZE: u64 = 4096;
pub const ENTRY_SIZE: usize = 56;
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Largest chunk a reader accepts (and the converter writes): a chunk is decompressed
/// into memory whole, and a tiny compressed chunk can claim gigabytes.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Largest verified region (header, metadata, chunk table) a reader accepts: it is read
/// into memory before its digest can be checked.
pub const MAX_REGION_SIZE: u64 = 512 << 20;

/// The most bytes a chunk of `chunk_size` may take stored: zstd's worst case.
pub fn max_stored_len(chunk_size: u32) -> u64 {
    zstd::zstd_safe::compress_bound(chunk_size as usize) as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd { level: i32 },
}

impl Compression {
    fn code(self) -> u32 {
        match self {
            Compression::None => 0,
            Compression::Zstd { .. } => 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a lazy layer blob (bad magic)")]
    Magic,
    #[error("unsupported lazy layer format version {0}")]
    Version(u32),
    #[error("unsupported compression code {0}")]
    Compression(u32),
    #[error("corrupt header: {0}")]
    Header(String),
    #[error("verified region digest mismatch: expected {expected}, got {actual}")]
    RegionDigest { expected: String, actual: String },
    #[error("chunk {index} digest mismatch: the bytes fetched are not the layer's")]
    ChunkDigest { index: usize },
    #[error("chunk {index}: {reason}")]
    Chunk { index: usize, reason: String },
    #[error("range {offset}+{len} is outside the data space ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
}

/// Section layout, as stored in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub compression_code: u32,
    pub chunk_size: u32,
    pub metadata_offset: u64,
    pub metadata_len: u64,
    pub table_offset: u64,
    pub table_len: u64,
    pub data_offset: u64,
    pub data_len: u64,
    pub data_space_size: u64,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; HEADER_SIZE as usize];
        out[0..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&self.compression_code.to_le_bytes());
        out[16..20].copy_from_slice(&self.chunk_size.to_le_bytes());
        let fields = [
            self.metadata_offset,
            self.metadata_len,
            self.table_offset,
            self.table_len,
            self.data_offset,
            self.data_len,
            self.data_space_size,
        ];
        for (i, v) in fields.iter().enumerate() {
            out[24 + i * 8..32 + i * 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, BlobError> {
        if bytes.len() < 80 || &bytes[0..8] != MAGIC {
            return Err(BlobError::Magic);
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32_at(8);
        if version != VERSION {
            return Err(BlobError::Version(version));
        }
        let header = Header {
            compression_code: u32_at(12),
            chunk_size: u32_at(16),
            metadata_offset: u64_at(24),
            metadata_len: u64_at(32),
            table_offset: u64_at(40),
            table_len: u64_at(48),
            data_offset: u64_at(56),
            data_len: u64_at(64),
            data_space_size: u64_at(72),
        };
        header.validate()?;
        Ok(header)
    }

    /// Sections in order, contiguous, sized consistently: anything else is corrupt.
    fn validate(&self) -> Result<(), BlobError> {
        let bad = |what: &str| Err(BlobError::Header(what.to_owned()));
        if self.compression_code > 1 {
            return Err(BlobError::Compression(self.compression_code));
        }
        if self.chunk_size == 0
            || !self.chunk_size.is_multiple_of(4096)
            || self.chunk_size > MAX_CHUNK_SIZE
        {
            return bad("chunk size must be a non-zero multiple of 4 KiB, at most 64 MiB");
        }
        if self.metadata_offset != HEADER_SIZE
            || self.table_offset != self.metadata_offset.saturating_add(self.metadata_len)
            || self.data_offset != self.table_offset.saturating_add(self.table_len)
        {
            return bad("sections are not contiguous after the header");
        }
        let chunks = self.data_space_size.div_ceil(u64::from(self.chunk_size));
        if self.table_len != chunks.saturating_mul(ENTRY_SIZE as u64) {
            return bad("chunk table length does not match the data space size");
        }
        // The verified region is read into memory whole: refuse absurd sizes.
        if self.data_offset > MAX_REGION_SIZE {
            return bad("metadata and chunk table larger than 512 MiB");
        }
        Ok(())
    }

    pub fn chunk_count(&self) -> usize {
        self.data_space_size.div_ceil(u64::from(self.chunk_size)) as usize
    }
}

/// One data chunk's entry in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Offset of the chunk in the data space (uncompressed).
    pub offset: u64,
    /// Offset of its stored bytes, relative to the data section.
    pub stored_offset: u64,
    pub stored_len: u32,
    /// 1 when the stored bytes are compressed, 0 when stored as they are.
    pub compressed: bool,
    /// sha256 of the uncompressed bytes.
    pub sha256: [u8; 32],
}

impl ChunkEntry {
    pub fn encode(&self) -> [u8; ENTRY_SIZE] {
        let mut out = [0u8; ENTRY_SIZE];
        out[0..8].copy_from_slice(&self.offset.to_le_bytes());
        out[8..16].copy_from_slice(&self.stored_offset.to_le_bytes());
        out[16..20].copy_from_slice(&self.stored_len.to_le_bytes());
        out[20..24].copy_from_slice(&u32::from(self.compressed).to_le_bytes());
        out[24..56].copy_from_slice(&self.sha256);
        out
    }

    pub fn decode(bytes: &[u8]) -> Self {
        let mut u64b = [0u8; 8];
        u64b.copy_from_slice(&bytes[0..8]);
        let offset = u64::from_le_bytes(u64b);
        u64b.copy_from_slice(&bytes[8..16]);
        let stored_offset = u64::from_le_bytes(u64b);
        let stored_len = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        let compressed = bytes[20] != 0;
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&bytes[24..56]);
        Self {
            offset,
            stored_offset,
            stored_len,
            compressed,
            sha256,
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A blob of a few zstd chunks and a 4 KiB metadata image.
    pub(crate) fn small_blob() -> (Vec<u8>, writer::BlobInfo) {
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 13 % 251) as u8).collect();
        blob(&data, Compression::Zstd { level: 3 })
    }

    fn blob(data: &[u8], compression: Compression) -> (Vec<u8>, writer::BlobInfo) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ds = DataSpaceWriter::new(compression, 8192, dir.path()).expect("writer");
        ds.write(data).expect("write");
        let ds = ds.finish().expect("finish");
        let mut out = Vec::new();
        let info = BlobWriter::assemble(&[7u8; 4096], ds, &mut out).expect("assemble");
        (out, info)
    }

    #[test]
    fn round_trip_both_compressions() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 256) as u8).collect();
        for compression in [Compression::None, Compression::Zstd { level: 3 }] {
            let (bytes, info) = blob(&data, compression);
            assert_eq!(info.size, bytes.len() as u64);
            let reader = BlobReader::open(&bytes[..], &info.verified_digest).expect("open");
            assert_eq!(reader.metadata(), &[7u8; 4096][..]);
            // Data space is padded to 4 KiB: 20 000 → 20 480 bytes, three 8 KiB chunks.
            assert_eq!(reader.header().data_space_size, 20_480);
            assert_eq!(
                reader.read_data(5000, 10_000).expect("read"),
                &data[5000..15_000]
            );
            assert!(reader.read_data(20_000, 1000).is_err(), "read past the end");
        }
    }

    #[test]
    fn wrong_region_digest_and_flipped_bits_are_caught() {
        let data = vec![42u8; 30_000];
        let (mut bytes, info) = blob(&data, Compression::Zstd { level: 3 });
        let other = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(
            BlobReader::open(&bytes[..], &other),
            Err(BlobError::RegionDigest { .. })
        ));
        // A flipped bit in the metadata region fails the region check.
        bytes[5000] ^= 1;
        assert!(matches!(
            BlobReader::open(&bytes[..], &info.verified_digest),
            Err(BlobError::RegionDigest { .. })
        ));
        bytes[5000] ^= 1;
        // A flipped bit in a data chunk is never returned as data.
        let last = bytes.len() - 3;
        bytes[last] ^= 1;
        let reader = BlobReader::open(&bytes[..], &info.verified_digest).expect("region intact");
        let chunks = reader.header().chunk_count();
        let err = reader
            .chunk(chunks - 1)
            .expect_err("flipped chunk accepted");
        assert!(
            matches!(err, BlobError::ChunkDigest { .. } | BlobError::Chunk { .. }),
            "{err}"
        );
    }

    /// Counts the range requests a reader makes.
    struct Counting<'a>(&'a [u8], std::rc::Rc<std::cell::Cell<usize>>);

    impl RangeRead for Counting<'_> {
        fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
            self.1.set(self.1.get() + 1);
            self.0.read_range(offset, len)
        }
    }

    #[test]
    fn the_region_hint_makes_opening_one_request_and_a_wrong_hint_costs_one_more() {
        let (bytes, info) = blob(&[9u8; 50_000], Compression::Zstd { level: 3 });
        // 4 KiB header + 4 KiB metadata + 7 chunk entries (50 000 → 53 248 B / 8 KiB).
        let region = HEADER_SIZE + 4096 + 7 * ENTRY_SIZE as u64;
        let whole = bytes.len() as u64;
        for (hint, requests) in [(region, 1), (0, 2), (region - 100, 2), (whole, 1)] {
            let count = std::rc::Rc::default();
            let source = Counting(&bytes, std::rc::Rc::clone(&count));
            let reader =
                BlobReader::open_region(source, &info.verified_digest, hint).expect("open");
            assert_eq!(count.get(), requests, "hint {hint}");
            assert_eq!(reader.metadata(), &[7u8; 4096][..]);
            assert_eq!(
                reader.read_data(0, 50_000).expect("data"),
                vec![9u8; 50_000]
            );
        }
    }

    #[test]
    fn adjacent_chunks_are_one_range_request_and_still_each_verified() {
        // 4 KiB chunks: a 1 MiB read is 256 chunks stored back to back.
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i * 31 % 251) as u8).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ds =
            DataSpaceWriter::new(Compression::Zstd { level: 3 }, 4096, dir.path()).expect("writer");
        ds.write(&data).expect("write");
        let ds = ds.finish().expect("finish");
        let mut bytes = Vec::new();
        let info = BlobWriter::assemble(&[7u8; 4096], ds, &mut bytes).expect("assemble");
        let count = std::rc::Rc::default();
        let reader = BlobReader::open(
            Counting(&bytes, std::rc::Rc::clone(&count)),
            &info.verified_digest,
        )
        .expect("open");
        let opened = count.get();
        assert_eq!(
            reader.read_data(0, 1 << 20).expect("read"),
            data,
            "bytes differ"
        );
        assert_eq!(count.get() - opened, 1, "range requests for 256 chunks");
        // A flipped bit in one of them fails the whole read.
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        let reader = BlobReader::open(&bytes[..], &info.verified_digest).expect("open");
        assert!(
            reader.read_data(0, 1 << 20).is_err(),
            "a corrupt chunk was served"
        );
    }

    #[test]
    fn corrupt_headers_are_refused() {
        let (bytes, _) = blob(b"x", Compression::None);
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(Header::decode(&bad), Err(BlobError::Magic)));
        let mut bad = bytes.clone();
        bad[8] = 9;
        assert!(matches!(Header::decode(&bad), Err(BlobError::Version(9))));
        let mut bad = bytes.clone();
        bad[48..56].copy_from_slice(&u64::MAX.to_le_bytes()); // table_len
        assert!(matches!(Header::decode(&bad), Err(BlobError::Header(_))));
        // A chunk size a reader would have to decompress into gigabytes.
        let mut bad = bytes.clone();
        bad[16..20].copy_from_slice(&0xFFFF_F000u32.to_le_bytes());
        let err = Header::decode(&bad).expect_err("4 GiB chunks accepted");
        assert!(err.to_string().contains("at most 64 MiB"), "{err}");
        assert!(matches!(
            Header::decode(&bytes[..10]),
            Err(BlobError::Magic)
        ));
    }
}
