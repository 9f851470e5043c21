//! Shared by the fanotify backend's host tests: a converted image of pseudo-random files
//! pushed to a real `docker-registry` on loopback, served with
//! `lazy-erofs serve --backend fanotify`.
#![allow(dead_code)] // each test binary uses a different subset

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use lazy_erofs_image::registry::{Registry, RegistryOptions};
use lazy_erofs_test_support::DockerRegistry;

use crate::common::{self, Serve, ServeOptions};

/// A fresh directory on a filesystem that takes pre-content marks: the VM's ext4 scratch
/// disk when these tests run in the 7.x test VM, else `/var/tmp` (the host's ext4 root).
pub fn work_dir() -> Result<tempfile::TempDir> {
    let parent = std::env::var_os("LAZY_EROFS_SCRATCH").unwrap_or_else(|| "/var/tmp".into());
    Ok(tempfile::tempdir_in(parent)?)
}

pub struct Image {
    pub registry: DockerRegistry,
    pub reference: String,
    /// (path inside the layer, bytes)
    pub files: Vec<(String, Vec<u8>)>,
}

/// `count` files of `size` bytes each (pseudo-random: incompressible), in one layer.
pub fn pushed_image(work: &Path, count: usize, size: usize) -> Result<Image> {
    pushed_image_chunked(
        work,
        count,
        size,
        lazy_erofs_image::blob::DEFAULT_CHUNK_SIZE,
    )
}

/// [`pushed_image`] converted with data chunks of `chunk_size` bytes.
pub fn pushed_image_chunked(
    work: &Path,
    count: usize,
    size: usize,
    chunk_size: u32,
) -> Result<Image> {
    pushed_image_with(
        work,
        count,
        size,
        lazy_erofs_image::convert::ConvertOptions {
            chunk_size,
            ..lazy_erofs_image::convert::ConvertOptions::default()
        },
    )
}

/// [`pushed_image`] converted with `options` (its repository is the image's).
pub fn pushed_image_with(
    work: &Path,
    count: usize,
    size: usize,
    options: lazy_erofs_image::convert::ConvertOptions,
) -> Result<Image> {
    let registry_dir = work.join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    let files: Vec<(String, Vec<u8>)> = (0..count)
        .map(|i| {
            (
                format!("data/file{i}"),
                lazy_erofs_test_support::pseudo_random(size, 7919 * (i as u64 + 1)),
            )
        })
        .collect();
    let entries: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, b)| (p.as_str(), b.as_slice()))
        .collect();
    let build = work.join("build");
    std::fs::create_dir_all(&build)?;
    let tar = build.join("layer.tar");
    std::fs::write(&tar, lazy_erofs_test_support::layer_tar(&entries)?)?;
    let reference = format!("{}/lazy/fanotify:1", registry.host);
    let src = common::oci_layout(&build, std::slice::from_ref(&tar), &["sh"], &reference)?;
    let dst = build.join("dst");
    common::convert_with(&src, &dst, &reference, options)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(
        Registry::new(&RegistryOptions::insecure(&registry.host)).push_layout(&dst, &reference),
    )?;
    std::fs::remove_dir_all(&build)?;
    Ok(Image {
        registry,
        reference,
        files,
    })
}

/// `serve --backend fanotify` of `image` with layers under `work/mnt`.
pub fn serve(work: &Path, image: &Image, throttle: Option<&str>, resend: bool) -> Result<Serve> {
    serve_on("fanotify", work, image, throttle, resend, &[], None)
}

/// [`serve`] on `backend` (the cachefiles benchmark in the test VM runs it too), with
/// more arguments (e.g. `--config FILE`) and a `RUST_LOG`.
pub fn serve_on(
    backend: &str,
    work: &Path,
    image: &Image,
    throttle: Option<&str>,
    resend: bool,
    args: &[String],
    log: Option<&str>,
) -> Result<Serve> {
    let mut options = ServeOptions::blob("", Path::new(""));
    options.log = log;
    options.blobs.clear();
    options.throttle = throttle;
    options.no_restore = !resend;
    options.extra_args = vec![
        "--backend".into(),
        backend.into(),
        "--image".into(),
        image.reference.clone(),
        "--insecure".into(),
        image.registry.host.clone(),
        "--mount-dir".into(),
        work.join("mnt").display().to_string(),
    ];
    options.extra_args.extend_from_slice(args);
    Serve::start(work, options)
}

/// The mounted path of `file` of layer 0.
pub fn path(work: &Path, file: &str) -> PathBuf {
    work.join("mnt/0").join(file)
}

/// Reads `len` bytes at `offset` of an open file, all or an error.
pub fn read_range(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Pids of live `fanotify-keeper` processes for the cache under `work`.
pub fn keepers(work: &Path) -> Vec<i32> {
    let needle = work.join("cache").display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("fanotify-keeper") && c.contains(&needle)
            }) && common::process_alive(*pid)
        })
        .collect()
}

/// Waits for the keeper of `work` to exit (it does once no layer file is open).
pub fn keeper_gone(work: &Path) -> Result<()> {
    common::wait_until("the keeper to exit", Duration::from_secs(15), || {
        keepers(work).is_empty()
    })
    .with_context(|| format!("keepers still alive: {:?}", keepers(work)))
}

/// Detaches whatever `serve` left mounted under `work/mnt` when a test fails midway.
pub struct MountGuard<'a>(pub &'a Path);

impl Drop for MountGuard<'_> {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.0.join("mnt")) else {
            return;
        };
        for entry in entries.flatten() {
            let _ = nix::mount::umount2(&entry.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
