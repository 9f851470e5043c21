//! The test image of the VM stories: Debian + python3 layers and a layer of big
//! pseudo-random files, converted and pushed to the registry on the guest loopback.

// Shared by several test binaries; each uses a part.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::{Registry, RegistryOptions};
use lazy_erofs_test_support::DockerRegistry;
use sha2::{Digest, Sha256};

use crate::common;

pub const BIG_FILE_MIB: usize = 256;
/// Read only when the snapshotter is stopped under its reader.
pub const LATE_FILE_MIB: usize = 64;

/// The last layer: `/data/big.bin` and `/data/late.bin`, pseudo-random.
pub struct BigFiles {
    pub tar: PathBuf,
    pub big_hash: String,
    pub late_hash: String,
}

pub fn big_files_layer(work: &Path) -> Result<BigFiles> {
    let dir = work.join("big");
    std::fs::create_dir_all(dir.join("data"))?;
    let write = |name: &str, mib: usize, seed: u64| -> Result<String> {
        let bytes = lazy_erofs_test_support::pseudo_random(mib << 20, seed);
        std::fs::write(dir.join("data").join(name), &bytes)?;
        Ok(lazy_erofs_image::blob::hex(&Sha256::digest(&bytes)))
    };
    let big_hash = write("big.bin", BIG_FILE_MIB, 0x1a2e)?;
    let late_hash = write("late.bin", LATE_FILE_MIB, 0x1a7e)?;
    let tar = work.join("big.tar");
    common::tar_of(&dir, "./data", &tar)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(BigFiles {
        tar,
        big_hash,
        late_hash,
    })
}

/// The Debian + python3 layers plus `extra`, converted for `image` (the name it is
/// pulled by: its repository is bound into the config) and pushed to `registry` under
/// the same repository; returns the lazy layers of the pushed manifest.
pub fn push_converted(
    work: &Path,
    registry: &DockerRegistry,
    image: &str,
    extra: &[PathBuf],
) -> Result<Vec<LazyLayer>> {
    let options = RegistryOptions::insecure(&registry.host);
    push_converted_with(work, &options, &registry.host, image, extra)
}

/// [`push_converted`] to the registry at `host`, reached with `options` (credentials).
pub fn push_converted_with(
    work: &Path,
    options: &RegistryOptions,
    host: &str,
    image: &str,
    extra: &[PathBuf],
) -> Result<Vec<LazyLayer>> {
    let mut tars = python_tars()?;
    tars.extend_from_slice(extra);
    let src = common::oci_layout(work, &tars, &["python3"], image)?;
    let dst = work.join("dst");
    let started = Instant::now();
    common::convert(&src, &dst, image)?;
    std::fs::remove_dir_all(&src)?;
    println!("convert: {:.1} s", started.elapsed().as_secs_f64());
    let pushed = push_layout(options, &dst, &at_host(host, image)?)?;
    std::fs::remove_dir_all(&dst)?;
    let (manifest, _) = runtime()?.block_on(Registry::new(options).pull_manifest(&pushed))?;
    manifest
        .layers()
        .iter()
        .map(|d| LazyLayer::from_descriptor(d)?.context("layer not lazy"))
        .collect()
}

/// The same Debian + python3 layers as an ordinary image (gzip tar layers, as
/// registries usually hold them), pushed to the registry at `host` for `image`.
/// Returns the pushed layers' digests and sizes.
pub fn push_plain(
    work: &Path,
    options: &RegistryOptions,
    host: &str,
    image: &str,
) -> Result<Vec<(String, u64)>> {
    let layout = work.join("plain-layout");
    let script = lazy_erofs_test_support::checkout().join("packaging/demo/oci-layout.py");
    common::run(
        Command::new("python3")
            .arg(script)
            .args(["--gzip", "--ref", image])
            .arg(&layout)
            .arg(r#"["python3"]"#)
            .args(python_tars()?),
    )?;
    let pushed = push_layout(options, &layout, &at_host(host, image)?)?;
    std::fs::remove_dir_all(&layout)?;
    let (manifest, _) = runtime()?.block_on(Registry::new(options).pull_manifest(&pushed))?;
    Ok(manifest
        .layers()
        .iter()
        .map(|d| (d.digest().to_string(), d.size()))
        .collect())
}

/// Pushes the OCI layout at `layout` as `reference`; returns `reference`.
pub fn push_layout(options: &RegistryOptions, layout: &Path, reference: &str) -> Result<String> {
    runtime()?.block_on(Registry::new(options).push_layout(layout, reference))?;
    Ok(reference.to_owned())
}

fn python_tars() -> Result<Vec<PathBuf>> {
    let layers = lazy_erofs_test_support::debian_layers()?;
    Ok(["base.tar", "packages.tar", "python.tar"]
        .iter()
        .map(|name| layers.join(name))
        .collect())
}

/// `image`'s repository and tag at `host` (where it is pushed; it is pulled by another
/// name through a mirror, or through a proxy).
fn at_host(host: &str, image: &str) -> Result<String> {
    Ok(format!(
        "{host}/{}",
        image.split_once('/').context("image")?.1
    ))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Bytes the registry sent for `layers` so far, and their total size.
pub fn fetched(registry: &DockerRegistry, layers: &[LazyLayer]) -> (u64, u64) {
    layers.iter().fold((0, 0), |(sent, size), layer| {
        (
            sent + registry.blob_bytes_sent(&layer.digest).0,
            size + layer.size,
        )
    })
}

pub const PYTHON: &str = "import json, sqlite3, hashlib; \
    db = sqlite3.connect(':memory:'); \
    print(json.dumps({'sqlite': db.execute('select sqlite_version()').fetchone()[0], \
    'sha': hashlib.sha256(b'lazy-erofs').hexdigest()}))";
