//! Pulling a whole image into an OCI layout directory (what `lazy-erofs convert` does
//! with a registry source): the top-level index or manifest, the platform's manifest,
//! its config and layers, every blob checked against its digest before it is kept.

use std::io::Write;
use std::path::Path;

use futures::StreamExt;
use oci_client::{Reference, RegistryOperation};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use sha2::{Digest, Sha256};

use super::retry::{Failure, with_retries};
use super::{
    Endpoint, MAX_DOCUMENT_BYTES, Registry, RegistryError, parse_reference, protocol_error,
};
use crate::convert::{is_index, platform_matches};
use crate::oci_layout::OciLayout;

const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// The media type a manifest or index says it is (`mediaType`), else guessed from its
/// shape.
fn media_type_of(bytes: &[u8]) -> Result<String, serde_json::Error> {
    let value: serde_json::Value = serde_json::from_slice(bytes)?;
    Ok(match value.get("mediaType").and_then(|v| v.as_str()) {
        Some(media) => media.to_owned(),
        None if value.get("manifests").is_some() => MANIFEST_TYPES[0].to_owned(),
        None => MANIFEST_TYPES[1].to_owned(),
    })
}

/// One manifest or index as fetched.
#[derive(Debug, Clone)]
pub struct Document {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: String,
}

/// A platform's manifest and the documents that led to it.
#[derive(Debug, Clone)]
pub struct PlatformManifest {
    /// Top level first; the last is the manifest; never empty.
    documents: Vec<Document>,
    pub manifest: ImageManifest,
}

impl PlatformManifest {
    /// Every document fetched, top level first.
    pub fn documents(&self) -> &[Document] {
        &self.documents
    }

    /// The top-level document (what a tag names).
    pub fn top(&self) -> &Document {
        &self.documents[0]
    }

    /// The platform's manifest document.
    pub fn manifest_document(&self) -> &Document {
        &self.documents[self.documents.len() - 1]
    }
}

impl Registry {
    /// The manifest of `image` for `platform` (`os/arch[/variant]`), following (nested)
    /// indexes; every document fetched, top level first (the last is the manifest).
    pub async fn pull_platform_manifest(
        &self,
        image: &str,
        platform: &str,
    ) -> Result<PlatformManifest, RegistryError> {
        let reference = parse_reference(image)?;
        let (bytes, digest) = self.pull_manifest_raw(&reference, MANIFEST_TYPES).await?;
        let media_type = media_type_of(&bytes).map_err(|e| protocol_error(image, e))?;
        let mut documents = vec![Document {
            bytes,
            media_type,
            digest,
        }];
        loop {
            let current = documents
                .last()
                .ok_or_else(|| protocol_error(image, "no manifest"))?;
            if !is_index(&current.media_type) {
                break;
            }
            let index: ImageIndex = serde_json::from_slice(&current.bytes)
                .map_err(|e| protocol_error(&current.digest, e))?;
            let chosen = index
                .manifests()
                .iter()
                .find(|d| platform_matches(d, platform))
                .ok_or_else(|| {
                    protocol_error(image, format!("no manifest for platform {platform}"))
                })?;
            let by_digest = Reference::with_digest(
                reference.registry().to_owned(),
                reference.repository().to_owned(),
                chosen.digest().to_string(),
            );
            let (bytes, digest) = self.pull_manifest_raw(&by_digest, MANIFEST_TYPES).await?;
            documents.push(Document {
                bytes,
                media_type: chosen.media_type().to_string(),
                digest,
            });
        }
        let last = documents
            .last()
            .ok_or_else(|| protocol_error(image, "no manifest"))?;
        let manifest: ImageManifest =
            serde_json::from_slice(&last.bytes).map_err(|e| protocol_error(&last.digest, e))?;
        Ok(PlatformManifest {
            documents,
            manifest,
        })
    }

    /// A small blob (a config) in memory, checked against its descriptor.
    pub async fn pull_small_blob(
        &self,
        image: &str,
        blob: &Descriptor,
    ) -> Result<Vec<u8>, RegistryError> {
        let digest = blob.digest().to_string();
        // The size is the manifest's word: bounded before anything is read.
        if blob.size() > MAX_DOCUMENT_BYTES {
            return Err(protocol_error(
                &digest,
                format!(
                    "the manifest gives it {} bytes; configs are limited to \
                     {MAX_DOCUMENT_BYTES} bytes",
                    blob.size()
                ),
            ));
        }
        let bytes = self.read_range(image, &digest, 0, blob.size()).await?;
        let actual = crate::oci_layout::sha256_digest(&bytes);
        if actual != digest {
            return Err(protocol_error(
                &digest,
                format!("received bytes with digest {actual}"),
            ));
        }
        Ok(bytes)
    }

