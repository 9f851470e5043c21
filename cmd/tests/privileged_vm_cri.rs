//! The path a Kubernetes node takes, in the test VM: containerd 1.7 with its CRI plugin
//! on, lazy-erofs as the CRI snapshotter with snapshot annotations on, a registry mirror
//! (`hosts.toml`) naming the registry on the guest loopback, and a CRI client speaking
//! the kubelet's API. The registry wants a password, which only the kubelet has (a pull
//! secret, sent in `PullImage`); the snapshotter is configured with none and learns it
//! through its image proxy, as a node started with `--image-service-endpoint` gives it.
//!
//! In one pod: python runs from the converted Debian + python3 image before its layers
//! are downloaded, a 256 MiB file is hashed while the fetcher is killed over and over, and
//! the same image unconverted runs beside them on ordinary layers. `RemoveImage` then
//! takes the lazy snapshots and `lazy-erofs gc` their cache. Last, the same cold start on
//! containerd's own overlayfs snapshotter, for the time to first output.

#[path = "snapshotter/admin.rs"]
mod admin;
mod common;
#[path = "snapshotter/containerd.rs"]
mod containerd;
#[path = "cri/client.rs"]
mod cri;
#[path = "snapshotter/daemon.rs"]
mod daemon;
#[path = "lazy_pull/image.rs"]
mod image;

use std::path::Path;
use std::time::{Duration, Instant};

use admin::{cli_json, entry, evicted_keys, layer};
use anyhow::{Context, Result, ensure};
use containerd::Containerd;
use cri::{Credentials, Cri, Pod};
use daemon::Daemon;
use image::{
    BIG_FILE_MIB, PYTHON, big_files_layer, fetched, push_converted_with, push_layout, push_plain,
};
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::{HostOptions, RegistryOptions};
use lazy_erofs_test_support::DockerRegistry;
use sha2::{Digest, Sha256};

/// The name images are pulled by; containerd and lazy-erofs both reach it through a
/// mirror entry naming the registry on loopback (it has no DNS record).
const MIRRORED: &str = "registry.lazy.test";
/// The kubelet's namespace in containerd.
const K8S: &str = "k8s.io";
/// The pull secret's account on the registry.
const USER: &str = "puller";
const PASSWORD: &str = "pull-secret-7f3a";

