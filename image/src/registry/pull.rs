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
use super::{Endpoint, Registry, RegistryError, parse_reference, protocol_error};
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

impl Registry {
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
        let (bytes, digest) = self.pull_manifest_raw(&reference, MANIFEST_TYPES).await?;
        let media_type = media_type_of(&bytes).map_err(|e| protocol_error(image, e))?;
        layout.write_blob(&bytes)?;
        let top_size = bytes.len() as u64;
        let mut fetched = top_size;
        let mut current = (bytes, media_type.clone(), digest.clone());
        // Follow (nested) indexes down to the platform's manifest.
        loop {
            let (bytes, media, digest) = &current;
            if !is_index(media) {
                break;
            }
            let index: ImageIndex =
                serde_json::from_slice(bytes).map_err(|e| protocol_error(digest, e))?;
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
            let (next, next_digest) = self.pull_manifest_raw(&by_digest, MANIFEST_TYPES).await?;
            layout.write_blob(&next)?;
            fetched += next.len() as u64;
            current = (next, chosen.media_type().to_string(), next_digest);
        }
        let manifest: ImageManifest =
            serde_json::from_slice(&current.0).map_err(|e| protocol_error(&current.2, e))?;
        for blob in std::iter::once(manifest.config()).chain(manifest.layers()) {
            fetched += self.pull_blob(&reference, blob, &layout).await?;
        }
        let top = Descriptor::new(
            MediaType::from(media_type.as_str()),
            top_size,
            oci_spec::image::Digest::try_from(digest.as_str())
                .map_err(|e| protocol_error(&digest, e))?,
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
        let digest = blob.digest().to_string();
        self.on_first_endpoint(image, &digest, async |endpoint: &Endpoint| {
            let url = self.blob_url(endpoint, image, &digest)?;
            with_retries(&self.policy(endpoint), &digest, || {
                self.authorized(&endpoint.reference, RegistryOperation::Pull, |authorization| {
                    let url = url.clone();
                    let digest = digest.clone();
                    async move {
                        let response = authorization
                            .apply(self.http.get(url))
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