    /// Pulls `image` for `platform` (`os/arch[/variant]`) into a new OCI layout at `dir`
    /// whose `index.json` names the pulled top-level manifest or index. Returns the
    /// number of bytes of blobs fetched.
    pub async fn pull_to_layout(
        &self,
        image: &str,
        platform: &str,
        dir: &Path,
    ) -> Result<u64, RegistryError> {
        let reference = parse_reference(image)?;
        let layout = OciLayout::create(dir)?;
        let pulled = self.pull_platform_manifest(image, platform).await?;
        let mut fetched = 0;
        for document in &pulled.documents {
            layout.write_blob(&document.bytes)?;
            fetched += document.bytes.len() as u64;
        }
        let manifest = &pulled.manifest;
        for blob in std::iter::once(manifest.config()).chain(manifest.layers()) {
            fetched += self.pull_blob(&reference, blob, &layout).await?;
        }
        let top = pulled.top();
        let top = Descriptor::new(
            MediaType::from(top.media_type.as_str()),
            top.bytes.len() as u64,
            oci_spec::image::Digest::try_from(top.digest.as_str())
                .map_err(|e| protocol_error(&top.digest, e))?,
        );
        let mut index = ImageIndex::default();
        index.set_manifests(vec![top]);
        layout.write_index(&index)?;
        Ok(fetched)
    }

    /// One blob into the layout, streamed to disk and checked against its descriptor;
    /// mirrors first. A mismatch is retried (it may be a flipped bit in transit).
    async fn pull_blob(
        &self,
        image: &Reference,
        blob: &Descriptor,
        layout: &OciLayout,
    ) -> Result<u64, RegistryError> {
        let digest = &blob.digest().to_string();
        self.on_first_endpoint(image, digest, |endpoint: Endpoint| async move {
            let endpoint = &endpoint;
            let url = self.blob_url(endpoint, image, digest)?;
            with_retries(&self.policy(endpoint), digest, || {
                self.authorized(&endpoint.reference, RegistryOperation::Pull, |authorization| {
                    let url = url.clone();
                    let digest = digest.clone();
                    async move {
                        let response = authorization
                            .apply(self.http.get(endpoint.reference.resolve_registry()).get(url))
                            .send()
                            .await
                            .map_err(|e| Failure::from_reqwest(&digest, e))?;
                        if !response.status().is_success() {
                            return Err(Failure::from_status(
                                &digest,
                                response.status(),
                                response.headers(),
                            ));
                        }
                        let mut file = layout.temp_file().map_err(|e| Failure::fatal(e.into()))?;
                        let mut hash = Sha256::new();
                        let mut size = 0u64;
                        let mut body = response.bytes_stream();
                        while let Some(chunk) = body.next().await {
                            let chunk = chunk.map_err(|e| Failure::from_reqwest(&digest, e))?;
                            hash.update(&chunk);
                            size += chunk.len() as u64;
                            if size > blob.size() {
                                break;
                            }
                            file.write_all(&chunk).map_err(|e| {
                                Failure::fatal(protocol_error(&digest, format!("writing: {e}")))
                            })?;
                        }
                        let actual = format!("sha256:{}", crate::blob::hex(&hash.finalize()));
                        if actual != digest || size != blob.size() {
                            return Err(Failure::transient(protocol_error(
                                &digest,
                                format!(
                                    "received {size} bytes with digest {actual}, expected {} bytes",
                                    blob.size()
                                ),
                            )));
                        }
                        layout
                            .adopt_blob(file.path(), &digest)
                            .map_err(|e| Failure::fatal(e.into()))?;
                        Ok(size)
                    }
                })
            })
            .await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_type_comes_from_the_document_or_its_shape() {
        assert_eq!(
            media_type_of(
                br#"{"mediaType":"application/vnd.docker.distribution.manifest.v2+json"}"#
            )
            .expect("json"),
            "application/vnd.docker.distribution.manifest.v2+json"
        );
        assert_eq!(
            media_type_of(br#"{"manifests":[]}"#).expect("json"),
            MANIFEST_TYPES[0]
        );
        assert_eq!(
            media_type_of(br#"{"layers":[]}"#).expect("json"),
            MANIFEST_TYPES[1]
        );
        assert!(media_type_of(b"not json").is_err());
    }
}
