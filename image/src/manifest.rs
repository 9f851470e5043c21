//! How a converted image marks its lazy layers: a media type and annotations on each
//! layer descriptor. The rest of the manifest, and the config, are the source's.

use std::collections::HashMap;

use oci_spec::image::Descriptor;

/// Media type of a lazy layer blob (format v1). It sits under
/// `application/vnd.oci.image.layer.` because containerd's unpacker (CRI pulls) takes only
/// such types for layers: it fetches any other blob whole as an ordinary child and then
/// fails the pull ("mismatched image rootfs and manifest layers"). A snapshotter without
/// lazy layers gets "no processor for media-type", never a wrong apply.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.lazy-erofs";

/// The media type earlier converters wrote for the same blob format; still read (such
/// images work with `lazy-erofs pull`, not with CRI pulls: convert them again).
pub const LEGACY_LAYER_MEDIA_TYPE: &str = "application/vnd.lazy-erofs.layer.v1";

/// Whether a descriptor of `media_type` is a lazy layer.
pub fn is_lazy_layer_type(media_type: &str) -> bool {
    media_type == LAYER_MEDIA_TYPE || media_type == LEGACY_LAYER_MEDIA_TYPE
}

/// Annotation keys on a lazy layer's descriptor.
pub mod annotation {
    /// `sha256:…` of header + EROFS metadata + chunk table: the trust anchor.
    pub const VERIFIED_DIGEST: &str = "dev.lazy-erofs.layer.verified-digest";
    /// Size in bytes of the uncompressed data space.
    pub const DATA_SPACE_SIZE: &str = "dev.lazy-erofs.layer.data-space-size";
    pub const CHUNK_SIZE: &str = "dev.lazy-erofs.layer.chunk-size";
    pub const METADATA_SIZE: &str = "dev.lazy-erofs.layer.metadata-size";
    /// Data-space bytes at the start that hold the files the image reads as it starts
    /// (laid out first by `convert --prefetch`); absent when none are.
    pub const STARTUP_SIZE: &str = "dev.lazy-erofs.layer.startup-size";
    /// The source layer's diff id (sha256 of its uncompressed tar), as in the config.
    pub const SOURCE_DIFF_ID: &str = "dev.lazy-erofs.layer.source-diff-id";
    /// The source layer blob's digest.
    pub const SOURCE_DIGEST: &str = "dev.lazy-erofs.layer.source-digest";
    /// On the manifest: the format version of its lazy layers.
    pub const FORMAT: &str = "dev.lazy-erofs.format";
    /// On the manifest: paths to fetch as soon as the image is pulled (files, or
    /// directories read whole), one absolute path per line.
    pub const PREFETCH: &str = "dev.lazy-erofs.prefetch";
}

/// Most paths a prefetch list may hold; a longer one is refused, not truncated.
pub const PREFETCH_MAX_PATHS: usize = 10_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PrefetchListError {
    #[error("prefetch list line {line}: {path:?} is not an absolute path")]
    NotAbsolute { line: usize, path: String },
    #[error("prefetch list line {line}: {path:?} has a '..' component")]
    Escapes { line: usize, path: String },
    #[error("prefetch list line {line}: longer than 4096 bytes")]
    TooLong { line: usize },
    #[error("prefetch list holds more than {PREFETCH_MAX_PATHS} paths")]
    TooMany,
}

/// Parses a prefetch list: one absolute path per line; blank lines and lines starting
/// with `#` are skipped, surrounding blanks trimmed, repeats dropped. Paths come back
/// normalised (no `.` components, single slashes, no trailing slash).
pub fn parse_prefetch_list(text: &str) -> Result<Vec<String>, PrefetchListError> {
    let mut paths: Vec<String> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let path = raw.trim();
        if path.is_empty() || path.starts_with('#') {
            continue;
        }
        if path.len() > 4096 {
            return Err(PrefetchListError::TooLong { line });
        }
        if !path.starts_with('/') {
            return Err(PrefetchListError::NotAbsolute {
                line,
                path: path.to_owned(),
            });
        }
        let mut parts = Vec::new();
        for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            if part == ".." {
                return Err(PrefetchListError::Escapes {
                    line,
                    path: path.to_owned(),
                });
            }
            parts.push(part);
        }
        let normal = format!("/{}", parts.join("/"));
        if !paths.contains(&normal) {
            if paths.len() == PREFETCH_MAX_PATHS {
                return Err(PrefetchListError::TooMany);
            }
            paths.push(normal);
        }
    }
    Ok(paths)
}

