//! The remote-snapshot labels containerd puts on a layer's Prepare (CRI with snapshot
//! annotations on, and `lazy-erofs pull`): which snapshot to create and which layer of
//! which image it is.

use std::collections::HashMap;

use crate::api::SnapshotError;

/// The chain id containerd wants the layer committed as.
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
pub const LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";

/// A layer Prepare that may be served lazily.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLayerRef {
    /// Name of the committed snapshot to create (the layer's chain id).
    pub target: String,
    pub image_ref: String,
    pub manifest_digest: String,
    pub layer_digest: String,
}

impl RemoteLayerRef {
    /// `Ok(None)` for an ordinary Prepare (no target or no layer digest: containerd
    /// unpacks it); an error when the labels name a layer but are incomplete or malformed.
    pub fn from_labels(labels: &HashMap<String, String>) -> Result<Option<Self>, SnapshotError> {
        let (Some(target), Some(layer_digest)) =
            (labels.get(SNAPSHOT_REF), labels.get(LAYER_DIGEST))
        else {
            return Ok(None);
        };
        let get = |key: &str| {
            labels
                .get(key)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or_else(|| {
                    SnapshotError::InvalidArgument(format!(
                        "label {LAYER_DIGEST} is set but {key} is missing or empty"
                    ))
                })
        };
        let reference = Self {
            target: target.clone(),
            image_ref: get(IMAGE_REF)?,
            manifest_digest: get(MANIFEST_DIGEST)?,
            layer_digest: layer_digest.clone(),
        };
        for (key, value) in [
            (MANIFEST_DIGEST, &reference.manifest_digest),
            (LAYER_DIGEST, &reference.layer_digest),
        ] {
            if !is_sha256(value) {
                return Err(SnapshotError::InvalidArgument(format!(
                    "label {key}={value:?} is not a sha256 digest"
                )));
            }
        }
        if reference.target.is_empty() {
            return Err(SnapshotError::InvalidArgument(format!(
                "label {SNAPSHOT_REF} is empty"
            )));
        }
        Ok(Some(reference))
    }
}

/// The name containerd gave a snapshot: the backend key's last part (containerd passes
/// `<namespace>/<n>/<name>` to a proxy snapshotter; tests and other clients may pass
/// the name alone).
fn name_of(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

impl RemoteLayerRef {
    /// Refuses a lazy layer whose target name is not the chain id its verified content
    /// gives on top of `parent`: containerd takes a snapshot name as proof of content
    /// and reuses it for every image with that chain, so a name must follow from what
    /// was verified (`binding`: the layer's diff id, [`lazy_erofs_image::manifest::
    /// layer_binding`]), never from an image's config alone.
    pub fn check_chain(&self, parent: &str, binding: &str) -> Result<(), SnapshotError> {
        let parent_chain = (!parent.is_empty()).then(|| name_of(parent));
        let expected = lazy_erofs_image::manifest::chain_id(parent_chain, binding);
        let claimed = name_of(&self.target);
        if claimed == expected {
            return Ok(());
        }
        Err(SnapshotError::InvalidArgument(format!(
            "lazy layer {} of {}: containerd names its snapshot {claimed}, but its verified \
             content from this repository makes it {expected} (the image's config does not \
             bind this layer: a config claiming another layer's diff id, or an image \
             converted for another repository; convert it again with lazy-erofs convert)",
            self.layer_digest, self.image_ref
        )))
    }
}

fn is_sha256(value: &str) -> bool {
    value
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ordinary_prepares_are_not_remote() {
        for l in [
            labels(&[]),
            labels(&[(SNAPSHOT_REF, "sha256:chain")]),
            labels(&[(LAYER_DIGEST, DIGEST)]),
        ] {
            assert_eq!(RemoteLayerRef::from_labels(&l).expect("ok"), None);
        }
    }

    #[test]
    fn complete_labels_name_the_layer() {
        let l = labels(&[
            (SNAPSHOT_REF, "sha256:chain"),
            (LAYER_DIGEST, DIGEST),
            (IMAGE_REF, "localhost:5000/py:1"),
            (MANIFEST_DIGEST, DIGEST),
        ]);
        let r = RemoteLayerRef::from_labels(&l)
            .expect("ok")
            .expect("remote");
        assert_eq!(r.target, "sha256:chain");
        assert_eq!(r.image_ref, "localhost:5000/py:1");
    }

    #[test]
    fn only_the_verified_chain_is_accepted() {
        let binding = lazy_erofs_image::manifest::layer_binding(DIGEST, "r.example/app");
        let parent = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
        let on_parent = lazy_erofs_image::manifest::chain_id(Some(parent), &binding);
        let remote = |target: &str| RemoteLayerRef {
            target: target.into(),
            image_ref: "r.example/app:1".into(),
            manifest_digest: DIGEST.into(),
            layer_digest: DIGEST.into(),
        };
        // As containerd passes them to a proxy snapshotter, and bare.
        remote(&format!("default/7/{binding}"))
            .check_chain("", &binding)
            .expect("base layer");
        remote(&on_parent)
            .check_chain(&format!("k8s.io/3/{parent}"), &binding)
            .expect("on a parent");
        let err = remote(&format!("default/8/{parent}"))
            .check_chain("", &binding)
            .expect_err("claimed another name");
        assert!(matches!(err, SnapshotError::InvalidArgument(_)));
        let text = err.to_string();
        for part in [parent, binding.as_str(), DIGEST, "r.example/app:1"] {
            assert!(text.contains(part), "{part} missing from {text}");
        }
        // The right name on the wrong parent is refused too.
        assert!(remote(&binding).check_chain(parent, &binding).is_err());
    }

    #[test]
    fn incomplete_or_malformed_labels_are_named() {
        let missing = labels(&[
            (SNAPSHOT_REF, "c"),
            (LAYER_DIGEST, DIGEST),
            (IMAGE_REF, "r"),
        ]);
        let err = RemoteLayerRef::from_labels(&missing).expect_err("missing");
        assert!(err.to_string().contains(MANIFEST_DIGEST), "{err}");
        let bad = labels(&[
            (SNAPSHOT_REF, "c"),
            (LAYER_DIGEST, "sha256:zz"),
            (IMAGE_REF, "r"),
            (MANIFEST_DIGEST, DIGEST),
        ]);
        let err = RemoteLayerRef::from_labels(&bad).expect_err("malformed");
        assert!(matches!(err, SnapshotError::InvalidArgument(_)));
        assert!(err.to_string().contains(LAYER_DIGEST), "{err}");
    }
}
