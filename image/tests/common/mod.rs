//! Helpers for the registry tests.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use anyhow::Result;
use lazy_erofs_image::convert::{ConvertOptions, convert_layout};
use lazy_erofs_image::registry::{Registry, RegistryBlob, RegistryOptions};

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

/// A blob of `image` read through a registry client made with `options`, on a runtime
/// of its own.
#[allow(dead_code)] // not every test binary reads blobs
pub fn registry_blob(
    options: &RegistryOptions,
    image: String,
    digest: &str,
) -> Result<RegistryBlob> {
    Ok(RegistryBlob {
        runtime: Arc::new(
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?,
        ),
        registry: Arc::new(Registry::new(options)),
        image,
        digest: digest.to_owned(),
    })
}
