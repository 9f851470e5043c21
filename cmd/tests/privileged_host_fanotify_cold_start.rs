//! What makes a cold start fast, on the fanotify backend (this host's kernel; the 7.x
//! test VM runs it too):
//! - start-up files first: an image converted with a prefetch list has those files at
//!   the start of its layer. The first read of the layer opens it, and the fetcher then
//!   fetches the whole start-up region before anyone reads it; the listed files then
//!   read right without another registry byte, and an unlisted file is still fetched on
//!   demand;
//! - mounting ahead: the first Prepare of an image's lazy layer mounts the layers above
//!   it too, before containerd prepares them;
//! - through the snapshotter, a layer's start-up region is fetched as the layer is
//!   mounted, before anyone reads it.

mod common;
#[path = "snapshotter/daemon.rs"]
mod daemon;
mod fanotify;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use lazy_erofs_image::convert::ConvertOptions;
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::{Registry, RegistryOptions};

const FILE_SIZE: usize = 3 << 20;

#[test]
fn privileged_host_fanotify_startup_region_is_fetched_before_it_is_read() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "needs root (fanotify, mount)"
    );
    let work = fanotify::work_dir()?;
    let work = work.path();
    let options = ConvertOptions {
        prefetch: vec!["/data/file1".into(), "/data/file3".into()],
        ..ConvertOptions::default()
    };
    let image = fanotify::pushed_image_with(work, 4, FILE_SIZE, options)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let client = Registry::new(&RegistryOptions::insecure(&image.registry.host));
    let (manifest, _) = runtime.block_on(client.pull_manifest(&image.reference))?;
    let layer = LazyLayer::from_descriptor(&manifest.layers()[0])?.context("not lazy")?;
    ensure!(
        layer.startup_size >= 2 * FILE_SIZE as u64 && layer.startup_size < 3 * FILE_SIZE as u64,
        "start-up size {} for two files of {FILE_SIZE} bytes",
        layer.startup_size
    );
    let sent = || image.registry.blob_bytes_sent(&layer.digest).0;
    let _serve = fanotify::serve(work, &image, None, true)?;
    let _unmount = fanotify::MountGuard(&work.join("mnt/0"));

    // One page of a listed file: the layer opens, the start-up region follows.
    let before = sent();
    let (name, bytes) = &image.files[1];
    let file1 = std::fs::File::open(fanotify::path(work, name))?;
    ensure!(
        fanotify::read_range(&file1, 0, 4096)? == bytes[..4096],
        "{name} differs"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    // The listed files are incompressible: the region costs at least their bytes.
    while sent() < before + 2 * FILE_SIZE as u64 {
        ensure!(
            Instant::now() < deadline,
            "only {} bytes fetched after the first read, {} in the start-up region",
            sent() - before,
            layer.startup_size
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The registry's count can trail the fetcher's write: let the region finish.
    std::thread::sleep(Duration::from_millis(500));
    let after_region = sent();
    for i in [1, 3] {
        let (name, bytes) = &image.files[i];
        let read = std::fs::read(fanotify::path(work, name))?;
        ensure!(&read == bytes, "{name} differs");
    }
    ensure!(
        sent() == after_region,
        "{} more bytes fetched for the listed files, fetched at open",
        sent() - after_region
    );
    // Control: an unlisted file is still fetched when read, and reads right.
    let (name, bytes) = &image.files[2];
    ensure!(
        &std::fs::read(fanotify::path(work, name))? == bytes,
        "{name} differs"
    );
    ensure!(
        sent() > after_region,
        "reading an unlisted file fetched nothing: the measure is blind"
    );
    println!(
        "start-up region {} bytes; {} bytes sent after the first read; unlisted file {} more",
        layer.startup_size,
        after_region - before,
        sent() - after_region
    );
    Ok(())
}

/// containerd prepares an image's layers one at a time; the first lazy Prepare mounts
/// the image's other lazy layers in the background, so theirs find them mounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_host_fanotify_layers_above_the_first_prepared_are_mounted_ahead() -> Result<()>
{
    ensure!(
        nix::unistd::geteuid().is_root(),
        "needs root (fanotify, mount)"
    );
    let work = fanotify::work_dir()?;
    let work = work.path();
    let registry_dir = work.join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    let image = format!("{}/lazy/ahead:1", registry.host);
    let build = work.join("build");
    std::fs::create_dir_all(&build)?;
    let tars: Vec<std::path::PathBuf> = (0..3)
        .map(|i| {
            let tar = build.join(format!("layer{i}.tar"));
            let bytes = lazy_erofs_test_support::pseudo_random(1 << 20, 31 + i);
            std::fs::write(
                &tar,
                lazy_erofs_test_support::layer_tar(&[(&format!("data/layer{i}"), &bytes)])?,
            )?;
            Ok(tar)
        })
        .collect::<Result<_>>()?;
    let src = common::oci_layout(&build, &tars, &["sh"], &image)?;
    let dst = build.join("dst");
    common::convert(&src, &dst, &image)?;
    let client = Registry::new(&RegistryOptions::insecure(&registry.host));
    client.push_layout(&dst, &image).await?;
    let (manifest, manifest_digest) = client.pull_manifest(&image).await?;
    let layers: Vec<LazyLayer> = manifest
        .layers()
        .iter()
        .map(|d| LazyLayer::from_descriptor(d)?.context("not lazy"))
        .collect::<Result<_>>()?;
    let daemon = prepare_lazily(work, &registry.host, &image, &manifest_digest, &layers[0]).await?;
    let mounted = || -> Result<Vec<String>> {
        let status = common::run(
            std::process::Command::new(lazy_erofs_test_support::bin_exe!("lazy-erofs"))
                .args(["status", "--json", "--address"])
                .arg(&daemon.socket),
        )?;
        let status: serde_json::Value = serde_json::from_str(&status)?;
        Ok(status["layers"]
            .as_array()
            .context("layers")?
            .iter()
            .filter(|l| l["mount"].is_string())
            .filter_map(|l| l["digest"].as_str().map(str::to_owned))
            .collect())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = mounted()?;
        if layers.iter().all(|l| now.contains(&l.digest)) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "after the first Prepare, mounted {} of 3 layers\n{}",
            now.len(),
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = daemon.log();
    ensure!(
        log.matches("lazy layer mounted").count() == 3,
        "three mounts, once each:\n{log}"
    );
    Ok(())
}

/// The snapshotter opens a start-up layer as it mounts it (the broker hands the fetcher a
/// layer only with a read), so its region is fetched before any container reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_host_fanotify_snapshotter_fetches_a_startup_region_as_it_mounts() -> Result<()>
{
    ensure!(
        nix::unistd::geteuid().is_root(),
        "needs root (fanotify, mount)"
    );
    let work = fanotify::work_dir()?;
    let work = work.path();
    let options = ConvertOptions {
        prefetch: vec!["/data/file1".into(), "/data/file3".into()],
        ..ConvertOptions::default()
    };
    let image =
        tokio::task::block_in_place(|| fanotify::pushed_image_with(work, 4, FILE_SIZE, options))?;
    let client = Registry::new(&RegistryOptions::insecure(&image.registry.host));
    let (mut manifest, _) = client.pull_manifest(&image.reference).await?;
    let layer = LazyLayer::from_descriptor(&manifest.layers()[0])?.context("not lazy")?;
    // The same image without its prefetch list: the snapshotter's prefetch would read
    // the listed files right after the mount, and open the layer itself.
    let mut annotations = manifest.annotations().clone().unwrap_or_default();
    ensure!(
        annotations
            .remove(lazy_erofs_image::manifest::annotation::PREFETCH)
            .is_some(),
        "no prefetch list on the converted image"
    );
    manifest.set_annotations(Some(annotations));
    let (repository, _) = image.reference.rsplit_once(':').context("tag")?;
    let reference = format!("{repository}:no-prefetch");
    let manifest_digest = put_manifest(&image.registry.host, &reference, &manifest)?;
    let daemon = prepare_lazily(
        work,
        &image.registry.host,
        &reference,
        &manifest_digest,
        &layer,
    )
    .await?;
    let sent = || image.registry.blob_bytes_sent(&layer.digest).0;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Nobody reads: only the mount's own open of the region can fetch the listed files.
    while sent() < 2 * FILE_SIZE as u64 || !daemon.log().contains("start-up region fetched") {
        ensure!(
            Instant::now() < deadline,
            "{} bytes fetched after the mount, {} in the start-up region\n{}",
            sent(),
            layer.startup_size,
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ensure!(
        sent() < 3 * FILE_SIZE as u64,
        "{} bytes fetched for a start-up region of {}: more than the region",
        sent(),
        layer.startup_size
    );
    Ok(())
}

/// PUTs `manifest` as `reference` (`host/repository:tag`); returns its digest.
fn put_manifest(
    host: &str,
    reference: &str,
    manifest: &oci_spec::image::ImageManifest,
) -> Result<String> {
    use sha2::Digest;
    use std::io::{Read, Write};
    let body = serde_json::to_vec(manifest)?;
    let (path, tag) = reference
        .strip_prefix(&format!("{host}/"))
        .and_then(|rest| rest.rsplit_once(':'))
        .context("reference")?;
    let mut stream = std::net::TcpStream::connect(host)?;
    write!(
        stream,
        "PUT /v2/{path}/manifests/{tag} HTTP/1.1\r\nHost: {host}\r\n\
         Content-Type: application/vnd.oci.image.manifest.v1+json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(&body)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    ensure!(reply.starts_with("HTTP/1.1 201"), "manifest PUT: {reply}");
    Ok(format!("sha256:{:x}", sha2::Sha256::digest(&body)))
}

/// Starts the snapshotter under `work` and makes the lazy Prepare containerd makes for
/// `layer` of `image` (`host/repository:tag`, manifest `manifest_digest`).
async fn prepare_lazily(
    work: &std::path::Path,
    host: &str,
    image: &str,
    manifest_digest: &str,
    layer: &LazyLayer,
) -> Result<daemon::Daemon> {
    use lazy_erofs_snapshotter::lazy::remote;
    let (repository, _) = image.rsplit_once(':').context("tag")?;
    let labels: std::collections::HashMap<String, String> = [
        (remote::SNAPSHOT_REF, layer.binding(repository)),
        (remote::LAYER_DIGEST, layer.digest.clone()),
        (remote::IMAGE_REF, image.to_owned()),
        (remote::MANIFEST_DIGEST, manifest_digest.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let config = format!("[registry]\ninsecure_hosts = [\"{host}\"]\n");
    let daemon = daemon::Daemon::start_with(&work.join("snapshotter"), &config)?;
    let err = daemon
        .client()
        .await?
        .prepare(common::lazy_prepare(labels))
        .await
        .expect_err("a lazy layer's Prepare answers AlreadyExists");
    ensure!(err.code() == tonic::Code::AlreadyExists, "{err:?}");
    Ok(daemon)
}
