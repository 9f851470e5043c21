//! OCI layer tar (plain, gzip or zstd) → lazy layer blob, in one streaming pass.
//!
//! File contents go straight into the data space (chunked and compressed as they
//! stream); the tree of names and metadata stays in memory — O(entries), plus at most
//! one 1 MiB chunk and inline files of up to [`INLINE_MAX`] bytes each — whatever the
//! layer's size. At the end the EROFS metadata is written and the blob assembled.

mod image;
mod inflate;
mod lanes;
mod layer_tree;

use std::io::{self, Read, Write};
use std::path::Path;

use crate::blob::{BlobError, BlobInfo, BlobWriter, Compression, DEFAULT_CHUNK_SIZE, hex};
use crate::erofs::{ErofsError, TreeError, WriteOptions, write_metadata};
pub use image::{ImageError, LayerReport, convert_layout};
pub(crate) use image::{is_index, platform_matches};
pub use lanes::{Lane, Lanes};
pub use layer_tree::LayerTree;

/// Files up to this size live inline in the metadata (they come with the first fetch).
pub const INLINE_MAX: u64 = 2048;

#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub compression: Compression,
    pub chunk_size: u32,
    /// Tag of the data device inside the EROFS image (its fscache cookie name); default
    /// [`crate::manifest::data_tag`] of the layer's diff id.
    pub data_tag: Option<String>,
    /// Paths the image reads as it starts (see [`crate::manifest::parse_prefetch_list`]),
    /// stored on the manifest; empty keeps the source manifest's list, if any. The files
    /// they name (directories: everything below) are laid out first in each layer's
    /// data space ([`lanes`]), and the layer says how far they reach
    /// ([`crate::manifest::annotation::STARTUP_SIZE`]).
    pub prefetch: Vec<String>,
    /// `registry/repository` the converted image will be served from: its config binds
    /// every lazy layer to it ([`crate::manifest::layer_binding`]). Whole-image
    /// conversion refuses to run without it.
    pub repository: Option<String>,
    /// Threads hashing and compressing chunks (0: this machine's cores); the output is
    /// the same for any count.
    pub threads: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            compression: Compression::Zstd { level: 3 },
            chunk_size: DEFAULT_CHUNK_SIZE,
            data_tag: None,
            prefetch: Vec::new(),
            repository: None,
            threads: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("reading the layer: {0}")]
    Io(#[from] io::Error),
    #[error("layer tar entry {entry}: {reason}")]
    Entry { entry: String, reason: String },
    #[error("tar entry path {0:?} escapes the layer root ('..')")]
    PathEscapes(String),
    #[error("tar entry {0:?} appears twice")]
    Duplicate(String),
    #[error("hard link {path:?} → {target:?}: {reason}")]
    HardLink {
        path: String,
        target: String,
        reason: String,
    },
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Erofs(#[from] ErofsError),
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("the data space exceeds 16 TiB")]
    TooLarge,
}

/// The outcome of converting one layer.
#[derive(Debug, Clone)]
pub struct ConvertedLayer {
    pub blob: BlobInfo,
    /// `sha256:<hex>` of the uncompressed tar: the layer's diff id.
    pub diff_id: String,
    /// Bytes read from the (possibly compressed) source.
    pub source_size: u64,
    pub entries: u64,
    /// The data device's tag written into the metadata.
    pub data_tag: String,
}

/// Converts a layer read from `input` into a blob written to `out`. `temp_dir` holds the
/// compressed data section until the metadata is known.
pub fn convert_layer(
    input: impl Read + Send,
    out: impl Write,
    options: &ConvertOptions,
    temp_dir: &Path,
) -> Result<ConvertedLayer, ConvertError> {
    let mut data = Lanes::new(options, temp_dir)?;
    let mut tree = LayerTree::new();
    let mut entries = 0u64;
    let inflated = std::thread::scope(|scope| {
        let (mut tar_stream, inflating) = inflate::spawn(scope, input);
        let parsed = parse(&mut tar_stream, &mut tree, &mut data, &mut entries);
        // Dropping the stream ends the inflating thread early if parsing failed.
        drop(tar_stream);
        let inflated = inflating
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("inflating the layer panicked")));
        parsed?;
        Ok::<_, ConvertError>(inflated?)
    })?;
    let diff_id = format!("sha256:{}", hex(&inflated.tar_sha256));
    let data = tree.finish_data(data)?;
    let data_blocks = u32::try_from(data.size / 4096).map_err(|_| ConvertError::TooLarge)?;
    let data_tag = options
        .data_tag
        .clone()
        .unwrap_or_else(|| crate::manifest::data_tag(&diff_id));
    let metadata = write_metadata(
        tree.fs_tree(),
        &WriteOptions {
            data_tag: data_tag.clone(),
            data_blocks,
        },
    )?;
    let blob = BlobWriter::assemble(&metadata, data, out)?;
    Ok(ConvertedLayer {
        blob,
        diff_id,
        source_size: inflated.source_size,
        entries,
        data_tag,
    })
}

/// Every tar entry of `tar_stream` into `tree` and `data`, then the rest of the stream
/// (what follows the end-of-archive marker still counts for the diff id).
fn parse(
    tar_stream: &mut impl Read,
    tree: &mut LayerTree,
    data: &mut Lanes,
    entries: &mut u64,
) -> Result<(), ConvertError> {
    {
        let mut archive = tar::Archive::new(&mut *tar_stream);
        for entry in archive.entries()? {
            let entry = entry.map_err(|e| ConvertError::Entry {
                entry: format!("#{}", *entries + 1),
                reason: e.to_string(),
            })?;
            tree.add(entry, data)?;
            *entries += 1;
        }
    }
    io::copy(tar_stream, &mut io::sink())?;
    Ok(())
}
