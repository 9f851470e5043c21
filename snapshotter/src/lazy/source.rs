//! The fetcher's source for lazy layers in a registry. A layer is two fscache objects
//! (DESIGN.md): the EROFS metadata image (the `fsid` the snapshotter mounts) and the data
//! space (the device tag inside it). Both are views of one blob, read through one
//! [`BlobReader`]: the header + metadata + chunk table region is fetched once and checked
//! against the manifest's verified digest before the first byte of either view is
//! served, and every data chunk is checked against its sha256 before a byte of it
//! reaches the kernel.
//!
//! When the description carries the view's size (the snapshotter's always does), OPEN
//! needs no registry: the region is fetched on the first READ. A registry that is down
//! then fails READs — EIO after the fetcher's retries — instead of OPENs, which the
//! kernel would re-send for as long as a reader waits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lazy_erofs_image::blob::{BlobError, BlobReader, KeptFirst, KeptRegion, RangeRead};
use lazy_erofs_image::registry::{Credentials, Registry};
use lazy_erofs_ondemand::{
    AlignedBuf, BlobSource, BlobSpec, KeptRegionFiles, RegistryCredentials, SourceError,
    SourceFactory,
};
pub use lazy_erofs_ondemand::{LazyLayerSpec, View};

/// Blocking ranged reads for [`BlobReader`], run on the blocking pool of a runtime
/// (never on one of its workers).
#[derive(Clone)]
pub(crate) struct BlockingRegistryBlob {
    pub handle: tokio::runtime::Handle,
    pub registry: Arc<Registry>,
    pub image: String,
    pub digest: String,
}

impl BlockingRegistryBlob {
    /// The layer's blob, read on the current tokio runtime (call on a blocking thread).
    pub(crate) fn of_layer(layer: &super::LazyRecord, registry: &Arc<Registry>) -> Self {
        Self {
            handle: tokio::runtime::Handle::current(),
            registry: registry.clone(),
            image: layer.image.clone(),
            digest: layer.digest.clone(),
        }
    }
}

impl RangeRead for BlockingRegistryBlob {
    fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        self.handle
            .block_on(
                self.registry
                    .read_range(&self.image, &self.digest, offset, len),
            )
            // The log line a failed READ leaves names the registry that failed it.
            .map_err(|e| std::io::Error::other(format!("registry {}: {e}", self.image)))
    }
}

/// The verified region from the node when it keeps it, everything else from the registry.
type Reader = BlobReader<KeptFirst<BlockingRegistryBlob>>;

/// One lazy layer blob: its verifying reader, made once, when first needed.
struct LazyBlob {
    reader: tokio::sync::OnceCell<Reader>,
    registry: Arc<Registry>,
    image: String,
    digest: String,
    verified_digest: String,
    region_len: u64,
    kept: Option<KeptRegionFiles>,
}

impl LazyBlob {
    async fn reader(&self) -> Result<&Reader, SourceError> {
        self.reader
            .get_or_try_init(|| async {
                let remote = BlockingRegistryBlob {
                    handle: tokio::runtime::Handle::current(),
                    registry: self.registry.clone(),
                    image: self.image.clone(),
                    digest: self.digest.clone(),
                };
                let (anchor, region_len) = (self.verified_digest.clone(), self.region_len);
                let asked = std::time::Instant::now();
                let (digest, kept) = (self.digest.clone(), self.kept.clone());
                tokio::task::spawn_blocking(move || {
                    let started = std::time::Instant::now();
                    let (reader, from) = open_region(remote, kept.as_ref(), &anchor, region_len);
                    // Where a lazy mount's first READ waits: the blocking pool, then
                    // the region's range request (or the node's copy), verification and
                    // parsing.
                    tracing::debug!(
                        target: "read_trace",
                        %digest,
                        region_len,
                        from,
                        pool_us = (started - asked).as_micros() as u64,
                        open_us = started.elapsed().as_micros() as u64,
                        "region"
                    );
                    reader
                })
                .await
                .map_err(|e| unavailable(&self.digest, format!("reader task: {e}")))?
                .map_err(|e| unavailable(&self.digest, e.to_string()))
            })
            .await
    }
}

