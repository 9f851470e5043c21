//! Two images on one node whose layers claim one cache name, through the real kernel
//! (EROFS over fscache, ondemand): image B's layer carries the same data tag as image
//! A's (in its EROFS device table and in its manifest annotation, as a hostile
//! publisher can write both), yet each image reads its own bytes. And a docker
//! credential helper the fetcher starts holds none of the fetcher's kernel handles.

mod common;
#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use containerd_client::services::v1::snapshots::PrepareSnapshotRequest;
use daemon::Daemon;
use lazy_erofs_image::convert::{ConvertOptions, convert_layout};
use lazy_erofs_image::manifest::{LazyLayer, annotation};
use lazy_erofs_image::registry::{Registry, RegistryOptions, repository_of};
use lazy_erofs_snapshotter::lazy::remote;
use sha2::{Digest, Sha256};

const SIZE: usize = 3 << 20;

/// A one-layer image of `/data/x` (pseudo-random from `seed`) converted for `image`
/// (with data tag `tag`, else the converter's); returns the layout, the file's sha256
/// and the layer's diff id.
fn image(
    work: &Path,
    name: &str,
    seed: u64,
    image: &str,
    tag: Option<&str>,
) -> Result<(PathBuf, String, String)> {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir)?;
    let bytes = lazy_erofs_test_support::pseudo_random(SIZE, seed);
    let tar = dir.join("layer.tar");
    let tar_bytes = lazy_erofs_test_support::layer_tar(&[("data/x", &bytes)])?;
    let diff_id = lazy_erofs_test_support::sha256_digest(&tar_bytes);
    std::fs::write(&tar, tar_bytes)?;
    let src = common::oci_layout(&dir, &[tar], &["sh"], image)?;
    let dst = dir.join("dst");
    convert_layout(
        &src,
        &dst,
        "linux/amd64",
        &ConvertOptions {
            data_tag: tag.map(str::to_owned),
            repository: Some(repository_of(image)?),
            ..ConvertOptions::default()
        },
        &mut |_, _, r| r,
    )?;
    let hash = lazy_erofs_image::blob::hex(&Sha256::digest(&bytes));
    Ok((dst, hash, diff_id))
}

