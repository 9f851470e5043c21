//! Lazy layers: a layer whose manifest descriptor marks it lazy is never downloaded by
//! containerd. On Prepare with the remote-snapshot labels ([`remote`]) the snapshotter
//! looks the layer up in its manifest ([`resolve`]), mounts its EROFS ([`layers`]) and
//! commits the snapshot itself. The fetcher serves the kernel's reads of those mounts
//! ([`source`]) — through fscache, or as file-backed mounts filled on fanotify events
//! ([`fanotify`]); without either the layer is fetched whole and mounted file-backed
//! ([`whole`]). Paths an image lists are read right after its top layer is
//! mounted ([`prefetch`]). [`prepare`] runs a remote Prepare through these steps.

mod fanotify;
pub mod layers;
pub mod prefetch;
mod prepare;
pub mod record;
pub mod remote;
pub mod resolve;
mod source;
mod whole;

use lazy_erofs_image::manifest::LazyLayer;
use serde::{Deserialize, Serialize};

pub use fanotify::fetch_metadata;
pub use layers::{Backend, LayerMounts};
pub use prepare::{LazyLayers, RemotePrepare};
pub use remote::RemoteLayerRef;
pub use resolve::{LayerResolver, Resolved};
pub use source::{LazyLayerSpec, LazySourceFactory, View};

/// What the store keeps about the lazy layer behind a committed snapshot: enough to
/// mount it again after a restart without asking the registry for the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LazyRecord {
    /// Image reference the blob is read from (registry and repository).
    pub image: String,
    pub digest: String,
    pub verified_digest: String,
    /// Length of the verified region, fetched in one request.
    pub region_len: u64,
    /// Size of the EROFS metadata image (0 in records of older versions: unknown).
    #[serde(default)]
    pub metadata_size: u64,
    pub data_space_size: u64,
    /// The manifest's chunk size (0 in records of older versions: unknown).
    #[serde(default)]
    pub chunk_size: u64,
    /// The manifest's start-up size (0 in records of older versions: none).
    #[serde(default)]
    pub startup_size: u64,
    /// The layer's diff id in its image's config: its verified digest bound to the
    /// repository it is read from (empty in records of older versions).
    #[serde(default)]
    pub binding: String,
    /// The metadata image's fscache name, from `binding` (shared by every image from
    /// this repository holding this layer, and by nothing else).
    pub fsid: String,
    /// The data device's tag inside the metadata image.
    pub data_tag: String,
}

impl LazyRecord {
    /// `image` is the pinned reference the layer is read from; `repository` its
    /// `registry/repository`.
    pub fn new(image: &str, repository: &str, layer: &LazyLayer) -> Self {
        let binding = layer.binding(repository);
        Self {
            fsid: lazy_erofs_image::manifest::layer_fsid(&binding),
            binding,
            image: image.to_owned(),
            digest: layer.digest.clone(),
            verified_digest: layer.verified_digest.clone(),
            region_len: layer.verified_region_len(),
            metadata_size: layer.metadata_size,
            data_space_size: layer.data_space_size,
            chunk_size: layer.chunk_size.into(),
            startup_size: layer.startup_size,
            data_tag: layer.data_tag(),
        }
    }

    /// How the fetcher is told about one view of this layer.
    pub fn spec(&self, view: View) -> LazyLayerSpec {
        LazyLayerSpec {
            image: self.image.clone(),
            digest: self.digest.clone(),
            verified_digest: self.verified_digest.clone(),
            region_len: self.region_len,
            size: match view {
                View::Metadata => self.metadata_size,
                View::Data => self.data_space_size,
            },
            view,
            chunk_size: self.chunk_size,
            startup_size: self.startup_size,
            throttle: None,
            kept_region: None,
        }
    }
}
