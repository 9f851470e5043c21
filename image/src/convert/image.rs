//! Whole-image conversion between OCI image layouts: pick the platform's manifest, turn
//! each tar layer into a lazy layer, keep the config, write the new manifest and index.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;
use std::time::Instant;

use oci_spec::image::{Descriptor, Digest, ImageIndex, ImageManifest, MediaType};

use super::{ConvertError, ConvertOptions, convert_layer};
use crate::manifest::{LAYER_MEDIA_TYPE, LazyLayer, annotation, is_lazy_layer_type};
use crate::oci_layout::{DigestReader, LayoutError, OciLayout};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("manifest or index {digest}: {reason}")]
    Json { digest: String, reason: String },
    #[error("no manifest for platform {0} in the source index")]
    NoPlatform(String),
    #[error("layer {digest}: unsupported media type {media_type}")]
    LayerMediaType { digest: String, media_type: String },
    #[error("layer {digest}")]
    Layer {
        digest: String,
        #[source]
        source: ConvertError,
    },
    #[error("layer {digest}: the blob read does not match its digest ({actual}) or size")]
    LayerDigest { digest: String, actual: String },
    #[error(
        "no repository to bind the image to: a lazy image's config names its layers after \
         the repository it is served from (give the destination as a registry reference, \
         or --repository HOST/REPO)"
    )]
    NoRepository,
    #[error("config {digest}: {reason}")]
    Config { digest: String, reason: String },
    #[error("lazy layer {digest}: {reason}")]
    LazyAnnotations { digest: String, reason: String },
}

/// One line of the summary table.
#[derive(Debug, Clone)]
pub struct LayerReport {
    pub source_digest: String,
    pub source_size: u64,
    pub blob_digest: String,
    pub blob_size: u64,
    pub metadata_size: u64,
    pub seconds: f64,
    /// False when the layer was already lazy and copied as it was.
    pub converted: bool,
}

fn is_tar_layer(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
    )
}

/// OCI image index or docker manifest list.
pub(crate) fn is_index(media_type: &str) -> bool {
    media_type.ends_with("image.index.v1+json") || media_type.ends_with("manifest.list.v2+json")
}

/// Whether an index entry is for `platform` (`os/arch[/variant]`); entries without a
/// platform match any.
pub(crate) fn platform_matches(desc: &Descriptor, platform: &str) -> bool {
    let mut parts = platform.split('/');
    let (os, arch, variant) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next(),
    );
    match desc.platform() {
        None => true,
        Some(p) => {
            p.os().to_string() == os
                && p.architecture().to_string() == arch
                && variant.is_none_or(|v| p.variant().as_deref() == Some(v))
        }
    }
}

/// Finds the manifest for `platform` (`os/arch[/variant]`), following nested indexes.
fn select_manifest(
    layout: &OciLayout,
    index: &ImageIndex,
    platform: &str,
) -> Result<Descriptor, ImageError> {
    for desc in index.manifests() {
        if !platform_matches(desc, platform) {
            continue;
        }
        if is_index(desc.media_type().as_ref()) {
            let bytes = layout.read_blob(desc)?;
            let nested: ImageIndex =
                serde_json::from_slice(&bytes).map_err(|e| ImageError::Json {
                    digest: desc.digest().to_string(),
                    reason: e.to_string(),
                })?;
            if let Ok(found) = select_manifest(layout, &nested, platform) {
                return Ok(found);
            }
        } else {
            return Ok(desc.clone());
        }
    }
    Err(ImageError::NoPlatform(platform.to_owned()))
}

/// Reads the rest of a source blob and checks it against its descriptor; returns its size.
fn check_source<R: Read>(reader: DigestReader<R>, layer: &Descriptor) -> Result<u64, ImageError> {
    let digest = layer.digest().to_string();
    let (actual, size) = reader.finish().map_err(|e| ImageError::Layer {
        digest: digest.clone(),
        source: e.into(),
    })?;
    if actual != digest || size != layer.size() {
        return Err(ImageError::LayerDigest { digest, actual });
    }
    Ok(size)
}

