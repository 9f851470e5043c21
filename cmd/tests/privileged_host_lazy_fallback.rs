//! Lazy layers fetched whole (`backend = "whole"`, what `auto` falls back to on a kernel
//! with neither ondemand mode nor pre-content events): the daemon says so, a Prepare with the remote-snapshot labels fetches the layer whole
//! (verified), mounts it file-backed, commits the target and answers AlreadyExists, and
//! an active snapshot on top mounts the layers' files — byte for byte what the image
//! holds. Bad labels get InvalidArgument and change nothing.

mod common;
#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, StatSnapshotRequest,
};
use daemon::Daemon;
use lazy_erofs_image::registry::{Registry, RegistryOptions};
use lazy_erofs_snapshotter::lazy::remote;

#[tokio::test]
async fn privileged_host_lazy_layers_fall_back_to_whole_file_backed_mounts() -> Result<()> {
    // A host profile test: it proves the fallback, so a kernel with cachefiles fails it
    // loudly instead of passing without testing anything.
    ensure!(
        !std::path::Path::new("/dev/cachefiles").exists(),
        "this kernel has /dev/cachefiles: the file-backed fallback cannot be tested here \
         (the VM tests cover ondemand mode)"
    );
    let work = tempfile::tempdir_in("/var/tmp")?;
    let registry_dir = work.path().join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    let diff_ids = lazy_erofs_test_support::make_oci_layout(&src)?;
    let image = format!("{}/lazy/fallback:1", registry.host);
    common::convert(&src, &dst, &image)?;
    let client = Registry::new(&RegistryOptions::insecure(&registry.host));
    client.push_layout(&dst, &image).await?;
    let (manifest, manifest_digest) = client.pull_manifest(&image).await?;

    let root = work.path().join("snapshotter");
    let daemon = Daemon::start_with(
        &root,
        &format!(
            "backend = \"whole\"\n[registry]\ninsecure_hosts = [\"{}\"]\n",
            registry.host
        ),
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

    // containerd's names for the layers: chain ids of the converted config's diff ids,
    // which bind each layer's verified digest to the repository.
    let repository = lazy_erofs_image::registry::repository_of(&image)?;
    let bindings = common::bindings(&manifest, &repository)?;
    ensure!(bindings[0] != diff_ids[0], "the source diff id was kept");
    let chain = lazy_erofs_image::manifest::chain_ids(&bindings);

    // A target that is not the layer's verified chain id (the source's diff id, as a
    // config claiming another layer would give): refused, naming the layer and both ids.
    let err = snapshots
        .prepare(prepare(
            "extract-claimed",
            "",
            labels(&diff_ids[0], manifest.layers()[0].digest().as_ref()),
        ))
        .await
        .expect_err("a claimed chain id was accepted");
    ensure!(err.code() == tonic::Code::InvalidArgument, "{err:?}");
    for part in [
        diff_ids[0].as_str(),
        chain[0].as_str(),
        manifest.layers()[0].digest().as_ref(),
    ] {
        ensure!(err.message().contains(part), "{part}: {}", err.message());
    }
    ensure!(
        snapshots
            .stat(StatSnapshotRequest {
                snapshotter: "lazy-erofs".into(),
                key: diff_ids[0].clone(),
            })
            .await
            .is_err(),
        "the refused target was created"
    );

    // A mixed image: an ordinary (unpacked) layer below a lazy one.
    snapshots
        .prepare(prepare("extract-plain", "", HashMap::new()))
        .await?;
    let plain = "sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d";
    snapshots
        .commit(CommitSnapshotRequest {
            snapshotter: "lazy-erofs".into(),
            name: plain.into(),
            key: "extract-plain".into(),
            labels: HashMap::new(),
        })
        .await?;
    let on_plain = lazy_erofs_image::manifest::chain_id(Some(plain), &bindings[1]);
    let err = snapshots
        .prepare(prepare(
            "extract-mixed",
            plain,
            labels(&on_plain, manifest.layers()[1].digest().as_ref()),
        ))
        .await
        .expect_err("a lazy layer's Prepare must answer AlreadyExists");
    ensure!(err.code() == tonic::Code::AlreadyExists, "{err:?}");

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
    let _unmount = common::mount_snapshot(overlay, &target)?;
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(std::fs::read(target.join("usr/bin/big"))?, big);
    assert_eq!(std::fs::read(target.join("etc/hostname"))?, b"lazy\n");
    assert_eq!(std::fs::read(target.join("etc/motd"))?, b"hello\n");
    std::fs::write(target.join("etc/written"), b"upper")?;
    Ok(())
}
