//! The containerd side of a lazy pull: content, snapshots, the image record.

use std::collections::HashMap;

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    CreateImageRequest, Image, Info, UpdateImageRequest, UpdateRequest, WriteAction,
    WriteContentRequest, content_client::ContentClient, images_client::ImagesClient,
};
use containerd_client::types::Descriptor;
use futures::StreamExt;

use super::{Checked, PullError, PullOptions, Session};
use crate::lazy::remote;

/// Content, snapshots, image record. Returns how many layers were already there.
pub(super) async fn unpack(
    options: &PullOptions,
    session: &Session,
    checked: &Checked,
) -> Result<usize, PullError> {
    let manifest = &checked.pulled.manifest;
    let document = checked.pulled.manifest_document();
    let config_digest = manifest.config().digest().to_string();
    let top_chain = checked.chain.last().cloned().unwrap_or_default();

    let snapshot_ref = format!("containerd.io/gc.ref.snapshot.{}", options.snapshotter);
    let config_labels = HashMap::from([(snapshot_ref, top_chain)]);
    write_content(session, &config_digest, &checked.config, config_labels).await?;
    let manifest_labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_owned(),
        config_digest,
    )]);
    write_content(session, &document.digest, &document.bytes, manifest_labels).await?;

    let mut present = 0;
    for index in 0..checked.chain.len() {
        if prepare_layer(options, session, checked, index).await? == Layer::Present {
            present += 1;
        }
    }
    put_image(options, session, document).await?;
    Ok(present)
}

#[derive(Debug, PartialEq, Eq)]
enum Layer {
    Present,
    Prepared,
}

/// Has the snapshotter take layer `index` lazily: a Prepare with the remote-snapshot
/// labels, answered AlreadyExists once it committed the layer under its chain id.
async fn prepare_layer(
    options: &PullOptions,
    session: &Session,
    checked: &Checked,
    index: usize,
) -> Result<Layer, PullError> {
    let layer = &checked.pulled.manifest.layers()[index];
    let target = &checked.chain[index];
    let mut snapshots = SnapshotsClient::new(session.channel.clone());
    let stat = StatSnapshotRequest {
        snapshotter: options.snapshotter.clone(),
        key: target.clone(),
    };
    if snapshots.stat(session.leased(stat)).await.is_ok() {
        return Ok(Layer::Present);
    }
    let parent = match index {
        0 => String::new(),
        _ => checked.chain[index - 1].clone(),
    };
    let key = format!("extract-{}-{target}", std::process::id());
    let labels = [
        (remote::SNAPSHOT_REF, target.clone()),
        (remote::LAYER_DIGEST, layer.digest().to_string()),
        (remote::IMAGE_REF, options.image.clone()),
        (
            remote::MANIFEST_DIGEST,
            checked.pulled.manifest_document().digest.clone(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let prepare = PrepareSnapshotRequest {
        snapshotter: options.snapshotter.clone(),
        key: key.clone(),
        parent,
        labels,
    };
    let failed = |what: &str| format!("layer {} ({}): {what}", index + 1, layer.digest());
    match snapshots.prepare(session.leased(prepare)).await {
        Err(status) if status.code() == tonic::Code::AlreadyExists => Ok(Layer::Prepared),
        Err(status) => Err(PullError::containerd(failed("preparing"))(status)),
        Ok(_) => {
            // The snapshotter did not take the layer lazily: undo, say why.
            let remove = RemoveSnapshotRequest {
                snapshotter: options.snapshotter.clone(),
                key,
            };
            let _ = snapshots.remove(session.leased(remove)).await;
            Err(PullError::NotMountedLazily {
                index: index + 1,
                digest: layer.digest().to_string(),
                snapshotter: options.snapshotter.clone(),
            })
        }
    }
}

/// Creates the image record, or points an existing one at this manifest.
async fn put_image(
    options: &PullOptions,
    session: &Session,
    document: &lazy_erofs_image::registry::Document,
) -> Result<(), PullError> {
    let image = Image {
        name: options.image.clone(),
        labels: HashMap::new(),
        target: Some(Descriptor {
            media_type: document.media_type.clone(),
            digest: document.digest.clone(),
            size: document.bytes.len() as i64,
            annotations: HashMap::new(),
        }),
        created_at: None,
        updated_at: None,
    };
    let mut images = ImagesClient::new(session.channel.clone());
    let create = CreateImageRequest {
        image: Some(image.clone()),
        source_date_epoch: None,
    };
    match images.create(session.leased(create)).await {
        Ok(_) => Ok(()),
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            let update = UpdateImageRequest {
                image: Some(image),
                update_mask: None,
                source_date_epoch: None,
            };
            images
                .update(session.leased(update))
                .await
                .map_err(PullError::containerd("updating the image record"))?;
            Ok(())
        }
        Err(status) => Err(PullError::containerd("creating the image record")(status)),
    }
}

/// Writes one blob into containerd's content store (already there is fine) and sets
/// `labels` on it. The labels are set apart from the write: a blob another image already
/// brought (a converted image keeps its config) would not get them from a write, and
/// without the snapshot reference containerd's garbage collector removes the snapshots
/// as soon as the lease ends.
async fn write_content(
    session: &Session,
    digest: &str,
    bytes: &[u8],
    labels: HashMap<String, String>,
) -> Result<(), PullError> {
    write_blob(session, digest, bytes).await?;
    let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
    let update = UpdateRequest {
        info: Some(Info {
            digest: digest.to_owned(),
            labels,
            ..Info::default()
        }),
        update_mask: Some(prost_types::FieldMask { paths }),
    };
    ContentClient::new(session.channel.clone())
        .update(session.leased(update))
        .await
        .map_err(PullError::containerd(format!(
            "labelling {digest} in containerd's content store"
        )))?;
    Ok(())
}

async fn write_blob(session: &Session, digest: &str, bytes: &[u8]) -> Result<(), PullError> {
    let message = WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: format!("lazy-erofs-pull-{digest}"),
        total: bytes.len() as i64,
        expected: digest.to_owned(),
        offset: 0,
        data: bytes.to_vec(),
        labels: HashMap::new(),
    };
    let mut content = ContentClient::new(session.channel.clone());
    let request = session.leased(futures::stream::iter([message]));
    let failed = PullError::containerd(format!("writing {digest} to containerd"));
    let mut replies = match content.write(request).await {
        Ok(response) => response.into_inner(),
        Err(status) if status.code() == tonic::Code::AlreadyExists => return Ok(()),
        Err(status) => return Err(failed(status)),
    };
    while let Some(reply) = replies.next().await {
        match reply {
            Err(status) if status.code() != tonic::Code::AlreadyExists => {
                return Err(failed(status));
            }
            _ => {}
        }
    }
    Ok(())
}
