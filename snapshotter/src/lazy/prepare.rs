//! A remote Prepare from start to end: the manifest looked up, the parent chain checked,
//! the image's upper layers mounted ahead, the layer mounted and its snapshot recorded
//! (by the snapshot store, through a callback), then the image's start-up regions and
//! prefetch list started. The snapshot store itself knows none of these steps.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use lazy_erofs_image::registry::Registry;
use tracing::Instrument;

use super::{LayerMounts, LayerResolver, LazyRecord, RemoteLayerRef};
use crate::api::SnapshotError;

/// What serving lazy layers takes: the manifest lookup and the layer mounts.
pub struct LazyLayers {
    resolver: LayerResolver,
    mounts: Arc<LayerMounts>,
}

/// How a remote Prepare ended.
#[derive(Debug)]
pub enum RemotePrepare {
    /// The layer is lazy: its snapshot is committed under this name (containerd expects
    /// AlreadyExists with it and skips the download).
    Committed(String),
    /// The manifest has the layer as an ordinary one: prepare it as usual, with these
    /// labels.
    Ordinary(HashMap<String, String>),
}

impl LazyLayers {
    pub fn new(registry: Arc<Registry>, mounts: LayerMounts) -> Self {
        Self {
            resolver: LayerResolver::new(registry),
            mounts: Arc::new(mounts),
        }
    }

    pub fn mounts(&self) -> &LayerMounts {
        &self.mounts
    }

    /// A Prepare carrying `remote`'s labels on `parent`. `record` mounts the layer and
    /// records the committed snapshot (false: it was recorded already); it runs after
    /// the manifest is resolved and the chain checked, with the layer's span current.
    pub async fn prepare<R, F>(
        &self,
        remote: RemoteLayerRef,
        parent: String,
        labels: HashMap<String, String>,
        record: R,
    ) -> Result<RemotePrepare, SnapshotError>
    where
        R: FnOnce(RemoteLayerRef, String, HashMap<String, String>, LazyRecord) -> F,
        F: Future<Output = Result<bool, SnapshotError>>,
    {
        // Its log lines (manifest, mount, first reads) carry the layer's names.
        let span = tracing::info_span!(
            "lazy_prepare",
            image = %remote.image_ref,
            layer = %remote.layer_digest,
            target = %remote.target
        );
        let Some(resolved) = self
            .resolver
            .resolve(&remote)
            .instrument(span.clone())
            .await?
        else {
            return Ok(RemotePrepare::Ordinary(labels));
        };
        remote.check_chain(&parent, &resolved.record.binding)?;
        let mounts = self.mounts.clone();
        span.in_scope(|| {
            super::layers::mount_ahead(resolved.above, move |layer| mounts.ensure(layer))
        });
        let target = remote.target.clone();
        let fresh = record(remote, parent, labels, resolved.record)
            .instrument(span)
            .await?;
        if fresh {
            self.mounts.open_startup(&resolved.startup);
            if let Some(plan) = resolved.prefetch {
                self.mounts.prefetch(plan);
            }
        }
        Ok(RemotePrepare::Committed(target))
    }
}
