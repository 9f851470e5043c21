//! What makes a cold start fast, on the fanotify backend (this host's kernel; the 7.x
//! test VM runs it too):
//! - start-up files first: an image converted with a prefetch list has those files at
//!   the start of its layer. The first read of the layer opens it, and the fetcher then
//!   fetches the whole start-up region before anyone reads it; the listed files then
//!   read right without another registry byte, and an unlisted file is still fetched on
//!   demand;
//! - mounting ahead: the first Prepare of an image's lazy layer mounts the layers above
//!   it too, before containerd prepares them;
//! - through the snapshotter, an image's start-up regions are fetched once its top layer
//!   is mounted (its last region fetch done), before anyone reads them.

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
    // The verified region was fetched once, by serve (the fetcher read it back).
    let region_len = layer.verified_region_len();
    let responses = image.registry.blob_responses(&layer.digest);
    ensure!(
        responses.iter().filter(|&&n| n == region_len).count() == 1,
        "the verified region ({region_len} bytes) was not fetched exactly once: {responses:?}"
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
    let image = pushed_layers(work, 3, 1, 1 << 20, &[]).await?;
    let daemon = prepare_lazily(
        work,
        &image.registry.host,
        &image.reference,
        &image.manifest_digest,
        &image.layers[0],
    )
    .await?;
    wait_until_mounted(&daemon, &image.layers).await?;
    let log = daemon.log();
    ensure!(
        log.matches("lazy layer mounted").count() == 3,
        "three mounts, once each:\n{log}"
    );
    Ok(())
}

/// The snapshotter starts the fetch of an image's start-up regions once the image's top
/// layer is mounted (the broker hands the fetcher a layer only with a read, so it reads
/// one byte of each), not as each layer mounts: the regions the mounts fetch do not
/// queue behind start-up data. Nobody reads here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_host_fanotify_startup_regions_are_fetched_once_the_top_layer_is_mounted()
-> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "needs root (fanotify, mount)"
    );
    let work = fanotify::work_dir()?;
    let work = work.path();
    let listed = ["/data/layer0/file1", "/data/layer1/file1"];
    let image = pushed_layers(work, 2, 3, FILE_SIZE, &listed).await?;
    // Without its prefetch list: the snapshotter's prefetch would read the listed files
    // once the top layer is mounted, and open the layers itself.
    let mut manifest = image.manifest.clone();
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
    for layer in &image.layers {
        ensure!(
            layer.startup_size >= FILE_SIZE as u64 && layer.startup_size < 2 * FILE_SIZE as u64,
            "start-up size {} for one file of {FILE_SIZE} bytes",
            layer.startup_size
        );
    }
    let sent = |layer: &LazyLayer| image.registry.blob_bytes_sent(&layer.digest).0;

    // The base layer's Prepare: both layers mount (the top one ahead), regions only.
    let daemon = prepare_lazily(
        work,
        &image.registry.host,
        &reference,
        &manifest_digest,
        &image.layers[0],
    )
    .await?;
    wait_until_mounted(&daemon, &image.layers).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for layer in &image.layers {
        ensure!(
            sent(layer) < layer.startup_size,
            "{} bytes of layer {} fetched before its image's top layer was prepared \
             (start-up region {})\n{}",
            sent(layer),
            layer.digest,
            layer.startup_size,
            daemon.log()
        );
    }

    // The top layer's Prepare: both start-up regions follow, and no more.
    let err = daemon
        .client()
        .await?
        .prepare(common::lazy_prepare(labels(
            &reference,
            &manifest_digest,
            &image.layers[1],
        )))
        .await
        .expect_err("a lazy layer's Prepare answers AlreadyExists");
    ensure!(err.code() == tonic::Code::AlreadyExists, "{err:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while image.layers.iter().any(|l| sent(l) < l.startup_size)
        || daemon.log().matches("start-up region fetched").count() < 2
    {
        ensure!(
            Instant::now() < deadline,
            "fetched {:?} after the top layer's Prepare, start-up regions {:?}\n{}",
            image.layers.iter().map(sent).collect::<Vec<_>>(),
            image
                .layers
                .iter()
                .map(|l| l.startup_size)
                .collect::<Vec<_>>(),
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for layer in &image.layers {
        ensure!(
            sent(layer) < layer.startup_size + FILE_SIZE as u64,
            "{} bytes fetched of layer {} for a start-up region of {}: more than the region",
            sent(layer),
            layer.digest,
            layer.startup_size
        );
    }
    Ok(())
}

/// Files a node keeps for one image serve every image naming the same verified digest.
/// Another manifest of that digest with a smaller data space than its verified header
/// says is refused, and the shared data file keeps its size (cut short, the first
/// image's reads past its new end would see zeros).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_host_fanotify_a_kept_layer_named_with_a_wrong_size_is_refused() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "needs root (fanotify, mount)"
    );
    let work = fanotify::work_dir()?;
    let work = work.path();
    let image = pushed_layers(work, 1, 1, 1 << 20, &[]).await?;
    let layer = &image.layers[0];
    let daemon = prepare_lazily(
        work,
        &image.registry.host,
        &image.reference,
        &image.manifest_digest,
        layer,
    )
    .await?;
    let hex = layer.verified_digest.trim_start_matches("sha256:");
    let data = work.join(format!("snapshotter/layers/blobs/sha256-{hex}.data"));
    let size = std::fs::metadata(&data)?.len();
    ensure!(size == layer.data_space_size, "data file of {size} bytes");

    // The same blob in another repository (another binding, so another mount), its
    // manifest claiming half the data space.
    let other = format!("{}/lazy/other:1", image.registry.host);
    let client = Registry::new(&RegistryOptions::insecure(&image.registry.host));
    client.push_layout(&image.layout, &other).await?;
    let (mut manifest, _) = client.pull_manifest(&other).await?;
    let mut layers = manifest.layers().clone();
    let mut annotations = layers[0].annotations().clone().unwrap_or_default();
    let claimed = (layer.data_space_size / 2) & !4095;
    annotations.insert(
        lazy_erofs_image::manifest::annotation::DATA_SPACE_SIZE.to_owned(),
        claimed.to_string(),
    );
    layers[0].set_annotations(Some(annotations));
    manifest.set_layers(layers);
    let manifest_digest = put_manifest(&image.registry.host, &other, &manifest)?;
    let wrong = LazyLayer::from_descriptor(&manifest.layers()[0])?.context("not lazy")?;
    ensure!(wrong.data_space_size == claimed, "the claim did not take");

    let err = daemon
        .client()
        .await?
        .prepare(common::lazy_prepare(labels(
            &other,
            &manifest_digest,
            &wrong,
        )))
        .await
        .expect_err("a layer with a wrong data space size was prepared");
    ensure!(
        err.message().contains(&format!(
            "the verified data space is {} bytes, the manifest says {claimed}",
            layer.data_space_size
        )),
        "{err:?}"
    );
    ensure!(
        std::fs::metadata(&data)?.len() == size,
        "the shared data file went from {size} to {} bytes",
        std::fs::metadata(&data)?.len()
    );
    Ok(())
}