/// Converts the image in layout `src` into layout `dst`. `wrap` may wrap each source
/// layer reader (for progress display); `(layer index, size, reader)`.
pub fn convert_layout(
    src: &Path,
    dst: &Path,
    platform: &str,
    options: &ConvertOptions,
    wrap: &mut dyn FnMut(usize, u64, Box<dyn Read + Send>) -> Box<dyn Read + Send>,
) -> Result<Vec<LayerReport>, ImageError> {
    let source = OciLayout::open(src)?;
    let target = OciLayout::create(dst)?;
    let chosen = select_manifest(&source, &source.index()?, platform)?;
    let manifest_bytes = source.read_blob(&chosen)?;
    let mut manifest: ImageManifest =
        serde_json::from_slice(&manifest_bytes).map_err(|e| ImageError::Json {
            digest: chosen.digest().to_string(),
            reason: e.to_string(),
        })?;

    let repository = options
        .repository
        .as_deref()
        .ok_or(ImageError::NoRepository)?;
    let config = source.read_blob(manifest.config())?;

    let mut reports = Vec::new();
    let mut layers = Vec::new();
    let mut bindings = Vec::new();
    for (i, layer) in manifest.layers().iter().enumerate() {
        let digest = layer.digest().to_string();
        let media_type = layer.media_type().to_string();
        let started = Instant::now();
        if is_lazy_layer_type(&media_type) {
            // Already lazy: copy it through (checked against its digest on the way),
            // under today's media type.
            let tmp = target.temp_file()?;
            let mut reader = DigestReader::new(source.open_blob(&digest)?);
            std::io::copy(&mut reader, &mut tmp.as_file()).map_err(|e| ImageError::Layer {
                digest: digest.clone(),
                source: e.into(),
            })?;
            let size = check_source(reader, layer)?;
            target.adopt_blob(tmp.path(), &digest)?;
            let lazy = LazyLayer::from_descriptor(layer)
                .ok()
                .flatten()
                .ok_or_else(|| ImageError::LazyAnnotations {
                    digest: digest.clone(),
                    reason: "annotations missing or malformed".into(),
                })?;
            bindings.push(lazy.binding(repository));
            reports.push(LayerReport {
                source_digest: digest.clone(),
                source_size: size,
                blob_digest: digest,
                blob_size: size,
                metadata_size: 0,
                seconds: started.elapsed().as_secs_f64(),
                converted: false,
            });
            let mut layer = layer.clone();
            layer.set_media_type(MediaType::from(LAYER_MEDIA_TYPE));
            layers.push(layer);
            continue;
        }
        if !is_tar_layer(&media_type) {
            return Err(ImageError::LayerMediaType { digest, media_type });
        }
        let file: Box<dyn Read + Send> = Box::new(source.open_blob(&digest)?);
        let mut checked = DigestReader::new(wrap(i, layer.size(), file));
        let tmp = target.temp_file()?;
        let converted = convert_layer(&mut checked, tmp.as_file(), options, target.root())
            .map_err(|source| ImageError::Layer {
                digest: digest.clone(),
                source,
            })?;
        let size = check_source(checked, layer)?;
        let blob = &converted.blob;
        target.adopt_blob(tmp.path(), &blob.digest)?;
        let new_digest = Digest::from_str(&blob.digest).map_err(|e| ImageError::Json {
            digest: blob.digest.clone(),
            reason: e.to_string(),
        })?;
        let mut desc = Descriptor::new(MediaType::from(LAYER_MEDIA_TYPE), blob.size, new_digest);
        let mut notes = HashMap::from([
            (
                annotation::VERIFIED_DIGEST.to_owned(),
                blob.verified_digest.clone(),
            ),
            (
                annotation::DATA_SPACE_SIZE.to_owned(),
                blob.data_space_size.to_string(),
            ),
            (
                annotation::CHUNK_SIZE.to_owned(),
                blob.chunk_size.to_string(),
            ),
            (
                annotation::METADATA_SIZE.to_owned(),
                blob.metadata_len.to_string(),
            ),
            (
                annotation::SOURCE_DIFF_ID.to_owned(),
                converted.diff_id.clone(),
            ),
            (annotation::SOURCE_DIGEST.to_owned(), digest.clone()),
        ]);
        if blob.startup_size > 0 {
            notes.insert(
                annotation::STARTUP_SIZE.to_owned(),
                blob.startup_size.to_string(),
            );
        }
        desc.set_annotations(Some(notes));
        layers.push(desc);
        bindings.push(crate::manifest::layer_binding(
            &blob.verified_digest,
            repository,
        ));
        reports.push(LayerReport {
            source_digest: digest,
            source_size: size,
            blob_digest: blob.digest.clone(),
            blob_size: blob.size,
            metadata_size: blob.metadata_len,
            seconds: started.elapsed().as_secs_f64(),
            converted: true,
        });
    }

    let config = bind_config(&config, manifest.config().digest().as_ref(), &bindings)?;
    let config_digest = target.write_blob(&config)?;
    let mut config_desc = manifest.config().clone();
    config_desc.set_size(config.len() as u64);
    config_desc.set_digest(
        Digest::from_str(&config_digest).map_err(|e| ImageError::Json {
            digest: config_digest.clone(),
            reason: e.to_string(),
        })?,
    );
    manifest.set_config(config_desc);
    manifest.set_layers(layers);
    let mut notes = manifest.annotations().clone().unwrap_or_default();
    notes.insert(annotation::FORMAT.to_owned(), "1".to_owned());
    if !options.prefetch.is_empty() {
        notes.insert(annotation::PREFETCH.to_owned(), options.prefetch.join("\n"));
    }
    manifest.set_annotations(Some(notes));
    manifest.set_media_type(Some(MediaType::ImageManifest));
    let bytes =
        crate::oci_layout::canonical_json(&manifest, false).map_err(|e| ImageError::Json {
            digest: "new manifest".into(),
            reason: e.to_string(),
        })?;
    let manifest_digest = target.write_blob(&bytes)?;
    let digest = Digest::from_str(&manifest_digest).map_err(|e| ImageError::Json {
        digest: manifest_digest.clone(),
        reason: e.to_string(),
    })?;
    let mut desc = Descriptor::new(MediaType::ImageManifest, bytes.len() as u64, digest);
    desc.set_platform(chosen.platform().clone());
    desc.set_annotations(chosen.annotations().clone());
    let mut index = ImageIndex::default();
    index.set_manifests(vec![desc]);
    target.write_index(&index)?;
    Ok(reports)
}

/// The source config with `rootfs.diff_ids` replaced by the lazy layers' bindings, so
/// containerd's chain ids (its snapshot names) follow from verified content; everything
/// else is kept as it was.
fn bind_config(config: &[u8], digest: &str, bindings: &[String]) -> Result<Vec<u8>, ImageError> {
    let bad = |reason: String| ImageError::Config {
        digest: digest.to_owned(),
        reason,
    };
    let mut value: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| bad(e.to_string()))?;
    let diff_ids = value
        .pointer_mut("/rootfs/diff_ids")
        .and_then(serde_json::Value::as_array_mut)
        .ok_or_else(|| bad("no rootfs.diff_ids".into()))?;
    if diff_ids.len() != bindings.len() {
        return Err(bad(format!(
            "{} diff_ids for {} layers",
            diff_ids.len(),
            bindings.len()
        )));
    }
    *diff_ids = bindings
        .iter()
        .map(|b| serde_json::Value::String(b.clone()))
        .collect();
    serde_json::to_vec(&value).map_err(|e| bad(e.to_string()))
}
