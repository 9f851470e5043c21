//! A kubelet's pull secret across a snapshotter restart, on this host (fanotify backend,
//! real containerd 1.7 with its CRI plugin, a registry wanting a password the snapshotter
//! is not configured with). `PullImage` through the image proxy mounts the lazy layer
//! without reading its data; the daemon is restarted (SIGTERM, started again on the same
//! root); a container snapshot of the layer then reads its 2 MiB file right — fetched
//! with the credentials the first daemon kept, since nothing pulls the image again.

mod common;
#[path = "snapshotter/containerd.rs"]
mod containerd;
#[path = "cri/client.rs"]
mod cri;
#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use containerd::Containerd;
use cri::{Credentials, Cri};
use daemon::Daemon;
use lazy_erofs_image::registry::{HostOptions, RegistryOptions};
use lazy_erofs_snapshotter::lazy::remote;

const USER: &str = "puller";
const PASSWORD: &str = "pull-secret-51c9";

#[test]
fn privileged_host_cri_pull_secret_outlives_a_snapshotter_restart() -> Result<()> {
    // The VM's ext4 scratch disk when re-run in the 7.x test VM; the host's ext4 root.
    let parent = std::env::var_os("LAZY_EROFS_SCRATCH").unwrap_or_else(|| "/var/tmp".into());
    let scratch = tempfile::tempdir_in(parent)?;
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
    let image = format!("{}/lazy/secret:1", registry.host);
    let labels = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(common::pushed_with(work, &image, &registry.host, &push))?;
    let layer = &labels[remote::LAYER_DIGEST];

    let root = work.join("snapshotter");
    let proxy = work.join("image-proxy.sock");
    let containerd_dir = work.join("containerd");
    let config = format!(
        "[registry]\ninsecure_hosts = [\"{host}\"]\ndocker_config = false\n\
         [cri]\nimage_proxy = \"{proxy}\"\ncontainerd = \"{containerd}\"\n",
        host = registry.host,
        proxy = proxy.display(),
        containerd = containerd_dir.join("containerd.sock").display(),
    );
    let mut daemon = Daemon::start_with(&root, &config)?;
    // The log is written behind the daemon: the line may follow its socket.
    common::wait_until("the backend in the log", Duration::from_secs(10), || {
        daemon.log().contains("backend fanotify")
    })
    .with_context(|| daemon.log())?;
    let plugin = cri::plugin_config(
        &containerd_dir,
        &registry.host,
        &registry.host,
        &image,
        "lazy-erofs",
    )?;
    let containerd = Containerd::start_cri(&containerd_dir, &daemon.socket, &plugin)?;
    let mut cri = Cri::connect_with_image_endpoint(&containerd.address, &proxy)?;
    let secret = Credentials {
        username: USER.into(),
        password: PASSWORD.into(),
    };
    cri.pull(&image, Some(&secret))
        .with_context(|| format!("{}\n{}", containerd.log(), daemon.log()))?;
    let (sent_by_pull, _) = registry.blob_bytes_sent(layer);
    let kept = root.join("pull-credentials.json");
    let mode = std::fs::metadata(&kept)
        .context("no credentials kept")?
        .permissions()
        .mode();
    ensure!(mode & 0o777 == 0o600, "kept with mode {mode:o}");

    ensure!(
        !daemon.log().contains(PASSWORD),
        "the pull secret is in the log"
    );

    daemon.stop()?;
    let daemon = Daemon::start_with(&root, &config)?;
    let logs = || format!("{}\n{}", containerd.log(), daemon.log());

    // A container's snapshot of the layer, made through containerd as CRI makes it.
    let ctr = |args: &[&str]| containerd.ctr_in("k8s.io", args);
    let listing = ctr(&["snapshots", "--snapshotter", "lazy-erofs", "ls"])?;
    let chain = listing
        .lines()
        .skip(1)
        .find_map(|line| line.split_whitespace().next())
        .with_context(|| format!("no snapshot after the pull: {listing}"))?
        .to_owned();
    let rootfs = work.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    let target = rootfs.display().to_string();
    ctr(&[
        "snapshots",
        "--snapshotter",
        "lazy-erofs",
        "prepare",
        "reader",
        &chain,
    ])
    .with_context(logs)?;
    let mount = ctr(&[
        "snapshots",
        "--snapshotter",
        "lazy-erofs",
        "mounts",
        &target,
        "reader",
    ])?;
    common::run(Command::new("sh").arg("-c").arg(mount.trim()))?;
    let _mounted = lazy_erofs_test_support::MountGuard(rootfs.clone());
    let read = std::fs::read(rootfs.join("data/x"));
    let (sent, _) = registry.blob_bytes_sent(layer);
    println!(
        "after the restart: registry sent {} more bytes of the layer ({sent_by_pull} at the pull)",
        sent - sent_by_pull
    );
    let read = read.with_context(|| format!("reading the layer after the restart\n{}", logs()))?;
    ensure!(
        read == common::pushed_file(&image),
        "wrong bytes after the restart"
    );
    ensure!(sent > sent_by_pull, "the file was read before the restart");
    ensure!(
        !daemon.log().contains(PASSWORD),
        "the pull secret is in the log"
    );
    Ok(())
}