#[test]
fn privileged_vm_cri_pods_run_lazily_with_the_kubelets_credentials() -> Result<()> {
    let scratch = common::scratch()?;
    let work = scratch.path();
    let registry_dir = work.join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry_with_password(
        &registry_dir,
        USER,
        PASSWORD,
    )?;
    let mut push = RegistryOptions::insecure(&registry.host);
    push.hosts
        .insert(registry.host.clone(), HostOptions::basic(USER, PASSWORD));
    let big = big_files_layer(work)?;
    let lazy = format!("{MIRRORED}/lazy/python:1");
    let layers = push_converted_with(
        work,
        &push,
        &registry.host,
        &lazy,
        std::slice::from_ref(&big.tar),
    )?;
    std::fs::remove_file(&big.tar)?;
    let plain = format!("{MIRRORED}/plain/python:1");
    let plain_layers = push_plain(work, &push, &registry.host, &plain)?;
    let pause = push_pause(work, &push, &registry.host)?;
    let secret = Credentials {
        username: USER.into(),
        password: PASSWORD.into(),
    };

    // The node: no credentials anywhere in the snapshotter's configuration.
    let proxy = work.join("image-proxy.sock");
    let containerd_dir = work.join("containerd");
    let config = format!(
        "[registry]\ninsecure_hosts = [\"{host}\"]\ndocker_config = false\n\
         [registry.hosts.\"{MIRRORED}\"]\nmirrors = [\"{host}\"]\n\
         [cache]\ngc_interval = \"0s\"\nmin_free_percent = 0\n\
         [cri]\nimage_proxy = \"{proxy}\"\ncontainerd = \"{containerd}\"\n",
        host = registry.host,
        proxy = proxy.display(),
        containerd = containerd_dir.join("containerd.sock").display(),
    );
    let daemon = Daemon::start_with(&work.join("snapshotter"), &config)?;
    let cri_toml = cri::plugin_config(
        &containerd_dir,
        MIRRORED,
        &registry.host,
        &pause,
        "lazy-erofs",
    )?;
    let containerd = Containerd::start_cri(&containerd_dir, &daemon.socket, &cri_toml)?;
    let logs = || format!("{}\n{}", containerd.log(), daemon.log());
    let mut cri = Cri::connect_with_image_endpoint(&containerd.address, &proxy)?;
    cri.pull(&pause, Some(&secret)).with_context(logs)?;

    let started = Instant::now();
    let image_ref = cri.pull(&lazy, Some(&secret)).with_context(logs)?;
    let pulled = started.elapsed();
    let pod = cri.run_pod("lazy", &work.join("pods/lazy"))?;
    let output = run_python(&mut cri, &pod, "python", &lazy).with_context(logs)?;
    let lazy_first_output = started.elapsed();
    println!(
        "CRI: PullImage {:.2} s ({image_ref}), python's output at {:.2} s: {}",
        pulled.as_secs_f64(),
        lazy_first_output.as_secs_f64(),
        output.trim()
    );
    let (sent, size) = fetched(&registry, &layers[..3]);
    println!(
        "registry sent {sent} of {size} python layer bytes ({:.1} %)",
        100.0 * sent as f64 / size as f64
    );
    ensure!(sent > 0, "nothing fetched: the layers were not read lazily");
    ensure!(sent < size / 2, "registry sent {sent} of {size}: not lazy");

    hash_under_kills(&mut cri, &pod, &daemon, &registry, &lazy, &layers[3], &big)
        .with_context(logs)?;

    // Beside them, the same image unconverted: fetched whole, run on ordinary layers.
    cri.pull(&plain, Some(&secret)).with_context(logs)?;
    let plain_output = run_python(&mut cri, &pod, "plain", &plain).with_context(logs)?;
    ensure!(plain_output == output, "{plain_output} vs {output}");
    for (digest, size) in &plain_layers {
        let (sent, _) = registry.blob_bytes_sent(digest);
        ensure!(sent >= *size, "plain layer {digest}: {sent} of {size} sent");
    }
    ensure!(
        !daemon.log().contains(PASSWORD),
        "the pull secret is in the log"
    );

    remove_lazy_image(&mut cri, &pod, &containerd, &daemon, &lazy, &layers)?;
    drop(cri);
    drop(containerd);
    let overlay_first_output = overlayfs_cold_start(work, &registry, &pause, &plain, &secret)?;
    println!(
        "cri_first_output lazy_ms={} overlayfs_ms={} ratio={:.2}",
        lazy_first_output.as_millis(),
        overlay_first_output.as_millis(),
        lazy_first_output.as_secs_f64() / overlay_first_output.as_secs_f64()
    );
    Ok(())
}

