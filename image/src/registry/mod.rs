//! Registry client on `oci-client`: push an OCI layout's image, pull manifests, and read
//! blob ranges (what the fetcher needs). HTTPS by default; plain HTTP only for hosts
//! marked insecure. Credentials: anonymous or basic.
//!
//! Not here yet: bearer-token flows beyond what oci-client does itself, docker config
//! credentials, mirrors, retries with Retry-After.

mod range;

use std::path::Path;
use std::sync::Arc;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use oci_spec::image::{ImageIndex, ImageManifest};
pub use range::RetryPolicy;

use crate::blob::RangeRead;
use crate::oci_layout::{LayoutError, OciLayout};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("bad image reference {reference:?}: {reason}")]
    Reference { reference: String, reason: String },
    #[error("registry: {0}")]
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

#[derive(Clone, Default)]
pub enum Credentials {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
}

/// Never prints the password, so credentials cannot leak through a `{:?}` in a log.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => {
                write!(
                    f,
                    "Basic {{ username: {username:?}, password: <redacted> }}"
                )
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// `host[:port]` entries reached over plain HTTP (e.g. a registry on loopback).
    pub insecure_hosts: Vec<String>,
    pub credentials: Credentials,
    /// Retries of range reads.
    pub retry: RetryPolicy,
}

pub struct Registry {
    client: Client,
    auth: RegistryAuth,
    ranges: range::RangeClient,
}

fn reference(text: &str) -> Result<Reference, RegistryError> {
    text.parse()
        .map_err(|e: oci_client::ParseError| RegistryError::Reference {
            reference: text.to_owned(),
            reason: e.to_string(),
        })
}

impl Registry {
    pub fn new(options: &RegistryOptions) -> Self {
        let protocol = if options.insecure_hosts.is_empty() {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(options.insecure_hosts.clone())
        };
        let client = Client::new(ClientConfig {
            protocol,
            ..ClientConfig::default()
        });
        let auth = match &options.credentials {
            Credentials::Anonymous => RegistryAuth::Anonymous,
            Credentials::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
        };
        let ranges = range::RangeClient {
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .timeout(std::time::Duration::from_secs(60))
                .build()
                .unwrap_or_default(),
            insecure_hosts: options.insecure_hosts.clone(),
            credentials: options.credentials.clone(),
            policy: options.retry,
        };
        Self {
            client,
            auth,
            ranges,
        }
    }

    /// Pushes the image of an OCI layout (its first manifest): blobs first, then the
    /// manifest, so the registry never holds a manifest whose blobs are missing.
    /// Returns the manifest digest.
    pub async fn push_layout(
        &self,
        layout_dir: &Path,
        target: &str,
    ) -> Result<String, RegistryError> {
        let image = reference(target)?;
        self.client
            .auth(&image, &self.auth, RegistryOperation::Push)
            .await?;
        let layout = OciLayout::open(layout_dir)?;
        let index: ImageIndex = layout.index()?;
        let desc = index
            .manifests()
            .first()
            .ok_or_else(|| RegistryError::Protocol {
                what: layout_dir.display().to_string(),
                reason: "index.json lists no manifest".into(),
            })?;
        let manifest_bytes = layout.read_blob(desc)?;
        let manifest: ImageManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|e| RegistryError::Protocol {
                what: desc.digest().to_string(),
                reason: e.to_string(),
            })?;
        for blob in std::iter::once(manifest.config()).chain(manifest.layers()) {
            let digest = blob.digest().to_string();
            // Blobs are read whole: layer blobs are tens of MiB; oci-client uploads them
            // in chunks.
            let path = layout.blob_path(&digest)?;
            let bytes = std::fs::read(&path).map_err(|source| LayoutError::Io { path, source })?;
            self.client.push_blob(&image, &bytes, &digest).await?;
        }
        let media_type = desc.media_type().to_string();
        let header = media_type.parse().map_err(|_| RegistryError::Protocol {
            what: media_type.clone(),
            reason: "not a header value".into(),
        })?;
        self.client
            .push_manifest_raw(&image, manifest_bytes, header)
            .await?;
        Ok(desc.digest().to_string())
    }

    /// The manifest of `image` and its digest.
    pub async fn pull_manifest(
        &self,
        image: &str,
    ) -> Result<(ImageManifest, String), RegistryError> {
        let image = reference(image)?;
        let (bytes, digest) = self
            .client
            .pull_manifest_raw(
                &image,
                &self.auth,
                &["application/vnd.oci.image.manifest.v1+json"],
            )
            .await?;
        let manifest = serde_json::from_slice(&bytes).map_err(|e| RegistryError::Protocol {
            what: digest.clone(),
            reason: e.to_string(),
        })?;
        Ok((manifest, digest))
    }

    /// Exactly `len` bytes of blob `digest` from `offset`, with retries (see
    /// [`RetryPolicy`]); a registry that ignores the range is handled too.
    pub async fn read_range(
        &self,
        image: &str,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let image = reference(image)?;
        // A bearer token when the registry uses them (oci-client caches it).
        let token = self
            .client
            .auth(&image, &self.auth, RegistryOperation::Pull)
            .await?;
        self.ranges
            .read(&range::RangeRequest {
                image: &image,
                bearer: token.as_deref(),
                digest,
                offset,
                len,
            })
            .await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_password() {
        let credentials = Credentials::Basic {
            username: "me".into(),
            password: "hunter2".into(),
        };
        let shown = format!(
            "{:?}",
            RegistryOptions {
                credentials,
                ..RegistryOptions::default()
            }
        );
        assert!(
            shown.contains("me") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn bad_references_are_named() {
        let err = reference("UPPER/Case:tag").expect_err("accepted");
        assert!(err.to_string().contains("UPPER/Case:tag"), "{err}");
    }
}
