//! `lazy-erofs-snapshotter` on this host (6.18, no ondemand mode) pulls lazily through
//! the fanotify backend (`backend = "auto"`): a lazy Prepare mounts the layer without
//! downloading it, a container's overlay reads the right bytes while the registry sends
//! only part of the layer, and after a planned restart (a container still holding the
//! layer) the new daemon adopts the group and a new container reads the rest, right.

mod common;
#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::os::unix::fs::FileExt;

use anyhow::{Context, Result, ensure};
use daemon::Daemon;
use lazy_erofs_snapshotter::lazy::remote;

const SIZE: usize = 2 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_host_snapshotter_pulls_lazily_through_fanotify_and_survives_a_restart()
-> Result<()> {
    // The VM's ext4 scratch disk when re-run in the 7.x test VM; the host's ext4 root.
    let parent = std::env::var_os("LAZY_EROFS_SCRATCH").unwrap_or_else(|| "/var/tmp".into());
    let work = tempfile::tempdir_in(parent)?;
    let registry_dir = work.path().join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    let image = format!("{}/lazy/fanotify-snap:1", registry.host);
    let labels = common::pushed(work.path(), &image, &registry.host).await?;
    let name = image.replace(['/', ':'], "_");
    let want = lazy_erofs_test_support::pseudo_random(SIZE, name.len() as u64 * 2);
    let layer_digest = labels[remote::LAYER_DIGEST].clone();
    let chain = labels[remote::SNAPSHOT_REF].clone();
    let root = work.path().join("snapshotter");
    let config = format!("[registry]\ninsecure_hosts = [\"{}\"]\n", registry.host);

    let mut daemon = Daemon::start_with(&root, &config)?;
    let mut snapshots = daemon.client().await?;
    let err = snapshots
        .prepare(common::lazy_prepare(labels.clone()))
        .await
        .expect_err("a lazy layer's Prepare must answer AlreadyExists");
    ensure!(
        err.code() == tonic::Code::AlreadyExists,
        "{err:?}\n{}",
        daemon.log()
    );
    ensure!(
        daemon.log().contains("backend fanotify"),
        "auto did not pick fanotify on this host:\n{}",
        daemon.log()
    );
    let (sent_at_prepare, _) = registry.blob_bytes_sent(&layer_digest);
    // Prepare fetched the verified region whole, in one request.
    let at_prepare = registry.blob_responses(&layer_digest);

    // A container reads the first 64 KiB of the 2 MiB file: a chunk, not the layer.
    let first = daemon::prepare("c1", &chain);
    let mounts = snapshots.prepare(first).await?.into_inner().mounts;
    let rootfs1 = work.path().join("rootfs1");
    let _c1 = common::mount_snapshot(mounts.first().context("no mount")?, &rootfs1)?;
    let file = std::fs::File::open(rootfs1.join("data/x"))?;
    let mut head = vec![0u8; 64 << 10];
    file.read_exact_at(&mut head, 0)?;
    ensure!(
        head == want[..head.len()],
        "wrong bytes at the start of data/x"
    );
    let (sent, requests) = registry.blob_bytes_sent(&layer_digest);
    println!(
        "fanotify snapshotter: Prepare fetched {sent_at_prepare} bytes (verified region), \
         reading 64 KiB fetched {} more in {requests} requests, of a {SIZE}-byte file",
        sent - sent_at_prepare
    );
    ensure!(
        sent < SIZE as u64,
        "{sent} bytes sent for a 64 KiB read: not lazy"
    );
    // The fetcher reads the region from the node's copy, never from the registry again.
    let responses = registry.blob_responses(&layer_digest);
    ensure!(
        at_prepare.len() == 1 && !responses[1..].contains(&at_prepare[0]),
        "the verified region ({at_prepare:?} bytes at Prepare) was fetched again: {responses:?}"
    );

    // A planned restart while c1 keeps the layer open: the keeper holds the group, the
    // new daemon adopts it, and reads through both containers are served.
    let status = daemon.stop()?;
    ensure!(status.success(), "daemon exit {status}\n{}", daemon.log());
    let daemon = Daemon::start_with(&root, &config)?;
    let mut snapshots = daemon.client().await?;
    let second = daemon::prepare("c2", &chain);
    let mounts = snapshots.prepare(second).await?.into_inner().mounts;
    let rootfs2 = work.path().join("rootfs2");
    let _c2 = common::mount_snapshot(mounts.first().context("no mount")?, &rootfs2)?;
    common::drop_caches()?;
    ensure!(
        std::fs::read(rootfs2.join("data/x"))? == want,
        "data/x differs after the restart\n{}",
        daemon.log()
    );
    const TAIL: usize = 64 << 10;
    let mut tail = vec![0u8; TAIL];
    file.read_exact_at(&mut tail, (SIZE - TAIL) as u64)
        .context("the container that outlived the restart cannot read")?;
    ensure!(
        tail == want[SIZE - tail.len()..],
        "wrong bytes in c1 after the restart"
    );
    ensure!(
        daemon.log().contains("adopted the fanotify group"),
        "the restarted daemon made a new group:\n{}",
        daemon.log()
    );
    Ok(())
}
