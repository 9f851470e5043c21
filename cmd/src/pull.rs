//! `lazy-erofs pull IMAGE`: makes a converted image runnable by containerd without
//! downloading its layers. The manifest and config go into containerd's content store;
//! each layer is prepared through containerd's Snapshots service with the
//! remote-snapshot labels, so the snapshotter mounts it lazily and answers
//! AlreadyExists; then the image record is created. All under a lease, so containerd's
//! garbage collector cannot take anything half done.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    CreateImageRequest, CreateRequest, DeleteRequest, Image, Info, UpdateImageRequest,
    UpdateRequest, WriteAction, WriteContentRequest, content_client::ContentClient,
    images_client::ImagesClient, leases_client::LeasesClient,
};
use containerd_client::types::Descriptor;
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::Registry;
use lazy_erofs_snapshotter::lazy::remote;
use oci_spec::image::ImageConfiguration;
use tonic::transport::Channel;

use crate::registry_args::RegistryArgs;

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image reference, e.g. `registry.example.com/app:1` (converted with
    /// `lazy-erofs convert`).
    pub image: String,
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub address: std::path::PathBuf,
    /// containerd namespace (`ctr -n`; Kubernetes uses `k8s.io`).
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// The snapshotter's name in containerd's `[proxy_plugins]`.
    #[arg(long, default_value = "lazy-erofs")]
    pub snapshotter: String,
    /// Platform to pull (`os/arch[/variant]`).
    #[arg(long, default_value = default_platform())]
    pub platform: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

const fn default_platform() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "linux/arm64"
    } else {
        "linux/amd64"
    }
}

/// What a pull did, for the summary line and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    pub manifest_digest: String,
    pub layers: usize,
    /// Layers already present before this pull.
    pub layers_present: usize,
    pub chain_id: String,
}

/// A request with containerd's namespace and lease headers.
fn request<T>(message: T, namespace: &str, lease: Option<&str>) -> Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    let metadata = request.metadata_mut();
    metadata.insert("containerd-namespace", namespace.parse()?);
    if let Some(lease) = lease {
        metadata.insert("containerd-lease", lease.parse()?);
    }
    Ok(request)
}

pub fn run(args: &PullArgs) -> Result<Pulled> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let registry = args.registry.registry()?;
    runtime.block_on(pull(args, &registry))
}

struct Session {
    channel: Channel,
    namespace: String,
    lease: String,
}

impl Session {
    fn request<T>(&self, message: T) -> Result<tonic::Request<T>> {
        request(message, &self.namespace, Some(&self.lease))
    }
}

async fn pull(args: &PullArgs, registry: &Registry) -> Result<Pulled> {
    let started = Instant::now();
    let image = &args.image;
    let pulled = registry
        .pull_platform_manifest(image, &args.platform)
        .await
        .with_context(|| format!("pulling the manifest of {image}"))?;
    let manifest = &pulled.manifest;
    let manifest_document = pulled.manifest_document();
    let config_bytes = registry
        .pull_small_blob(image, manifest.config())
        .await
        .with_context(|| format!("pulling the config of {image}"))?;
    let config: ImageConfiguration =
        serde_json::from_slice(&config_bytes).context("parsing the image config")?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        bail!(
            "{image}: the config lists {} layers, the manifest {}",
            diff_ids.len(),
            manifest.layers().len()
        );
    }
    for (index, layer) in manifest.layers().iter().enumerate() {
        if LazyLayer::from_descriptor(layer)?.is_none() {
            bail!(
                "{image}: layer {} ({}) is not a lazy layer; convert the image with \
                 `lazy-erofs convert`, or pull it with `ctr image pull`",
                index + 1,
                layer.digest()
            );
        }
    }
    let chain = lazy_erofs_image::manifest::chain_ids(diff_ids);
    let top_chain = chain.last().cloned().context("the image has no layers")?;
    let fetched_meta = started.elapsed();

    let channel = containerd_client::connect(&args.address)
        .await
        .with_context(|| format!("connecting to containerd at {}", args.address.display()))?;
    let lease = format!("lazy-erofs-pull-{}", std::process::id());
    let mut lease_labels = HashMap::new();
    lease_labels.insert(
        "containerd.io/gc.expire".to_owned(),
        expire_in(Duration::from_secs(3600)),
    );
    LeasesClient::new(channel.clone())
        .create(request(
            CreateRequest {
                id: lease.clone(),
                labels: lease_labels,
            },
            &args.namespace,
            None,
        )?)
        .await
        .context("creating a containerd lease")?;
    let session = Session {
        channel,
        namespace: args.namespace.clone(),
        lease,
    };
    let result = unpack(args, &session, &pulled, &config_bytes, &chain).await;
    // The image and its snapshots hold what they need now; the lease only guarded the
    // unpack.
    let _ = LeasesClient::new(session.channel.clone())
        .delete(request(
            DeleteRequest {
                id: session.lease.clone(),
                sync: false,
            },
            &args.namespace,
            None,
        )?)
        .await;
    let layers_present = result?;
    let total = started.elapsed();
    println!(
        "pulled {image}: {} layers lazily ({} already present), manifest {} (registry {:.0} ms, total {:.0} ms)",
        chain.len(),
        layers_present,
        manifest_document.digest,
        fetched_meta.as_secs_f64() * 1000.0,
        total.as_secs_f64() * 1000.0,
    );
    Ok(Pulled {
        manifest_digest: manifest_document.digest.clone(),
        layers: chain.len(),
        layers_present,
        chain_id: top_chain,
    })
}

