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
    common::run(
        Command::new("tar")
            .args(["--numeric-owner", "-C"])
            .arg(&dir)
            .arg("-cf")
            .arg(&tar)
            .arg("./data"),
    )?;
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
    let pushed = format!(
        "{}/{}",
        registry.host,
        image.split_once('/').context("image")?.1
    );
    let layers = lazy_erofs_test_support::debian_layers()?;
    let mut tars = vec![
        layers.join("base.tar"),
        layers.join("packages.tar"),
        layers.join("python.tar"),
    ];
    tars.extend_from_slice(extra);
    let src = common::oci_layout(work, &tars, &["python3"], image)?;
    let dst = work.join("dst");
    let started = Instant::now();
    common::convert(&src, &dst, image)?;
    std::fs::remove_dir_all(&src)?;
    println!("convert: {:.1} s", started.elapsed().as_secs_f64());
    let client = Registry::new(&RegistryOptions::insecure(&registry.host));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(client.push_layout(&dst, &pushed))?;
    let (manifest, _) = runtime.block_on(client.pull_manifest(&pushed))?;
    manifest
        .layers()
        .iter()
        .map(|d| LazyLayer::from_descriptor(d)?.context("layer not lazy"))
        .collect()
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
