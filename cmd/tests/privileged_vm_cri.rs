//! The path a Kubernetes node takes, in the test VM: containerd 1.7 with its CRI plugin
//! on, lazy-erofs as the CRI snapshotter with snapshot annotations on, a registry mirror
//! (`hosts.toml`) naming the registry on the guest loopback, and a CRI client speaking
//! the kubelet's API. The converted Debian + python3 image is pulled with `PullImage`
//! and run in a pod (`RunPodSandbox`, `CreateContainer`, `StartContainer`): python runs
//! before the layers are downloaded, on a plain pause image beside it.

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
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use containerd::Containerd;
use cri::Cri;
use daemon::Daemon;
use image::{PYTHON, fetched, push_converted};
use lazy_erofs_test_support::DockerRegistry;
use sha2::{Digest, Sha256};

/// The name images are pulled by; containerd and lazy-erofs both reach it through a
/// mirror entry naming the registry on loopback (it has no DNS record).
const MIRRORED: &str = "registry.lazy.test";
/// The kubelet's namespace in containerd.
const K8S: &str = "k8s.io";

#[test]
fn privileged_vm_cri_pod_runs_python_lazily() -> Result<()> {
    let scratch = common::scratch()?;
    let work = scratch.path();
    let registry_dir = work.join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    let image = format!("{MIRRORED}/lazy/python:1");
    let layers = push_converted(work, &registry, &image, &[])?;
    let pause = push_pause(work, &registry)?;

    let config = format!(
        "[registry]\ninsecure_hosts = [\"{host}\"]\n\
         [registry.hosts.\"{MIRRORED}\"]\nmirrors = [\"{host}\"]\n",
        host = registry.host
    );
    let daemon = Daemon::start_with(&work.join("snapshotter"), &config)?;
    let containerd = Containerd::start_cri(
        &work.join("containerd"),
        &daemon.socket,
        &cri_config(&work.join("containerd"), &registry, &pause)?,
    )?;
    let logs = || format!("{}\n{}", containerd.log(), daemon.log());
    let mut cri = Cri::connect(&containerd.address)?;
    cri.pull(&pause, None).with_context(logs)?;

    let started = Instant::now();
    let image_ref = cri.pull(&image, None).with_context(logs)?;
    let pulled = started.elapsed();
    let pod = cri.run_pod("lazy", &work.join("pods/lazy"))?;
    let python = cri
        .start_container(&pod, "python", &image, &["python3", "-c", PYTHON])
        .with_context(logs)?;
    let status = cri
        .wait_exit(&python, Duration::from_secs(300))
        .with_context(logs)?;
    let output = cri::container_output(&pod, "python")?;
    println!(
        "CRI: PullImage {:.2} s ({image_ref}), python exited {} at {:.2} s: {}",
        pulled.as_secs_f64(),
        status.exit_code,
        started.elapsed().as_secs_f64(),
        output.trim()
    );
    ensure!(status.exit_code == 0, "python exited {status:?}\n{output}");
    let answer: serde_json::Value = serde_json::from_str(output.trim()).context(output.clone())?;
    let want_sha = lazy_erofs_image::blob::hex(&Sha256::digest(b"lazy-erofs"));
    assert_eq!(answer["sha"], want_sha.as_str(), "{output}");

    let (sent, size) = fetched(&registry, &layers);
    println!(
        "registry sent {sent} of {size} layer bytes ({:.1} %)",
        100.0 * sent as f64 / size as f64
    );
    ensure!(
        sent > 0,
        "nothing fetched: the layers were not read lazily\n{}",
        std::fs::read_to_string(&registry.access_log).unwrap_or_default()
    );
    ensure!(
        sent < size / 2,
        "registry sent {sent} of {size} bytes: not lazy\n{}",
        logs()
    );
    let lazy = containerd.ctr_in(K8S, &["snapshots", "--snapshotter", "lazy-erofs", "ls"])?;
    println!("{lazy}");
    cri.remove_pod(&pod)?;
    Ok(())
}

/// A pause image as an ordinary image (one uncompressed tar layer): busybox sleeping.
/// Returns its reference under [`MIRRORED`].
fn push_pause(work: &Path, registry: &DockerRegistry) -> Result<String> {
    let dir = work.join("pause");
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("/bin/busybox (busybox-static)")?;
    let tar = work.join("pause.tar");
    common::run(
        Command::new("tar")
            .args(["--numeric-owner", "-C"])
            .arg(&dir)
            .arg("-cf")
            .arg(&tar)
            .arg("./bin"),
    )?;
    let reference = format!("{MIRRORED}/pause:1");
    let layout_dir = work.join("pause-layout");
    std::fs::create_dir_all(&layout_dir)?;
    let layout = common::oci_layout(
        &layout_dir,
        &[tar],
        &["/bin/busybox", "sleep", "2147483647"],
        &reference,
    )?;
    let client = lazy_erofs_image::registry::Registry::new(
        &lazy_erofs_image::registry::RegistryOptions::insecure(&registry.host),
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(client.push_layout(&layout, &format!("{}/pause:1", registry.host)))?;
    Ok(reference)
}

/// The CRI plugin's settings as a node running lazy-erofs has them (README
/// "Kubernetes"), plus what the VM needs: no CNI (host-network pods), the mirror's
/// `hosts.toml` under `dir`.
fn cri_config(dir: &Path, registry: &DockerRegistry, pause: &str) -> Result<String> {
    let hosts = dir.join("certs.d").join(MIRRORED);
    std::fs::create_dir_all(&hosts)?;
    std::fs::write(
        hosts.join("hosts.toml"),
        format!(
            "server = \"http://{MIRRORED}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            registry.host
        ),
    )?;
    Ok(format!(
        r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "lazy-erofs"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
"#,
        cni = dir.join("cni").display(),
        certs = dir.join("certs.d").display(),
    ))
}