/// Runs [`PYTHON`] from `image` in `pod` as container `name`: its output once it exited 0
/// and said what python should.
fn run_python(cri: &mut Cri, pod: &Pod, name: &str, image: &str) -> Result<String> {
    let id = cri.start_container(pod, name, image, &["python3", "-c", PYTHON])?;
    let output = cri::wait_output(pod, name, Duration::from_secs(300))?;
    let status = cri.wait_exit(&id, Duration::from_secs(60))?;
    ensure!(status.exit_code == 0, "{name} exited {status:?}\n{output}");
    let answer: serde_json::Value = serde_json::from_str(output.trim()).context(output.clone())?;
    let want_sha = lazy_erofs_image::blob::hex(&Sha256::digest(b"lazy-erofs"));
    ensure!(answer["sha"] == want_sha.as_str(), "{output}");
    ensure!(
        answer["sqlite"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")),
        "{output}"
    );
    Ok(output)
}

/// A second container of the pod hashes the 256 MiB file of `big_layer` while the
/// fetcher is killed each time 8 MiB more of it came from the registry.
fn hash_under_kills(
    cri: &mut Cri,
    pod: &Pod,
    daemon: &Daemon,
    registry: &DockerRegistry,
    image: &str,
    big_layer: &LazyLayer,
    big: &image::BigFiles,
) -> Result<()> {
    let started = Instant::now();
    let id = cri.start_container(pod, "hash", image, &["sha256sum", "/data/big.bin"])?;
    let kills = daemon.kill_fetcher_per(
        8 << 20,
        || registry.blob_bytes_sent(&big_layer.digest).0,
        || cri.exited(&id),
        Duration::from_secs(600),
    )?;
    let status = cri.status(&id)?;
    let output = cri::container_output(pod, "hash")?;
    println!(
        "CRI: sha256sum of {BIG_FILE_MIB} MiB under {kills} fetcher kills in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        output.trim()
    );
    ensure!(
        status.exit_code == 0,
        "sha256sum exited {status:?}: {output}"
    );
    ensure!(
        output.starts_with(&big.big_hash),
        "wrong hash {output:?}, want {}",
        big.big_hash
    );
    ensure!(kills >= 10, "only {kills} fetcher kills during the hash");
    Ok(())
}

/// The kubelet's image GC: the pod goes, then `RemoveImage` (containerd collects
/// synchronously), and the lazy snapshots with it; `lazy-erofs gc` then frees the cache
/// those layers held.
fn remove_lazy_image(
    cri: &mut Cri,
    pod: &Pod,
    containerd: &Containerd,
    daemon: &Daemon,
    image: &str,
    layers: &[LazyLayer],
) -> Result<()> {
    let status = cli_json(&daemon.socket, &["status"])?;
    let keys = layers
        .iter()
        .map(|l| {
            Ok(layer(&status, &l.digest)?["cache_key"]
                .as_str()
                .context("key")?
                .to_owned())
        })
        .collect::<Result<Vec<_>>>()?;
    cri.remove_pod(pod)?;
    let snapshots = || -> Result<usize> {
        let listing =
            containerd.ctr_in(K8S, &["snapshots", "--snapshotter", "lazy-erofs", "ls"])?;
        Ok(listing.lines().skip(1).count())
    };
    let before = snapshots()?;
    cri.remove_image(image)?;
    let after = snapshots()?;
    println!("lazy-erofs snapshots in {K8S}: {before} before RemoveImage, {after} after");
    ensure!(
        before.checked_sub(after) == Some(layers.len()),
        "RemoveImage took {before} -> {after} snapshots, the image had {} layers",
        layers.len()
    );
    let status = cli_json(&daemon.socket, &["status"])?;
    for key in &keys {
        ensure!(
            entry(&status, key)?["state"] == "unreferenced",
            "{status:#}"
        );
    }
    let report = cli_json(&daemon.socket, &["gc", "--max-bytes", "1"])?;
    let mut evicted = evicted_keys(&report);
    evicted.sort();
    let mut want = keys.clone();
    want.sort();
    ensure!(evicted == want, "{report:#}");
    println!(
        "lazy-erofs gc after RemoveImage: {} -> {} cache bytes",
        report["bytes_before"], report["bytes_after"]
    );
    Ok(())
}

/// The same cold start on a node of containerd's overlayfs snapshotter: `PullImage` of
/// the unconverted image (fetched whole), a pod, python to its first output.
fn overlayfs_cold_start(
    work: &Path,
    registry: &DockerRegistry,
    pause: &str,
    image: &str,
    secret: &Credentials,
) -> Result<Duration> {
    let dir = work.join("containerd-overlayfs");
    let cri_toml = cri::plugin_config(&dir, MIRRORED, &registry.host, pause, "overlayfs")?;
    // Its proxy plugin entry names a socket nobody serves: this node never uses it.
    let containerd = Containerd::start_cri(&dir, &work.join("none.sock"), &cri_toml)?;
    let mut cri = Cri::connect(&containerd.address)?;
    cri.pull(pause, Some(secret))
        .with_context(|| containerd.log())?;
    let started = Instant::now();
    cri.pull(image, Some(secret))
        .with_context(|| containerd.log())?;
    let pod = cri.run_pod("overlayfs", &work.join("pods/overlayfs"))?;
    run_python(&mut cri, &pod, "python", image).with_context(|| containerd.log())?;
    let first_output = started.elapsed();
    cri.remove_pod(&pod)?;
    Ok(first_output)
}

/// A pause image as an ordinary image (one uncompressed tar layer): busybox sleeping.
/// Returns its reference under [`MIRRORED`].
fn push_pause(work: &Path, options: &RegistryOptions, host: &str) -> Result<String> {
    let dir = work.join("pause");
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("/bin/busybox (busybox-static)")?;
    let tar = work.join("pause.tar");
    common::tar_of(&dir, "./bin", &tar)?;
    let reference = format!("{MIRRORED}/pause:1");
    let layout_dir = work.join("pause-layout");
    std::fs::create_dir_all(&layout_dir)?;
    let layout = common::oci_layout(
        &layout_dir,
        &[tar],
        &["/bin/busybox", "sleep", "2147483647"],
        &reference,
    )?;
    push_layout(options, &layout, &format!("{host}/pause:1"))?;
    Ok(reference)
}
