//! Helpers for the registry tests.

use std::path::{Path, PathBuf};

use anyhow::Result;
use lazy_erofs_image::convert::{ConvertOptions, convert_layout};

/// A small two-layer image (see test-support's `make_oci_layout`) converted to a lazy
/// OCI layout under `dir`; returns the converted layout's directory.
pub fn converted_layout(dir: &Path) -> Result<PathBuf> {
    let (src, dst) = (dir.join("src"), dir.join("dst"));
    lazy_erofs_test_support::make_oci_layout(&src)?;
    convert_layout(
        &src,
        &dst,
        "linux/amd64",
        &ConvertOptions {
            repository: Some("registry.test/lazy".into()),
            ..ConvertOptions::default()
        },
        &mut |_, _, r| r,
    )?;
    Ok(dst)
}
