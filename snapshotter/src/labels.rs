//! Label rules containerd enforces (`labels.Validate`): key plus value at most 4 KiB,
//! and a key is never empty.

use std::collections::HashMap;

use crate::api::SnapshotError;

const MAX_LABEL_BYTES: usize = 4096;

pub fn validate(labels: &HashMap<String, String>) -> Result<(), SnapshotError> {
    for (key, value) in labels {
        if key.is_empty() {
            return Err(SnapshotError::InvalidArgument("label key is empty".into()));
        }
        let len = key.len() + value.len();
        if len > MAX_LABEL_BYTES {
            let shown: String = key.chars().take(64).collect();
            return Err(SnapshotError::InvalidArgument(format!(
                "label {shown:?}: key and value length ({len} bytes) greater than maximum \
                 size ({MAX_LABEL_BYTES} bytes)"
            )));
        }
    }
    Ok(())
}

/// Applies an Update's field paths: `labels` replaces all labels, `labels.<key>` sets
/// (or, when absent from `new`, removes) one label; no paths means all labels.
pub fn apply_update(
    current: &mut HashMap<String, String>,
    new: &HashMap<String, String>,
    fieldpaths: &[String],
) -> Result<(), SnapshotError> {
    if fieldpaths.is_empty() {
        *current = new.clone();
        return Ok(());
    }
    for path in fieldpaths {
        if path == "labels" {
            *current = new.clone();
        } else if let Some(key) = path.strip_prefix("labels.") {
            match new.get(key) {
                Some(value) => {
                    current.insert(key.to_owned(), value.clone());
                }
                None => {
                    current.remove(key);
                }
            }
        } else {
            return Err(SnapshotError::InvalidArgument(format!(
                "cannot update field {path:?} (only labels and labels.<key>)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn oversized_and_empty_keys_are_refused() {
        assert!(validate(&map(&[("a", "b")])).is_ok());
        let big = "v".repeat(4096);
        let err = validate(&map(&[("k", &big)])).expect_err("accepted");
        assert!(err.to_string().contains("4097 bytes"), "{err}");
        assert!(validate(&map(&[("", "v")])).is_err());
    }

    #[test]
    fn field_paths() {
        let mut labels = map(&[("a", "1"), ("b", "2")]);
        apply_update(
            &mut labels,
            &map(&[("a", "9")]),
            &["labels.a".into(), "labels.b".into()],
        )
        .expect("valid");
        assert_eq!(labels, map(&[("a", "9")]));
        apply_update(&mut labels, &map(&[("c", "3")]), &[]).expect("valid");
        assert_eq!(labels, map(&[("c", "3")]));
        let err = apply_update(&mut labels, &map(&[]), &["name".into()]).expect_err("accepted");
        assert!(err.to_string().contains("\"name\""), "{err}");
    }
}
