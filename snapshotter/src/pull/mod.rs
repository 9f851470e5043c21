//! A lazy pull into containerd (`lazy-erofs pull`): makes a converted image runnable by
//! containerd without downloading its layers. The manifest and config go into
//! containerd's content store; each layer is prepared through containerd's Snapshots
//! service with the remote-snapshot labels, so the snapshotter mounts it lazily and
//! answers AlreadyExists; then the image record is created. All under a lease, so
//! containerd's garbage collector cannot take anything half done.

mod unpack;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::{CreateRequest, DeleteRequest};
use lazy_erofs_image::manifest::{LazyLayer, ManifestError};
use lazy_erofs_image::registry::{PlatformManifest, Registry, RegistryError};
use oci_spec::image::ImageConfiguration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

/// What to pull, and into which containerd.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Image reference of a converted image.
    pub image: String,
    /// containerd's socket.
    pub address: PathBuf,
    /// containerd namespace (`ctr -n`).
    pub namespace: String,
    /// The snapshotter's name in containerd's `[proxy_plugins]`.
    pub snapshotter: String,
    /// `os/arch[/variant]`.
    pub platform: String,
}

/// What a pull did, for the summary line and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    pub manifest_digest: String,
    pub layers: usize,
    /// Layers already present before this pull.
    pub layers_present: usize,
    pub chain_id: String,
    /// Time spent on the manifest and config, from the start.
    pub registry_time: Duration,
    /// Time of the whole pull.
    pub total_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("pulling the {what} of {image}: {source}")]
    Registry {
        what: &'static str,
        image: String,
        #[source]
        source: RegistryError,
    },
    #[error("parsing the image config of {image}: {source}")]
    Config {
        image: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{image}: the config lists {config} layers, the manifest {manifest}")]
    LayerCount {
        image: String,
        config: usize,
        manifest: usize,
    },
    #[error("{image}: the image has no layers")]
    NoLayers { image: String },
    #[error("{image}: layer {index}: {source}")]
    Layer {
        image: String,
        index: usize,
        #[source]
        source: ManifestError,
    },
    #[error(
        "{image}: layer {index} ({digest}) is not a lazy layer; convert the image with \
         `lazy-erofs convert`, or pull it with `ctr image pull`"
    )]
    NotLazy {
        image: String,
        index: usize,
        digest: String,
    },
    #[error("containerd {what} {value:?} cannot be sent as a request header")]
    Header { what: &'static str, value: String },
    #[error("connecting to containerd at {address}: {source}")]
    Connect {
        address: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{what}: {}", .source.message())]
    Containerd {
        what: String,
        #[source]
        source: Box<tonic::Status>,
    },
    #[error(
        "layer {index} ({digest}): snapshotter {snapshotter:?} did not mount it lazily (is \
         it lazy-erofs, with lazy layers on?)"
    )]
    NotMountedLazily {
        index: usize,
        digest: String,
        snapshotter: String,
    },
}