/// A credential helper (docker's protocol) that records its open fds and its parent.
fn credential_helper(dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    let helper = bin.join("docker-credential-fdlist");
    std::fs::write(
        &helper,
        "#!/bin/sh\n\
         out=\"$FDLIST_DIR/$$\"\n\
         { echo \"ppid=$PPID\"; ls -l /proc/$$/fd; } >\"$out\" 2>&1\n\
         cat >/dev/null\n\
         echo '{\"ServerURL\":\"lazy\",\"Username\":\"lazy\",\"Secret\":\"lazy\"}'\n",
    )?;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755))?;
    Ok(bin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_vm_layers_claiming_one_cache_tag_read_their_own_bytes() -> Result<()> {
    let work = common::scratch()?;
    let registry_dir = work.path().join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    let (image_a, image_b) = (
        format!("{}/tenant/a:1", registry.host),
        format!("{}/tenant/b:1", registry.host),
    );
    let (layout_a, hash_a, diff_id_a) = image(work.path(), "a", 0x1a, &image_a, None)?;
    // B's device table names A's data tag, and its manifest claims A's source diff id
    // (from which the tag is derived there).
    let tag = lazy_erofs_image::manifest::data_tag(&diff_id_a);
    let (layout_b, hash_b, _) = image(work.path(), "b", 0x2b, &image_b, Some(&tag))?;
    ensure!(hash_a != hash_b, "the two layers must differ");
    common::edit_image(&layout_b, |manifest, _| {
        manifest["layers"][0]["annotations"][annotation::SOURCE_DIFF_ID] = diff_id_a.into();
    })?;
    let client = Registry::new(&RegistryOptions::insecure(&registry.host));
    client.push_layout(&layout_a, &image_a).await?;
    client.push_layout(&layout_b, &image_b).await?;

    let docker_config = work.path().join("docker");
    std::fs::create_dir_all(&docker_config)?;
    std::fs::write(
        docker_config.join("config.json"),
        format!(r#"{{"credHelpers":{{"{}":"fdlist"}}}}"#, registry.host),
    )?;
    let fd_lists = work.path().join("fd-lists");
    std::fs::create_dir_all(&fd_lists)?;
    let path = format!(
        "{}:{}",
        credential_helper(work.path())?.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let daemon = Daemon::start_with_env(
        &work.path().join("snapshotter"),
        &format!("[registry]\ninsecure_hosts = [\"{}\"]\n", registry.host),
        &[
            ("DOCKER_CONFIG", docker_config.as_os_str()),
            ("FDLIST_DIR", fd_lists.as_os_str()),
            ("PATH", path.as_ref()),
        ],
    )?;
    let mut snapshots = daemon.client().await?;

    let mut reads = Vec::new();
    for (image, hash) in [(&image_a, &hash_a), (&image_b, &hash_b)] {
        let (manifest, manifest_digest) = client.pull_manifest(image).await?;
        let descriptor = manifest.layers().first().context("no layer")?;
        let layer = LazyLayer::from_descriptor(descriptor)?.context("not lazy")?;
        let target = layer.binding(&repository_of(image)?);
        let labels: HashMap<String, String> = [
            (remote::SNAPSHOT_REF, target.as_str()),
            (remote::LAYER_DIGEST, layer.digest.as_str()),
            (remote::IMAGE_REF, image.as_str()),
            (remote::MANIFEST_DIGEST, manifest_digest.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let prepare = |key: &str, parent: &str, labels| PrepareSnapshotRequest {
            snapshotter: "lazy-erofs".into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        };
        let err = snapshots
            .prepare(prepare(&format!("extract-{target}"), "", labels))
            .await
            .expect_err("a lazy Prepare answers AlreadyExists");
        ensure!(
            err.code() == tonic::Code::AlreadyExists,
            "{err:?}\n{}",
            daemon.log()
        );
        let mounts = snapshots
            .prepare(prepare(
                &format!("rootfs-{target}"),
                &target,
                HashMap::new(),
            ))
            .await?
            .into_inner()
            .mounts;
        reads.push((image.clone(), hash.clone(), mounts));
    }
    // Both layers are mounted before either is read.
    for (image, hash, mounts) in reads.iter().rev() {
        let mount = mounts.first().context("no mount")?;
        let target = work.path().join(format!("rootfs-{hash}"));
        let _unmount = common::mount_snapshot(mount, &target)?;
        let bytes = std::fs::read(target.join("data/x"))
            .with_context(|| format!("reading {image}'s /data/x\n{}", daemon.log()))?;
        let got = lazy_erofs_image::blob::hex(&Sha256::digest(&bytes));
        ensure!(
            &got == hash,
            "{image} read another layer's bytes (sha256 {got}, its own is {hash})"
        );
        println!("{image}: /data/x reads its own {} bytes", bytes.len());
    }

    // The credential helper ran (for the daemon and for the fetcher) and saw none of
    // the fetcher's kernel handles: no /dev/cachefiles, cache object or stats memfd.
    let fetcher = daemon.fetcher_pid()?;
    let mut from_fetcher = 0;
    for entry in std::fs::read_dir(&fd_lists)? {
        let text = std::fs::read_to_string(entry?.path())?;
        if text.lines().next() == Some(&format!("ppid={fetcher}")) {
            from_fetcher += 1;
        }
        println!("credential helper's fds:\n{text}");
        for leaked in ["cachefiles", "memfd:", "socket:"] {
            ensure!(
                !text.contains(leaked),
                "a credential helper inherited a {leaked} fd:\n{text}"
            );
        }
    }
    ensure!(
        from_fetcher > 0,
        "the fetcher (pid {fetcher}) never ran the credential helper"
    );
    Ok(())
}