/// The blob's verified region from the node's copy when there is one that passes the
/// check against `anchor`, else from the registry. Returns where it came from.
fn open_region(
    remote: BlockingRegistryBlob,
    kept: Option<&KeptRegionFiles>,
    anchor: &str,
    region_len: u64,
) -> (Result<Reader, BlobError>, &'static str) {
    let open = |kept| {
        let then = remote.clone();
        BlobReader::open_region(KeptFirst { kept, then }, anchor, region_len)
    };
    let local = kept.and_then(|files| {
        KeptRegion::open(&files.rest, &files.metadata)
            .inspect_err(
                |err| tracing::debug!(rest = %files.rest.display(), %err, "no kept region"),
            )
            .ok()
    });
    if let Some(local) = local {
        match open(Some(local)) {
            Ok(reader) => return (Ok(reader), "node"),
            Err(err) => {
                tracing::warn!(digest = %remote.digest, %err, "the kept region fails its check; fetching it");
            }
        }
    }
    (open(None), "registry")
}

/// Which blob a reader reads: its image (registry and repository: a layer is read from
/// the repository it was pulled from, never another's), digest and trust anchor.
type BlobKey = (String, String, String);

/// Blob readers kept with no view open before the unused ones are dropped.
const BLOBS_KEPT: usize = 64;

/// Opens lazy layer views; the two views of one blob share a reader. Reads run on the
/// blocking pool of the runtime that calls `open`.
pub struct LazySourceFactory {
    registry: Arc<Registry>,
    blobs: Mutex<HashMap<BlobKey, Arc<LazyBlob>>>,
}

impl LazySourceFactory {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            registry,
            blobs: Mutex::default(),
        }
    }

    fn blob(&self, spec: &LazyLayerSpec) -> Arc<LazyBlob> {
        let key = (
            spec.image.clone(),
            spec.digest.clone(),
            spec.verified_digest.clone(),
        );
        let mut blobs = self
            .blobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A reader holds its layer's verified metadata: keep only those some view still
        // uses, once there are more than a node mounts at a time.
        if blobs.len() >= BLOBS_KEPT && !blobs.contains_key(&key) {
            blobs.retain(|_, blob| Arc::strong_count(blob) > 1);
        }
        blobs
            .entry(key)
            .or_insert_with(|| {
                Arc::new(LazyBlob {
                    reader: tokio::sync::OnceCell::new(),
                    registry: self.registry.clone(),
                    image: spec.image.clone(),
                    digest: spec.digest.clone(),
                    verified_digest: spec.verified_digest.clone(),
                    region_len: spec.region_len,
                    kept: spec.kept_region.clone(),
                })
            })
            .clone()
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
    async fn open(&self, name: &str, spec: &BlobSpec) -> Result<Arc<dyn BlobSource>, SourceError> {
        let BlobSpec::Registry(spec) = spec else {
            return Err(lazy_erofs_ondemand::source::wrong_kind(name, spec));
        };
        let blob = self.blob(spec);
        let size = if spec.size > 0 {
            spec.size
        } else {
            let reader = blob
                .reader()
                .await
                .map_err(|e| unavailable(name, e.to_string()))?;
            match spec.view {
                View::Metadata => reader.metadata().len() as u64,
                View::Data => reader.header().data_space_size,
            }
        };
        // The data device is opened after the mount read the (verified) superblock, so
        // its size can be checked before the kernel is told it.
        if let Some(reader) = blob.reader.get() {
            check_size(reader, spec.view, size).map_err(|reason| unavailable(name, reason))?;
        }
        // Data is stored in the blob's chunks; the fetcher fetches whole ones. The size
        // comes from the description, never from a registry request at OPEN: a re-OPEN
        // after a fetcher restart must not wait on the registry (READs retry, OPENs not).
        let piece = match spec.view {
            View::Data if spec.chunk_size > 0 => Some(spec.chunk_size),
            _ => None,
        };
        let source = LazyLayerSource {
            blob,
            view: spec.view,
            size,
            piece,
            startup: match spec.view {
                View::Data => spec.startup_size.min(size),
                View::Metadata => 0,
            },
        };
        Ok(match spec.throttle {
            Some(throttle) => Arc::new(lazy_erofs_ondemand::source::Throttled::new(
                source, throttle,
            )),
            None => Arc::new(source),
        })
    }

    fn provide_credentials(&self, credentials: &RegistryCredentials) {
        let given = Credentials::Basic {
            username: credentials.username.clone(),
            password: credentials.password.clone(),
        };
        if let Err(err) = self
            .registry
            .provide_credentials(&credentials.registry, &given)
        {
            tracing::warn!(registry = %credentials.registry, %err, "credentials not taken");
        }
    }
}