impl PullError {
    fn containerd(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> Self {
        let what = what.into();
        move |source| Self::Containerd {
            what,
            source: Box::new(source),
        }
    }
}

/// The manifest and config a pull checked, and the layers' chain ids.
struct Checked {
    pulled: PlatformManifest,
    config: Vec<u8>,
    chain: Vec<String>,
}

/// Pulls `options.image` lazily into containerd.
pub async fn pull(options: &PullOptions, registry: &Registry) -> Result<Pulled, PullError> {
    let started = Instant::now();
    let namespace = header("namespace", &options.namespace)?;
    let lease = format!("lazy-erofs-pull-{}", std::process::id());
    let lease_header = header("lease", &lease)?;
    let checked = manifest_and_config(options, registry).await?;
    let registry_time = started.elapsed();

    let channel = containerd_client::connect(&options.address)
        .await
        .map_err(|source| PullError::Connect {
            address: options.address.clone(),
            source,
        })?;
    let session = Session {
        channel,
        namespace,
        lease,
        lease_header,
    };
    session.create_lease(Duration::from_secs(3600)).await?;
    let result = unpack::unpack(options, &session, &checked).await;
    // The image and its snapshots hold what they need now; the lease only guarded the
    // unpack.
    session.delete_lease().await;
    let layers_present = result?;
    Ok(Pulled {
        manifest_digest: checked.pulled.manifest_document().digest.clone(),
        layers: checked.chain.len(),
        layers_present,
        chain_id: checked.chain.last().cloned().unwrap_or_default(),
        registry_time,
        total_time: started.elapsed(),
    })
}

/// The image's manifest and config, refused unless every layer is lazy.
async fn manifest_and_config(
    options: &PullOptions,
    registry: &Registry,
) -> Result<Checked, PullError> {
    let image = &options.image;
    let failed = |what| {
        let image = image.clone();
        move |source| PullError::Registry {
            what,
            image,
            source,
        }
    };
    let pulled = registry
        .pull_platform_manifest(image, &options.platform)
        .await
        .map_err(failed("manifest"))?;
    let manifest = &pulled.manifest;
    let config = registry
        .pull_small_blob(image, manifest.config())
        .await
        .map_err(failed("config"))?;
    let parsed: ImageConfiguration =
        serde_json::from_slice(&config).map_err(|source| PullError::Config {
            image: image.clone(),
            source,
        })?;
    let diff_ids = parsed.rootfs().diff_ids();
    if diff_ids.len() != manifest.layers().len() {
        return Err(PullError::LayerCount {
            image: image.clone(),
            config: diff_ids.len(),
            manifest: manifest.layers().len(),
        });
    }
    if diff_ids.is_empty() {
        return Err(PullError::NoLayers {
            image: image.clone(),
        });
    }
    for (index, layer) in manifest.layers().iter().enumerate() {
        let (index, digest) = (index + 1, layer.digest().to_string());
        match LazyLayer::from_descriptor(layer) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(PullError::NotLazy {
                    image: image.clone(),
                    index,
                    digest,
                });
            }
            Err(source) => {
                return Err(PullError::Layer {
                    image: image.clone(),
                    index,
                    source,
                });
            }
        }
    }
    let chain = lazy_erofs_image::manifest::chain_ids(diff_ids);
    Ok(Checked {
        pulled,
        config,
        chain,
    })
}

fn header(what: &'static str, value: &str) -> Result<MetadataValue<Ascii>, PullError> {
    MetadataValue::try_from(value).map_err(|_| PullError::Header {
        what,
        value: value.to_owned(),
    })
}

/// A connection to containerd, with the namespace and lease every request carries.
struct Session {
    channel: Channel,
    namespace: MetadataValue<Ascii>,
    lease: String,
    lease_header: MetadataValue<Ascii>,
}

impl Session {
    /// A request in the namespace, under the lease when `leased`.
    fn request<T>(&self, message: T, leased: bool) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert("containerd-namespace", self.namespace.clone());
        if leased {
            metadata.insert("containerd-lease", self.lease_header.clone());
        }
        request
    }

    fn leased<T>(&self, message: T) -> tonic::Request<T> {
        self.request(message, true)
    }

    async fn create_lease(&self, expire_after: Duration) -> Result<(), PullError> {
        let expire = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + expire_after);
        let labels = HashMap::from([("containerd.io/gc.expire".to_owned(), expire.to_string())]);
        let message = CreateRequest {
            id: self.lease.clone(),
            labels,
        };
        LeasesClient::new(self.channel.clone())
            .create(self.request(message, false))
            .await
            .map_err(PullError::containerd("creating a containerd lease"))?;
        Ok(())
    }

    /// Best effort: an expired lease goes by itself.
    async fn delete_lease(&self) {
        let message = DeleteRequest {
            id: self.lease.clone(),
            sync: false,
        };
        let deleted = LeasesClient::new(self.channel.clone())
            .delete(self.request(message, false))
            .await;
        if let Err(status) = deleted {
            tracing::warn!(lease = %self.lease, "deleting the pull's lease: {}", status.message());
        }
    }
}