/// An image of `count` lazy layers in a registry of its own.
struct LayeredImage {
    registry: lazy_erofs_test_support::DockerRegistry,
    /// Its converted OCI layout, to push again elsewhere.
    layout: std::path::PathBuf,
    reference: String,
    manifest: oci_spec::image::ImageManifest,
    manifest_digest: String,
    layers: Vec<LazyLayer>,
}

/// Pushes an image whose layer `i` holds `files` pseudo-random files
/// `data/layer<i>/file<j>` of `size` bytes, converted with `prefetch` listed first.
async fn pushed_layers(
    work: &std::path::Path,
    count: u64,
    files: u64,
    size: usize,
    prefetch: &[&str],
) -> Result<LayeredImage> {
    let registry_dir = work.join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    let reference = format!("{}/lazy/layered:1", registry.host);
    let build = work.join("build");
    std::fs::create_dir_all(&build)?;
    let tars: Vec<std::path::PathBuf> = (0..count)
        .map(|i| {
            let tar = build.join(format!("layer{i}.tar"));
            let files: Vec<(String, Vec<u8>)> = (0..files)
                .map(|j| {
                    let bytes = lazy_erofs_test_support::pseudo_random(size, 31 + i * 97 + j);
                    (format!("data/layer{i}/file{j}"), bytes)
                })
                .collect();
            let entries: Vec<(&str, &[u8])> = files
                .iter()
                .map(|(p, b)| (p.as_str(), b.as_slice()))
                .collect();
            std::fs::write(&tar, lazy_erofs_test_support::layer_tar(&entries)?)?;
            Ok(tar)
        })
        .collect::<Result<_>>()?;
    let src = common::oci_layout(&build, &tars, &["sh"], &reference)?;
    let dst = build.join("dst");
    let options = ConvertOptions {
        prefetch: prefetch.iter().map(|p| (*p).to_owned()).collect(),
        ..ConvertOptions::default()
    };
    common::convert_with(&src, &dst, &reference, options)?;
    let client = Registry::new(&RegistryOptions::insecure(&registry.host));
    client.push_layout(&dst, &reference).await?;
    let (manifest, manifest_digest) = client.pull_manifest(&reference).await?;
    let layers = manifest
        .layers()
        .iter()
        .map(|d| LazyLayer::from_descriptor(d)?.context("not lazy"))
        .collect::<Result<_>>()?;
    Ok(LayeredImage {
        registry,
        layout: dst,
        reference,
        manifest,
        manifest_digest,
        layers,
    })
}

/// Waits (up to a minute) until the daemon's status shows every one of `layers` mounted.
async fn wait_until_mounted(daemon: &daemon::Daemon, layers: &[LazyLayer]) -> Result<()> {
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
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "mounted {} of {} layers\n{}",
            now.len(),
            layers.len(),
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// The labels of containerd's lazy Prepare of `layer` of `image` (`host/repository:tag`,
/// manifest `manifest_digest`).
fn labels(
    image: &str,
    manifest_digest: &str,
    layer: &LazyLayer,
) -> std::collections::HashMap<String, String> {
    use lazy_erofs_snapshotter::lazy::remote;
    let repository = image.rsplit_once(':').map_or(image, |(r, _)| r);
    [
        (remote::SNAPSHOT_REF, layer.binding(repository)),
        (remote::LAYER_DIGEST, layer.digest.clone()),
        (remote::IMAGE_REF, image.to_owned()),
        (remote::MANIFEST_DIGEST, manifest_digest.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
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
    let config = format!("[registry]\ninsecure_hosts = [\"{host}\"]\n");
    let daemon = daemon::Daemon::start_with(&work.join("snapshotter"), &config)?;
    let err = daemon
        .client()
        .await?
        .prepare(common::lazy_prepare(labels(image, manifest_digest, layer)))
        .await
        .expect_err("a lazy layer's Prepare answers AlreadyExists");
    ensure!(err.code() == tonic::Code::AlreadyExists, "{err:?}");
    Ok(daemon)
}