/// A view's size as the manifest gave it must be what the verified header says: a
/// smaller data space would let the kernel read past it as zeros, a larger one EIO.
fn check_size(reader: &Reader, view: View, size: u64) -> Result<(), String> {
    let (what, verified) = match view {
        View::Metadata => ("metadata", reader.metadata().len() as u64),
        View::Data => ("data space", reader.header().data_space_size),
    };
    if verified == size {
        Ok(())
    } else {
        Err(format!(
            "the verified {what} is {verified} bytes, the manifest says {size}"
        ))
    }
}

/// One view of one lazy layer.
pub struct LazyLayerSource {
    blob: Arc<LazyBlob>,
    view: View,
    size: u64,
    /// The blob's chunk size, for the data view.
    piece: Option<u64>,
    /// The manifest's start-up size, for the data view.
    startup: u64,
}

impl std::fmt::Debug for LazyLayerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyLayerSource")
            .field("digest", &self.blob.digest)
            .field("view", &self.view)
            .field("size", &self.size)
            .finish()
    }
}

#[async_trait]
impl BlobSource for LazyLayerSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn origin(&self) -> String {
        format!("registry {} blob {}", self.blob.image, self.blob.digest)
    }

    fn piece_size(&self) -> Option<u64> {
        self.piece
    }

    fn startup_len(&self) -> u64 {
        self.startup
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<AlignedBuf, SourceError> {
        let read_error = |source: std::io::Error| SourceError::Read {
            offset,
            len,
            source,
        };
        let reader = self
            .blob
            .reader()
            .await
            .map_err(|e| read_error(std::io::Error::other(e.to_string())))?;
        check_size(reader, self.view, self.size)
            .map_err(|reason| read_error(std::io::Error::other(reason)))?;
        let mut buf = AlignedBuf::new(len);
        match self.view {
            View::Metadata => {
                let metadata = reader.metadata();
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let bytes = metadata.get(start..start.saturating_add(len)).ok_or(
                    SourceError::Truncated {
                        offset,
                        len,
                        got: metadata.len().saturating_sub(start),
                    },
                )?;
                buf[..len].copy_from_slice(bytes);
                Ok(buf)
            }
            // Verified chunks are decompressed straight into the buffer the kernel gets.
            View::Data => {
                let (blob, span) = (self.blob.clone(), tracing::Span::current());
                let name = self.blob.digest.clone();
                tokio::task::spawn_blocking(move || -> Result<AlignedBuf, SourceError> {
                    let _read = span.entered();
                    let reader = blob
                        .reader
                        .get()
                        .ok_or_else(|| unavailable(&blob.digest, "reader gone".to_owned()))?;
                    // On an error the buffer (unverified bytes) is dropped here.
                    reader
                        .read_data_into(offset, &mut buf[..len])
                        .map_err(|e| match e {
                            BlobError::ChunkDigest { .. } => SourceError::Unverified {
                                name: blob.digest.clone(),
                                reason: e.to_string(),
                            },
                            e => SourceError::Read {
                                offset,
                                len,
                                source: std::io::Error::other(e.to_string()),
                            },
                        })?;
                    Ok(buf)
                })
                .await
                .map_err(|e| unavailable(&name, format!("reader task: {e}")))?
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use lazy_erofs_image::registry::RegistryOptions;

    use super::*;

    fn spec(n: usize) -> LazyLayerSpec {
        LazyLayerSpec {
            image: "registry.test/app:1".into(),
            digest: format!("sha256:{n:064x}"),
            verified_digest: format!("sha256:{:064x}", n + 1),
            region_len: 0,
            size: 0,
            view: View::Data,
            chunk_size: 0,
            startup_size: 0,
            throttle: None,
            kept_region: None,
        }
    }

    #[test]
    fn readers_no_view_uses_are_dropped_and_those_in_use_kept() {
        let factory = LazySourceFactory::new(Arc::new(Registry::new(&RegistryOptions::default())));
        let in_use = factory.blob(&spec(0));
        for n in 1..1000 {
            drop(factory.blob(&spec(n)));
        }
        let kept = factory.blobs.lock().expect("lock").len();
        assert!(kept <= BLOBS_KEPT, "{kept} readers kept");
        assert!(Arc::ptr_eq(&in_use, &factory.blob(&spec(0))));
    }
}
