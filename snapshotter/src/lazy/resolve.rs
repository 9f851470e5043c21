//! Which layer of which manifest a remote Prepare names, and whether it is lazy. The
//! manifest is fetched by digest (so the registry cannot substitute another) and kept,
//! the most recently used few hundred of them.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use lazy_erofs_image::manifest::{LazyLayer, layer_fsid};
use lazy_erofs_image::registry::{Registry, parse_reference};
use oci_spec::image::ImageManifest;

use super::prefetch::PrefetchPlan;
use super::{LazyRecord, RemoteLayerRef};
use crate::api::SnapshotError;

/// A remote Prepare's lazy layer, and for an image's top layer what to prefetch once it
/// is mounted.
#[derive(Debug)]
pub struct Resolved {
    pub record: LazyRecord,
    pub prefetch: Option<PrefetchPlan>,
    /// The image's lazy layers above this one, on the first Prepare of its manifest
    /// (empty afterwards): to mount ahead of their own Prepares.
    pub above: Vec<LazyRecord>,
    /// For an image's top layer: the image's lazy layers with a start-up region, whose
    /// fetch starts once it is mounted ([`LayerMounts::open_startup`]).
    ///
    /// [`LayerMounts::open_startup`]: super::layers::LayerMounts::open_startup
    pub startup: Vec<LazyRecord>,
}

/// Manifests kept: a Prepare of each layer of an image reads its manifest once, so a
/// node's working set of images is enough; each is bounded by the registry client.
const MANIFESTS_KEPT: NonZeroUsize = NonZeroUsize::new(256).expect("non-zero");

pub struct LayerResolver {
    registry: Arc<Registry>,
    manifests: Mutex<LruCache<String, Arc<ImageManifest>>>,
    /// Manifests whose upper layers were handed out to mount ahead.
    ahead: Mutex<LruCache<String, ()>>,
}

impl LayerResolver {
    pub fn new(registry: Arc<Registry>) -> Self {
        Self {
            registry,
            manifests: Mutex::new(LruCache::new(MANIFESTS_KEPT)),
            ahead: Mutex::new(LruCache::new(MANIFESTS_KEPT)),
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The lazy layer `remote` names, or `None` when the manifest has it as an ordinary
    /// layer (containerd then unpacks it as usual).
    pub async fn resolve(
        &self,
        remote: &RemoteLayerRef,
    ) -> Result<Option<Resolved>, SnapshotError> {
        let reference = parse_reference(&remote.image_ref).map_err(|e| {
            SnapshotError::InvalidArgument(format!("image reference {:?}: {e}", remote.image_ref))
        })?;
        let repository = format!("{}/{}", reference.registry(), reference.repository());
        let pinned = format!("{repository}@{}", remote.manifest_digest);
        let manifest = self.manifest(&pinned).await?;
        let descriptor = manifest
            .layers()
            .iter()
            .find(|d| d.digest().to_string() == remote.layer_digest)
            .ok_or_else(|| {
                SnapshotError::InvalidArgument(format!(
                    "{pinned} has no layer {}",
                    remote.layer_digest
                ))
            })?;
        let lazy = |d| {
            LazyLayer::from_descriptor(d)
                .map_err(|e| SnapshotError::InvalidArgument(format!("{pinned}: {e}")))
        };
        let Some(layer) = lazy(descriptor)? else {
            return Ok(None);
        };
        // Prefetch starts with the top layer, when every layer below is mounted too.
        let is_top = manifest
            .layers()
            .last()
            .is_some_and(|d| d.digest().to_string() == remote.layer_digest);
        let startup = if is_top {
            manifest
                .layers()
                .iter()
                .filter_map(|d| lazy(d).ok().flatten())
                .filter(|l| l.startup_size > 0)
                .map(|l| LazyRecord::new(&pinned, &repository, &l))
                .collect()
        } else {
            Vec::new()
        };
        let prefetch = if is_top {
            let fsids: Option<Vec<String>> = manifest
                .layers()
                .iter()
                .rev()
                .map(|d| {
                    lazy(d)
                        .ok()
                        .flatten()
                        .map(|l| layer_fsid(&l.binding(&repository)))
                })
                .collect();
            fsids.and_then(|fsids| PrefetchPlan::from_manifest(&pinned, &manifest, fsids))
        } else {
            None
        };
        let first = self
            .ahead
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .put(pinned.clone(), ())
            .is_none();
        let above = if first {
            manifest
                .layers()
                .iter()
                .skip_while(|d| d.digest().to_string() != remote.layer_digest)
                .skip(1)
                .filter_map(|d| lazy(d).ok().flatten())
                .map(|l| LazyRecord::new(&pinned, &repository, &l))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Some(Resolved {
            record: LazyRecord::new(&pinned, &repository, &layer),
            prefetch,
            above,
            startup,
        }))
    }

    async fn manifest(&self, pinned: &str) -> Result<Arc<ImageManifest>, SnapshotError> {
        if let Some(m) = self.lock().get(pinned) {
            return Ok(m.clone());
        }
        let (manifest, _) =
            self.registry.pull_manifest(pinned).await.map_err(|e| {
                SnapshotError::Unavailable(format!("fetching manifest {pinned}: {e}"))
            })?;
        let manifest = Arc::new(manifest);
        self.lock().put(pinned.to_owned(), manifest.clone());
        Ok(manifest)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<String, Arc<ImageManifest>>> {
        self.manifests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
