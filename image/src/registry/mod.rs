//! Registry client on `oci-client`: push an OCI layout's image (blobs streamed from
//! disk), pull manifests and whole images, and read blob ranges (what the fetcher
//! needs). HTTPS by default; plain HTTP only for hosts marked insecure. Credentials from
//! the configuration file, else docker's `config.json`, else anonymous; bearer tokens
//! negotiated by oci-client. Pulls try each mirror once, then the origin with retries.

mod auth;
mod document;
pub mod observe;
mod options;
mod pull;
mod range;
mod redirect;
mod retry;
pub mod tls;
mod token;
mod upload;

use std::path::Path;
use std::sync::Arc;

pub use document::MAX_DOCUMENT_BYTES;
use oci_client::{Reference, RegistryOperation};
use oci_spec::image::{ImageIndex, ImageManifest};
pub use options::{Credentials, HostOptions, RegistryOptions, RetryPolicy};
pub use pull::{Document, PlatformManifest};
pub use token::MAX_TOKEN_REPLY_BYTES;

use crate::blob::RangeRead;
use crate::oci_layout::{LayoutError, OciLayout};
use auth::{Auth, Authorization};
use retry::{Failure, with_retries, with_retries_within};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("bad image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error("registry configuration for {host}: {reason}")]
    Config { host: String, reason: String },
    #[error(transparent)]
    Client(#[from] oci_client::errors::OciDistributionError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("{what}: {reason}")]
    Protocol { what: String, reason: String },
    #[error("reading blob {digest} range {offset}+{len}: got {got} bytes")]
    ShortRange {
        digest: String,
        offset: u64,
        len: u64,
        got: u64,
    },
}

/// Where a request goes: a mirror of the image's registry, or the registry itself.
struct Endpoint {
    reference: Reference,
    mirror: bool,
}

pub struct Registry {
    http: tls::HttpClients,
    auth: Auth,
    options: RegistryOptions,
    observer: Option<std::sync::Arc<dyn observe::Observer>>,
    /// Where blob reads were redirected to lately.
    redirects: redirect::Redirects,
}

/// Compiles the image reference grammar (one large regex, built on first use: 41 ms on
/// the 2-core build machine, 0.46 s in the emulated test VM) on a background thread,
/// once per process, so that a fresh process's first registry read (a fetcher started
/// by the snapshotter, or restarted after a crash) does not wait for it.
fn prepare_reference_parser() {
    static PREPARED: std::sync::Once = std::sync::Once::new();
    PREPARED.call_once(|| {
        let warm = || drop(parse_reference("localhost/prepare:parser"));
        if std::thread::Builder::new()
            .name("reference-parser".into())
            .spawn(warm)
            .is_err()
        {
            // Without a thread the first parse builds it, as it would anyway.
            tracing::debug!("reference parser not prepared ahead");
        }
    });
}

pub fn parse_reference(text: &str) -> Result<Reference, RegistryError> {
    text.parse()
        .map_err(|e: oci_client::ParseError| RegistryError::Reference {
            reference: text.to_owned(),
            reason: e.to_string(),
        })
}

/// `registry/repository` of an image reference (no tag or digest): the unit lazy layers
/// are bound to and shared within (see [`crate::manifest::layer_binding`]).
pub fn repository_of(text: &str) -> Result<String, RegistryError> {
    let reference = parse_reference(text)?;
    Ok(format!(
        "{}/{}",
        reference.registry(),
        reference.repository()
    ))
}

fn protocol_error(what: &str, reason: impl ToString) -> RegistryError {
    RegistryError::Protocol {
        what: what.to_owned(),
        reason: reason.to_string(),
    }
}

impl Registry {
    pub fn new(options: &RegistryOptions) -> Self {
        prepare_reference_parser();
        Self {
            http: tls::HttpClients::new(options),
            auth: Auth::new(options),
            options: options.clone(),
            observer: None,
            redirects: redirect::Redirects::default(),
        }
    }

    /// Credentials a client gave for pulls from `registry` (a host as written in image
    /// references, e.g. from a kubelet's `PullImage`): used for it and its configured
    /// mirrors, as containerd's CRI plugin uses them, ahead of the configuration's. Held
    /// in memory only.
    pub fn provide_credentials(
        &self,
        registry: &str,
        credentials: &Credentials,
    ) -> Result<(), RegistryError> {
        let reference = parse_reference(&format!("{registry}/credentials"))?;
        let mut hosts = vec![reference.resolve_registry().to_owned()];
        if let Some(entry) = self.options.host(reference.registry()) {
            hosts.extend(entry.mirrors.iter().cloned());
        }
        self.auth.provide(&hosts, credentials);
        Ok(())
    }

    /// Reports every HTTP attempt of range reads and manifest pulls to `observer`.
    pub fn with_observer(mut self, observer: std::sync::Arc<dyn observe::Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    fn scheme(&self, host: &str) -> &'static str {
        if self.options.insecure_hosts.iter().any(|h| h == host) {
            "http"
        } else {
            "https"
        }
    }

    /// `scheme://host/v2/<repository>/` for an endpoint.
    fn repository_url(&self, endpoint: &Reference) -> Result<reqwest::Url, RegistryError> {
        let host = endpoint.resolve_registry();
        let url = format!(
            "{}://{host}/v2/{}/",
            self.scheme(host),
            endpoint.repository()
        );
        reqwest::Url::parse(&url).map_err(|e| protocol_error(&url, e))
    }

    /// Mirrors in their configured order, then the origin.
    fn endpoints(&self, image: &Reference) -> Vec<Endpoint> {
        let mirrors = self
            .options
            .host(image.registry())
            .map(|h| h.mirrors.clone())
            .unwrap_or_default();
        let mut out: Vec<Endpoint> = mirrors
            .into_iter()
            .map(|mirror| {
                let mut reference = image.clone();
                reference.set_mirror_registry(mirror);
                Endpoint {
                    reference,
                    mirror: true,
                }
            })
            .collect();
        out.push(Endpoint {
            reference: image.clone(),
            mirror: false,
        });
        out
    }

    /// A mirror gets one attempt so a dead one costs little; the origin gets the policy.
    fn policy(&self, endpoint: &Endpoint) -> RetryPolicy {
        if endpoint.mirror {
            RetryPolicy {
                max_attempts: 1,
                ..self.options.retry
            }
        } else {
            self.options.retry
        }
    }

    /// Runs `attempt` on each endpoint in turn (mirrors, then the origin) until one
    /// succeeds; a failing mirror is logged and skipped, the origin's error returned.
    ///
    /// `attempt` owns its endpoint: an async closure borrowing it would make every
    /// registry future not `Send` (rustc cannot prove it for all the borrow's lifetimes).
    async fn on_first_endpoint<T, F, Fut>(
        &self,
        image: &Reference,
        what: &str,
        attempt: F,
    ) -> Result<T, RegistryError>
    where
        F: Fn(Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut last = None;
        for endpoint in self.endpoints(image) {
            let (mirror, host) = (
                endpoint.mirror,
                endpoint.reference.resolve_registry().to_owned(),
            );
            match attempt(endpoint).await {
                Ok(value) => return Ok(value),
                Err(e) if mirror => {
                    tracing::warn!(mirror = host, what, error = %e, "mirror failed; trying the next endpoint");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| protocol_error(what, "no endpoint")))
    }

    /// Where blob `digest` of `image` is at `endpoint`.
    fn blob_url(
        &self,
        endpoint: &Endpoint,
        image: &Reference,
        digest: &str,
    ) -> Result<reqwest::Url, RegistryError> {
        let mut url = self
            .repository_url(&endpoint.reference)?
            .join(&format!("blobs/{digest}"))
            .map_err(|e| protocol_error(digest, e))?;
        if endpoint.mirror {
            // Tells a mirror serving several registries which one is meant.
            url.query_pairs_mut().append_pair("ns", image.registry());
        }
        Ok(url)
    }

    /// Runs one raw-HTTP attempt with the endpoint's authorization; a 401 with a cached
    /// token forgets it so the next attempt negotiates a new one.
    async fn authorized<T, F, Fut>(
        &self,
        endpoint: &Reference,
        operation: RegistryOperation,
        attempt: F,
    ) -> Result<T, Failure>
    where
        F: FnOnce(Authorization) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let host = endpoint.resolve_registry();
        let base = format!("{}://{host}", self.scheme(host));
        let (authorization, fresh) = self
            .auth
            .authorization(self.http.get(host), &base, endpoint, operation)
            .await?;
        let started = std::time::Instant::now();
        let result = attempt(authorization).await;
        if let Some(observer) = &self.observer {
            let status = result.as_ref().err().and_then(|f| f.status);
            let outcome = observe::Outcome::of(status, result.is_ok());
            observer.attempt(outcome, started.elapsed());
        }
        match result {
            Err(mut failure) if failure.unauthorized && !fresh => {
                self.auth.forget(endpoint, operation);
                failure.retryable = true;
                Err(failure)
            }
            other => other,
        }
    }

    /// Pushes the image of an OCI layout (its first manifest): blobs first, streamed
    /// from disk and skipped when the registry has them, then the manifest, so the
    /// registry never holds a manifest whose blobs are missing. Returns the manifest
    /// digest.
    pub async fn push_layout(
        &self,
        layout_dir: &Path,
        target: &str,
    ) -> Result<String, RegistryError> {
        let image = parse_reference(target)?;
        let layout = OciLayout::open(layout_dir)?;
        let index: ImageIndex = layout.index()?;
        let desc = index.manifests().first().ok_or_else(|| {
            protocol_error(
                &layout_dir.display().to_string(),
                "index.json lists no manifest",
            )
        })?;
        let manifest_bytes = layout.read_blob(desc)?;
        let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| protocol_error(desc.digest().as_ref(), e))?;
        for blob in std::iter::once(manifest.config()).chain(manifest.layers()) {
            let digest = blob.digest().to_string();
            let path = layout.blob_path(&digest)?;
            self.push_blob_file(&image, &path, &digest).await?;
        }
        let media_type = desc.media_type().to_string();
        let reference = image.digest().or(image.tag()).unwrap_or("latest");
        let repository_url = self.repository_url(&image)?;
        let host = image.resolve_registry();
        with_retries(&self.options.retry, target, || {
            self.authorized(&image, RegistryOperation::Push, |authorization| {
                let repository_url = repository_url.clone();
                let (media_type, manifest_bytes) = (&media_type, &manifest_bytes);
                async move {
                    let put = upload::ManifestPut {
                        repository_url,
                        authorization: &authorization,
                        reference,
                        media_type,
                        bytes: manifest_bytes,
                    };
                    upload::put_manifest(self.http.get(host), &put).await
                }
            })
        })
        .await?;
        Ok(desc.digest().to_string())
    }

    /// Uploads one blob from a file, in chunks, unless the registry already has it.
    pub async fn push_blob_file(
        &self,
        image: &Reference,
        path: &Path,
        digest: &str,
    ) -> Result<(), RegistryError> {
        let repository_url = self.repository_url(image)?;
        with_retries(&self.options.retry, digest, || {
            self.authorized(image, RegistryOperation::Push, |authorization| {
                let repository_url = repository_url.clone();
                async move {
                    upload::attempt(
                        self.http.get(image.resolve_registry()),
                        &upload::Upload {
                            repository_url,
                            authorization: &authorization,
                            path,
                            digest,
                        },
                    )
                    .await
                }
            })
        })
        .await
    }

    /// A manifest or index by reference: its bytes and digest, from the first endpoint
    /// that has it. By-digest pulls are checked against the digest.
    pub async fn pull_manifest_raw(
        &self,
        image: &Reference,
        accepted: &[&str],
    ) -> Result<(Vec<u8>, String), RegistryError> {
        let whole = image.whole();
        let reference = image
            .digest()
            .or(image.tag())
            .unwrap_or("latest")
            .to_owned();
        let (whole, reference) = (&whole, &reference);
        self.on_first_endpoint(image, whole, |endpoint: Endpoint| async move {
            let endpoint = &endpoint;
            let host = endpoint.reference.resolve_registry();
            let url = self
                .repository_url(&endpoint.reference)?
                .join(&format!("manifests/{reference}"))
                .map_err(|e| protocol_error(whole, e))?;
            let bytes =
                with_retries_within(&self.policy(endpoint), whole, MAX_DOCUMENT_BYTES, || {
                    self.authorized(
                        &endpoint.reference,
                        RegistryOperation::Pull,
                        |authorization| {
                            let url = url.to_string();
                            let whole = whole.clone();
                            async move {
                                document::attempt(
                                    self.http.get(endpoint.reference.resolve_registry()),
                                    &url,
                                    &authorization,
                                    accepted,
                                    &whole,
                                )
                                .await
                            }
                        },
                    )
                })
                .await?;
            // The digest of what was sent, whatever the registry's headers claim.
            let digest = crate::oci_layout::sha256_digest(&bytes);
            if let Some(expected) = image.digest() {
                let actual = digest.clone();
                if actual != expected {
                    return Err(protocol_error(
                        whole,
                        format!("{host} sent a manifest with digest {actual}"),
                    ));
                }
            }
            Ok((bytes, digest))
        })
        .await
    }

    /// The manifest of `image` and its digest.
    pub async fn pull_manifest(
        &self,
        image: &str,
    ) -> Result<(ImageManifest, String), RegistryError> {
        let image = parse_reference(image)?;
        let (bytes, digest) = self
            .pull_manifest_raw(
                &image,
                &[
                    "application/vnd.oci.image.manifest.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                ],
            )
            .await?;
        let manifest = serde_json::from_slice(&bytes).map_err(|e| protocol_error(&digest, e))?;
        Ok((manifest, digest))
    }
}

/// One registry blob as a [`RangeRead`], for [`crate::blob::BlobReader`] in synchronous
/// code (tests, CLI): each read blocks on the given runtime.
pub struct RegistryBlob {
    pub runtime: Arc<tokio::runtime::Runtime>,
    pub registry: Arc<Registry>,
    pub image: String,
    pub digest: String,
}

impl RangeRead for RegistryBlob {
    fn read_range(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        self.runtime
            .block_on(
                self.registry
                    .read_range(&self.image, &self.digest, offset, len),
            )
            .map_err(std::io::Error::other)
    }
}

/// The registry's futures stay `Send` (checked when this compiles): a multi-threaded
/// runtime (the snapshotter's) awaits them on its workers, no blocking thread between.
#[allow(dead_code)]
fn futures_are_send(registry: &Registry, blob: &oci_spec::image::Descriptor) {
    fn send<T: Send>(_: T) {}
    send(registry.pull_small_blob("r.test/a:1", blob));
    send(registry.read_range("r.test/a:1", "sha256:00", 0, 1));
    send(registry.pull_manifest("r.test/a:1"));
    send(registry.pull_platform_manifest("r.test/a:1", "linux/amd64"));
    send(registry.pull_to_layout("r.test/a:1", "linux/amd64", Path::new("/")));
    send(registry.push_layout(Path::new("/"), "r.test/a:1"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_references_are_named() {
        let err = parse_reference("UPPER/Case:tag").expect_err("accepted");
        assert!(err.to_string().contains("UPPER/Case:tag"), "{err}");
    }

    #[test]
    fn mirrors_come_first_then_the_origin() {
        let mut options = RegistryOptions::default();
        options.hosts.insert(
            "r.example".into(),
            HostOptions {
                mirrors: vec!["m1:5000".into(), "m2".into()],
                ..HostOptions::default()
            },
        );
        let registry = Registry::new(&options);
        let image = parse_reference("r.example/app:1").expect("valid");
        let order: Vec<(String, bool)> = registry
            .endpoints(&image)
            .iter()
            .map(|e| (e.reference.resolve_registry().to_owned(), e.mirror))
            .collect();
        assert_eq!(
            order,
            [
                ("m1:5000".to_owned(), true),
                ("m2".to_owned(), true),
                ("r.example".to_owned(), false)
            ]
        );
        assert_eq!(
            registry
                .endpoints(&parse_reference("other.example/a:1").expect("valid"))
                .len(),
            1
        );
    }
}
