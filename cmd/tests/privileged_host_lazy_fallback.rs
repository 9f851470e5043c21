//! Lazy layers on a kernel without ondemand mode (this host: file-backed EROFS only):
//! the daemon says so, a Prepare with the remote-snapshot labels fetches the layer whole
//! (verified), mounts it file-backed, commits the target and answers AlreadyExists, and
//! an active snapshot on top mounts the layers' files — byte for byte what the image
//! holds. Bad labels get InvalidArgument and change nothing.

mod common;
#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use containerd_client::services::v1::snapshots::{PrepareSnapshotRequest, StatSnapshotRequest};
use daemon::Daemon;
use lazy_erofs_image::registry::{Registry, RegistryOptions};
use lazy_erofs_snapshotter::lazy::remote;

#[tokio::test]
async fn privileged_host_lazy_layers_fall_back_to_whole_file_backed_mounts() -> Result<()> {
    if std::path::Path::new("/dev/cachefiles").exists() {
        eprintln!("skipped: this kernel has cachefiles (the VM tests cover ondemand mode)");
        return Ok(());
    }
    let work = tempfile::tempdir_in("/var/tmp")?;
    let registry_dir = work.path().join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    let diff_ids = lazy_erofs_test_support::make_oci_layout(&src)?;
    common::convert(&src, &dst)?;
    let image = format!("{}/lazy/fallback:1", registry.host);
    let client = Registry::new(&RegistryOptions::insecure(&registry.host));
    client.push_layout(&dst, &image).await?;
    let (manifest, manifest_digest) = client.pull_manifest(&image).await?;

    let root = work.path().join("snapshotter");
    let daemon = Daemon::start_with(
        &root,
        &format!("[registry]\ninsecure_hosts = [\"{}\"]\n", registry.host),
    )?;
    let mut snapshots = daemon.client().await?;
    let labels = |target: &str, layer: &str| -> HashMap<String, String> {
        [
            (remote::SNAPSHOT_REF, target),
            (remote::LAYER_DIGEST, layer),
            (remote::IMAGE_REF, image.as_str()),
            (remote::MANIFEST_DIGEST, manifest_digest.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    };
    let prepare =
        |key: &str, parent: &str, labels: HashMap<String, String>| PrepareSnapshotRequest {
            snapshotter: "lazy-erofs".into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        };

    // A malformed digest: refused, nothing recorded.
    let mut bad = labels("chain-bad", "sha256:nothex");
    bad.insert(remote::SNAPSHOT_REF.into(), "chain-bad".into());
    let err = snapshots
        .prepare(prepare("extract-bad", "", bad))
        .await
        .expect_err("malformed layer digest accepted");
    ensure!(err.code() == tonic::Code::InvalidArgument, "{err:?}");
    ensure!(
        err.message().contains(remote::LAYER_DIGEST),
        "{}",
        err.message()
    );

    let chain = [diff_ids[0].clone(), "chain-2".to_owned()];
    let mut parent = String::new();
    for (layer, target) in manifest.layers().iter().zip(&chain) {
        let err = snapshots
            .prepare(prepare(
                &format!("extract-{target}"),
                &parent,
                labels(target, layer.digest().as_ref()),
            ))
            .await
            .expect_err("a lazy layer's Prepare must answer AlreadyExists");
        ensure!(
            err.code() == tonic::Code::AlreadyExists,
            "{err:?}\n{}",
            daemon.log()
        );
        let info = snapshots
            .stat(StatSnapshotRequest {
                snapshotter: "lazy-erofs".into(),
                key: target.clone(),
            })
            .await?
            .into_inner()
            .info
            .context("no info")?;
        ensure!(info.kind == 3, "target not committed: {info:?}"); // KIND_COMMITTED
        ensure!(info.parent == parent, "{info:?}");
        parent = target.clone();
    }
    ensure!(
        daemon.log().contains("fetched whole") && daemon.log().contains("file-backed"),
        "the fallback is not logged:\n{}",
        daemon.log()
    );

    let mounts = snapshots
        .prepare(prepare("container", &parent, HashMap::new()))
        .await?
        .into_inner()
        .mounts;
    let overlay = mounts.first().context("no mount")?;
    let target = work.path().join("rootfs");
    std::fs::create_dir_all(&target)?;
    let options = overlay.options.join(",");
    nix::mount::mount(
        Some(overlay.source.as_str()),
        &target,
        Some(overlay.r#type.as_str()),
        nix::mount::MsFlags::empty(),
        Some(options.as_str()),
    )
    .with_context(|| format!("mounting {overlay:?}"))?;
    let _unmount = lazy_erofs_test_support::MountGuard(target.clone());
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(std::fs::read(target.join("usr/bin/big"))?, big);
    assert_eq!(std::fs::read(target.join("etc/hostname"))?, b"lazy\n");
    assert_eq!(std::fs::read(target.join("etc/motd"))?, b"hello\n");
    std::fs::write(target.join("etc/written"), b"upper")?;
    Ok(())
}
