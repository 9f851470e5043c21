//! The fetcher's source for lazy layers in a registry. A layer is two fscache objects
//! (DESIGN.md): the EROFS metadata image (the `fsid` the snapshotter mounts) and the data
//! space (the device tag inside it). Both are views of one blob, read through one
//! [`BlobReader`]: the header + metadata + chunk table region is fetched once and checked
//! against the manifest's verified digest when the first view opens, and every data
//! chunk is checked against its sha256 before a byte of it reaches the kernel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lazy_erofs_image::blob::{BlobReader, RangeRead};
use lazy_erofs_image::registry::Registry;
use lazy_erofs_ondemand::{AlignedBuf, BlobSource, SourceError, SourceFactory};
use serde::{Deserialize, Serialize};

/// Which view of a lazy layer blob an fscache object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    Metadata,
    Data,
}

/// How the supervisor describes a lazy layer view to the fetcher (JSON in its blob
/// table). Holds no credentials: the fetcher's registry client has its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LazyLayerSpec {
    /// Image reference the blob belongs to (repository and registry to read from).
    pub image: String,
    /// The lazy layer blob's digest.
    pub digest: String,
    /// The manifest's `dev.lazy-erofs.layer.verified-digest`: the trust anchor.
    pub verified_digest: String,
    /// Length of the verified region (0: unknown, found from the header).
    #[serde(default)]
    pub region_len: u64,
    pub view: View,
}

/// Blocking ranged reads for [`BlobReader`], run on the blocking pool of a runtime
/// (never on one of its workers).
pub(crate) struct BlockingRegistryBlob {
    pub handle: tokio::runtime::Handle,
    pub registry: Arc<Registry>,
    pub image: String,
    pub digest: String,
}

impl RangeRead for BlockingRegistryBlob {
    fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        self.handle
            .block_on(
                self.registry
                    .read_range(&self.image, &self.digest, offset, len),
            )
            .map_err(std::io::Error::other)
    }
}

type Reader = Arc<BlobReader<BlockingRegistryBlob>>;

/// Opens lazy layer views; the two views of one blob share a reader. Reads run on the
/// blocking pool of the runtime that calls `open`.
pub struct LazySourceFactory {
    registry: Arc<Registry>,
    readers: Mutex<HashMap<(String, String), Reader>>,
}

impl LazySourceFactory {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            registry,
            readers: Mutex::default(),
        }
    }

    async fn reader(&self, name: &str, spec: &LazyLayerSpec) -> Result<Reader, SourceError> {
        let key = (spec.digest.clone(), spec.verified_digest.clone());
        if let Some(reader) = self.lock().get(&key) {
            return Ok(reader.clone());
        }
        let blob = BlockingRegistryBlob {
            handle: tokio::runtime::Handle::current(),
            registry: self.registry.clone(),
            image: spec.image.clone(),
            digest: spec.digest.clone(),
        };
        let (anchor, region_len) = (spec.verified_digest.clone(), spec.region_len);
        let reader =
            tokio::task::spawn_blocking(move || BlobReader::open_region(blob, &anchor, region_len))
                .await
                .map_err(|e| unavailable(name, format!("reader task: {e}")))?
                .map_err(|e| unavailable(name, format!("{}: {e}", spec.digest)))?;
        let reader = Arc::new(reader);
        self.lock().insert(key, reader.clone());
        Ok(reader)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Reader>> {
        self.readers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn unavailable(name: &str, reason: String) -> SourceError {
    SourceError::Unavailable {
        name: name.to_owned(),
        reason,
    }
}

#[async_trait]
impl SourceFactory for LazySourceFactory {
    async fn open(
        &self,
        name: &str,
        spec: &serde_json::Value,
    ) -> Result<Arc<dyn BlobSource>, SourceError> {
        let spec: LazyLayerSpec =
            serde_json::from_value(spec.clone()).map_err(|e| SourceError::BadSpec {
                name: name.to_owned(),
                reason: e.to_string(),
            })?;
        let reader = self.reader(name, &spec).await?;
        Ok(Arc::new(LazyLayerSource {
            reader,
            view: spec.view,
        }))
    }
}

/// One view of one lazy layer.
pub struct LazyLayerSource {
    reader: Reader,
    view: View,
}

impl std::fmt::Debug for LazyLayerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyLayerSource")
            .field("view", &self.view)
            .field("size", &self.size())
            .finish()
    }
}

#[async_trait]
impl BlobSource for LazyLayerSource {
    fn size(&self) -> u64 {
        match self.view {
            View::Metadata => self.reader.metadata().len() as u64,
            View::Data => self.reader.header().data_space_size,
        }
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<AlignedBuf, SourceError> {
        let read_error = |source: std::io::Error| SourceError::Read {
            offset,
            len,
            source,
        };
        let bytes = match self.view {
            View::Metadata => {
                let metadata = self.reader.metadata();
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                metadata
                    .get(start..start.saturating_add(len))
                    .ok_or(SourceError::Truncated {
                        offset,
                        len,
                        got: metadata.len().saturating_sub(start),
                    })?
                    .to_vec()
            }
            View::Data => {
                let reader = self.reader.clone();
                tokio::task::spawn_blocking(move || reader.read_data(offset, len as u64))
                    .await
                    .map_err(|e| read_error(std::io::Error::other(e)))?
                    .map_err(|e| read_error(std::io::Error::other(e)))?
            }
        };
        let mut buf = AlignedBuf::new(len);
        buf[..len].copy_from_slice(&bytes);
        Ok(buf)
    }
}