/// The tag of a layer's data device (its fscache cookie name, at most 64 bytes), derived
/// from the source diff id: unique per layer content, so layers sharing an fscache domain
/// never collide, and computable from the manifest alone.
pub fn data_tag(source_diff_id: &str) -> String {
    let hex = source_diff_id
        .strip_prefix("sha256:")
        .unwrap_or(source_diff_id);
    format!("lazy-erofs-{}", hex.get(..52).unwrap_or(hex))
}

/// The diff id a converted image's config gives a lazy layer: a digest of the layer's
/// verified-region digest (which fixes every byte of it through the chunk table) and the
/// repository (`registry/repository`) the image is served from. containerd names the
/// layer's snapshot after the chain of these, so a snapshot name can only be claimed by
/// an image whose verified bytes, from that repository, are that layer (DESIGN.md,
/// "Isolation between images").
pub fn layer_binding(verified_digest: &str, repository: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(b"lazy-erofs layer v1\0");
    hash.update(verified_digest.as_bytes());
    hash.update(b"\0");
    hash.update(repository.as_bytes());
    format!("sha256:{}", crate::blob::hex(&hash.finalize()))
}

/// The chain id containerd computes for a layer on top of `parent` (the OCI image
/// spec's definition): the diff id itself for a base layer, else
/// `sha256(parent + " " + diff_id)`.
pub fn chain_id(parent: Option<&str>, diff_id: &str) -> String {
    use sha2::{Digest, Sha256};
    match parent {
        None | Some("") => diff_id.to_owned(),
        Some(parent) => format!(
            "sha256:{}",
            crate::blob::hex(&Sha256::digest(format!("{parent} {diff_id}")))
        ),
    }
}

/// The chain id of each layer prefix, as containerd names committed snapshots.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = chain_id(chain.last().map(String::as_str), diff_id);
        chain.push(next);
    }
    chain
}

/// The fscache `fsid` (and mount and blob file name) of a lazy layer from one
/// repository: named after its [`layer_binding`], so the same layer from the same
/// repository shares one mount and cache, and nothing else ever does.
pub fn layer_fsid(binding: &str) -> String {
    let hex = binding.trim_start_matches("sha256:");
    format!("lazy-erofs-m-{}", hex.get(..51).unwrap_or(hex))
}

/// What the snapshotter and fetcher need to know about a lazy layer, from its descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyLayer {
    pub digest: String,
    pub size: u64,
    pub verified_digest: String,
    pub data_space_size: u64,
    pub chunk_size: u32,
    pub metadata_size: u64,
    pub source_diff_id: String,
    /// Data-space bytes at the start holding the start-up files (0: none). A fetch
    /// hint only: what is served is still checked chunk by chunk.
    pub startup_size: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("lazy layer {digest}: annotation {key} is missing")]
    Missing { digest: String, key: &'static str },
    #[error("lazy layer {digest}: annotation {key}={value:?} is malformed")]
    Malformed {
        digest: String,
        key: &'static str,
        value: String,
    },
}

impl LazyLayer {
    /// This layer's diff id in an image served from `repository` (see [`layer_binding`]).
    pub fn binding(&self, repository: &str) -> String {
        layer_binding(&self.verified_digest, repository)
    }

    /// Length of the blob's verified region (header, metadata, chunk table), so it can
    /// be fetched in one request.
    pub fn verified_region_len(&self) -> u64 {
        let chunks = self.data_space_size.div_ceil(u64::from(self.chunk_size));
        crate::blob::HEADER_SIZE
            .saturating_add(self.metadata_size)
            .saturating_add(chunks.saturating_mul(crate::blob::ENTRY_SIZE as u64))
            .min(self.size)
    }

    /// The tag of this layer's data device (see [`data_tag`]).
    pub fn data_tag(&self) -> String {
        data_tag(&self.source_diff_id)
    }