fn expire_in(after: Duration) -> String {
    let at = std::time::SystemTime::now() + after;
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Content, snapshots, image record. Returns how many layers were already there.
async fn unpack(
    args: &PullArgs,
    session: &Session,
    pulled: &lazy_erofs_image::registry::PlatformManifest,
    config_bytes: &[u8],
    chain: &[String],
) -> Result<usize> {
    let manifest = &pulled.manifest;
    let document = pulled.manifest_document();
    let config_digest = manifest.config().digest().to_string();
    let top_chain = chain.last().cloned().unwrap_or_default();

    let mut config_labels = HashMap::new();
    config_labels.insert(
        format!("containerd.io/gc.ref.snapshot.{}", args.snapshotter),
        top_chain,
    );
    write_content(session, &config_digest, config_bytes, config_labels).await?;
    let mut manifest_labels = HashMap::new();
    manifest_labels.insert(
        "containerd.io/gc.ref.content.config".to_owned(),
        config_digest,
    );
    write_content(session, &document.digest, &document.bytes, manifest_labels).await?;

    let mut snapshots = SnapshotsClient::new(session.channel.clone());
    let mut present = 0;
    for (index, layer) in manifest.layers().iter().enumerate() {
        let target = &chain[index];
        let stat = snapshots
            .stat(session.request(StatSnapshotRequest {
                snapshotter: args.snapshotter.clone(),
                key: target.clone(),
            })?)
            .await;
        if stat.is_ok() {
            present += 1;
            continue;
        }
        let parent = if index == 0 {
            String::new()
        } else {
            chain[index - 1].clone()
        };
        let key = format!("extract-{}-{target}", std::process::id());
        let labels: HashMap<String, String> = [
            (remote::SNAPSHOT_REF, target.clone()),
            (remote::LAYER_DIGEST, layer.digest().to_string()),
            (remote::IMAGE_REF, args.image.clone()),
            (remote::MANIFEST_DIGEST, document.digest.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let prepared = snapshots
            .prepare(session.request(PrepareSnapshotRequest {
                snapshotter: args.snapshotter.clone(),
                key: key.clone(),
                parent,
                labels,
            })?)
            .await;
        match prepared {
            Err(status) if status.code() == tonic::Code::AlreadyExists => {}
            Err(status) => {
                bail!(
                    "layer {} ({}): {}",
                    index + 1,
                    layer.digest(),
                    status.message()
                )
            }
            Ok(_) => {
                // The snapshotter did not take the layer lazily: undo, say why.
                let _ = snapshots
                    .remove(session.request(RemoveSnapshotRequest {
                        snapshotter: args.snapshotter.clone(),
                        key,
                    })?)
                    .await;
                bail!(
                    "layer {} ({}): snapshotter {:?} did not mount it lazily (is it \
                     lazy-erofs, with lazy layers on?)",
                    index + 1,
                    layer.digest(),
                    args.snapshotter
                );
            }
        }
    }

    let image = Image {
        name: args.image.clone(),
        labels: HashMap::new(),
        target: Some(Descriptor {
            media_type: manifest_media_type(document),
            digest: document.digest.clone(),
            size: document.bytes.len() as i64,
            annotations: HashMap::new(),
        }),
        created_at: None,
        updated_at: None,
    };
    let mut images = ImagesClient::new(session.channel.clone());
    let created = images
        .create(session.request(CreateImageRequest {
            image: Some(image.clone()),
            source_date_epoch: None,
        })?)
        .await;
    match created {
        Ok(_) => {}
        Err(status) if status.code() == tonic::Code::AlreadyExists => {
            images
                .update(session.request(UpdateImageRequest {
                    image: Some(image),
                    update_mask: None,
                    source_date_epoch: None,
                })?)
                .await
                .context("updating the image record")?;
        }
        Err(status) => bail!("creating the image record: {}", status.message()),
    }
    Ok(present)
}

fn manifest_media_type(document: &lazy_erofs_image::registry::Document) -> String {
    document.media_type.clone()
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
) -> Result<()> {
    write_blob(session, digest, bytes).await?;
    let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
    ContentClient::new(session.channel.clone())
        .update(session.request(UpdateRequest {
            info: Some(Info {
                digest: digest.to_owned(),
                labels,
                ..Info::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        })?)
        .await
        .with_context(|| format!("labelling {digest} in containerd's content store"))?;
    Ok(())
}

async fn write_blob(session: &Session, digest: &str, bytes: &[u8]) -> Result<()> {
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
    let stream = futures::stream::iter([message]);
    let request = session.request(stream)?;
    match content.write(request).await {
        Ok(response) => {
            let mut responses = response.into_inner();
            while let Some(reply) = futures::StreamExt::next(&mut responses).await {
                if let Err(status) = reply
                    && status.code() != tonic::Code::AlreadyExists
                {
                    bail!("writing {digest} to containerd: {}", status.message());
                }
            }
            Ok(())
        }
        Err(status) if status.code() == tonic::Code::AlreadyExists => Ok(()),
        Err(status) => bail!("writing {digest} to containerd: {}", status.message()),
    }
}