    /// `Ok(None)` for a descriptor that is not a lazy layer; an error for a lazy layer
    /// whose annotations are missing or malformed.
    pub fn from_descriptor(desc: &Descriptor) -> Result<Option<Self>, ManifestError> {
        if !is_lazy_layer_type(desc.media_type().as_ref()) {
            return Ok(None);
        }
        let digest = desc.digest().to_string();
        let empty = HashMap::new();
        let notes = desc.annotations().as_ref().unwrap_or(&empty);
        let get = |key: &'static str| {
            notes
                .get(key)
                .cloned()
                .ok_or_else(|| ManifestError::Missing {
                    digest: digest.clone(),
                    key,
                })
        };
        let number = |key: &'static str| -> Result<u64, ManifestError> {
            let value = get(key)?;
            value.parse().map_err(|_| ManifestError::Malformed {
                digest: digest.clone(),
                key,
                value,
            })
        };
        let sha = |key: &'static str| -> Result<String, ManifestError> {
            let value = get(key)?;
            let ok = value
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            if ok {
                Ok(value)
            } else {
                Err(ManifestError::Malformed {
                    digest: digest.clone(),
                    key,
                    value,
                })
            }
        };
        let chunk_size = number(annotation::CHUNK_SIZE)?;
        let chunk_size = u32::try_from(chunk_size)
            .ok()
            .filter(|c| *c > 0 && c.is_multiple_of(4096) && *c <= crate::blob::MAX_CHUNK_SIZE)
            .ok_or_else(|| ManifestError::Malformed {
                digest: digest.clone(),
                key: annotation::CHUNK_SIZE,
                value: chunk_size.to_string(),
            })?;
        let startup_size = match notes.get(annotation::STARTUP_SIZE) {
            None => 0,
            Some(_) => number(annotation::STARTUP_SIZE)?,
        };
        let layer = Self {
            startup_size,
            size: desc.size(),
            verified_digest: sha(annotation::VERIFIED_DIGEST)?,
            data_space_size: number(annotation::DATA_SPACE_SIZE)?,
            chunk_size,
            metadata_size: number(annotation::METADATA_SIZE)?,
            source_diff_id: sha(annotation::SOURCE_DIFF_ID)?,
            digest,
        };
        if layer.startup_size > layer.data_space_size {
            return Err(ManifestError::Malformed {
                digest: layer.digest,
                key: annotation::STARTUP_SIZE,
                value: format!(
                    "{} (past the data space's {} bytes)",
                    layer.startup_size, layer.data_space_size
                ),
            });
        }
        // What a reader would have to hold in memory before it can verify anything.
        let region = crate::blob::HEADER_SIZE
            .saturating_add(layer.metadata_size)
            .saturating_add(
                layer
                    .data_space_size
                    .div_ceil(u64::from(chunk_size))
                    .saturating_mul(crate::blob::ENTRY_SIZE as u64),
            );
        if region > crate::blob::MAX_REGION_SIZE {
            return Err(ManifestError::Malformed {
                digest: layer.digest,
                key: annotation::METADATA_SIZE,
                value: format!(
                    "{} (with data-space-size {}: a verified region of {region} bytes, over \
                     the {} allowed)",
                    layer.metadata_size,
                    layer.data_space_size,
                    crate::blob::MAX_REGION_SIZE
                ),
            });
        }
        Ok(Some(layer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::MediaType;
    use std::str::FromStr;

    const SHA: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        // Diff ids: sha256 of "a", "b", "c"; expected values from `sha256sum` of
        // "<chain> <diff id>".
        let diff_ids = [
            "sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb",
            "sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d",
            "sha256:2e7d2c03a9507ae265ecf5b5356885a53393a2029d241394997265a1a25aefc6",
        ]
        .map(String::from);
        assert_eq!(
            chain_ids(&diff_ids),
            [
                diff_ids[0].clone(),
                "sha256:51c0c8ace48498d6f5fee6b0592cc06f2da0f3cbe09c5a34a97dce85c3889676"
                    .to_owned(),
                "sha256:2fce7f8ce91bcf0a1428b36e1024639fdbd9469eea762dba98aa749631885106"
                    .to_owned(),
            ]
        );
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn prefetch_lists_are_normalised_and_bad_lines_named() {
        let list = "# python start-up\n/usr/bin/python3.11\n\n  /usr/lib//python3.11/./json/  \n/usr/bin/python3.11\n/\n";
        assert_eq!(
            parse_prefetch_list(list).unwrap(),
            ["/usr/bin/python3.11", "/usr/lib/python3.11/json", "/"]
        );
        assert_eq!(
            parse_prefetch_list("/a\nusr/lib\n"),
            Err(PrefetchListError::NotAbsolute {
                line: 2,
                path: "usr/lib".into()
            })
        );
        let err = parse_prefetch_list("/usr/../etc/shadow").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(matches!(err, PrefetchListError::Escapes { .. }));
        let many: String = (0..=PREFETCH_MAX_PATHS)
            .map(|i| format!("/f{i}\n"))
            .collect();
        assert_eq!(parse_prefetch_list(&many), Err(PrefetchListError::TooMany));
    }

    #[test]
    fn data_tags_fit_the_device_slot_and_differ_per_layer() {
        let a = data_tag(SHA);
        let b = data_tag(&format!("sha256:1{}", &SHA[8..]));
        assert!(a.len() <= 64 && b.len() <= 64, "{a}");
        assert_ne!(a, b);
        assert!(a.starts_with("lazy-erofs-0000"));
    }

    fn descriptor(media_type: &str, notes: &[(&str, &str)]) -> Descriptor {
        let digest = oci_spec::image::Digest::from_str(SHA).expect("digest");
        let mut d = Descriptor::new(MediaType::from(media_type), 42, digest);
        d.set_annotations(Some(
            notes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ));
        d
    }

    fn complete() -> Vec<(&'static str, &'static str)> {
        vec![
            (annotation::VERIFIED_DIGEST, SHA),
            (annotation::DATA_SPACE_SIZE, "8192"),
            (annotation::CHUNK_SIZE, "1048576"),
            (annotation::METADATA_SIZE, "4096"),
            (annotation::SOURCE_DIFF_ID, SHA),
        ]
    }

    #[test]
    fn plain_layers_are_not_lazy() {
        let d = descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &[]);
        assert_eq!(LazyLayer::from_descriptor(&d), Ok(None));
    }

    #[test]
    fn containerd_takes_the_media_type_for_a_layer_and_the_old_one_still_reads() {
        // containerd's images.IsLayerType: every type under this prefix; a `+suffix`
        // would name a compression its differ then tries.
        assert!(LAYER_MEDIA_TYPE.starts_with("application/vnd.oci.image.layer."));
        assert!(!LAYER_MEDIA_TYPE.contains('+'));
        for media_type in [LAYER_MEDIA_TYPE, LEGACY_LAYER_MEDIA_TYPE] {
            let layer = LazyLayer::from_descriptor(&descriptor(media_type, &complete()));
            assert!(matches!(layer, Ok(Some(_))), "{media_type}: {layer:?}");
        }
    }

    #[test]
    fn complete_annotations_parse() {
        let layer = LazyLayer::from_descriptor(&descriptor(LAYER_MEDIA_TYPE, &complete()))
            .expect("parse")
            .expect("lazy");
        assert_eq!(
            (layer.size, layer.chunk_size, layer.data_space_size),
            (42, 1 << 20, 8192)
        );
    }

    #[test]
    fn missing_or_malformed_annotations_are_named() {
        let mut notes = complete();
        notes.retain(|(k, _)| *k != annotation::VERIFIED_DIGEST);
        let err =
            LazyLayer::from_descriptor(&descriptor(LAYER_MEDIA_TYPE, &notes)).expect_err("missing");
        assert!(
            err.to_string().contains(annotation::VERIFIED_DIGEST),
            "{err}"
        );
        for (key, bad) in [
            (annotation::VERIFIED_DIGEST, "sha256:xyz"),
            (annotation::DATA_SPACE_SIZE, "-1"),
            (annotation::CHUNK_SIZE, "1000"),
            (annotation::CHUNK_SIZE, "0"),
            (annotation::CHUNK_SIZE, "4294963200"),
            (annotation::METADATA_SIZE, "18446744073709551615"),
            (annotation::DATA_SPACE_SIZE, "18446744073709551615"),
        ] {
            let notes: Vec<_> = complete()
                .into_iter()
                .map(|(k, v)| if k == key { (k, bad) } else { (k, v) })
                .collect();
            let err =
                LazyLayer::from_descriptor(&descriptor(LAYER_MEDIA_TYPE, &notes)).expect_err(bad);
            assert!(
                matches!(err, ManifestError::Malformed { .. }),
                "{key}={bad}: {err}"
            );
        }
    }
}
