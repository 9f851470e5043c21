//! One slow registry must not stall reads of other images, through the real kernel
//! (EROFS over fscache, ondemand): two images from two registries are mounted lazily;
//! then one registry trickles (headers, then a byte every two seconds, never closing —
//! the fault proxy of `test-support`, a named fake). A container-style read of the
//! healthy image's file completes at once while the trickling image's read is pending,
//! and that read fails with EIO within the configured budget (never hangs, never zeros),
//! the log naming the registry.

mod common;
#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use containerd_client::services::v1::snapshots::PrepareSnapshotRequest;
use daemon::Daemon;
use lazy_erofs_snapshotter::lazy::remote;
use lazy_erofs_test_support::fault_proxy::Fault;

const BUDGET: Duration = Duration::from_secs(6);

type Client = containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient<
    tonic::transport::Channel,
>;

/// Commits the lazy layer `labels` describe and mounts a rootfs on it at `target`.
async fn mounted(
    client: &mut Client,
    labels: HashMap<String, String>,
    target: &Path,
) -> Result<lazy_erofs_test_support::MountGuard> {
    let chain = labels[remote::SNAPSHOT_REF].clone();
    let err = client
        .prepare(common::lazy_prepare(labels))
        .await
        .expect_err("a lazy Prepare answers AlreadyExists");
    ensure!(err.code() == tonic::Code::AlreadyExists, "{err:?}");
    let mounts = client
        .prepare(PrepareSnapshotRequest {
            snapshotter: "lazy-erofs".into(),
            key: format!("rootfs-{chain}"),
            parent: chain,
            labels: HashMap::new(),
        })
        .await?
        .into_inner()
        .mounts;
    common::mount_snapshot(mounts.first().context("no mount")?, target)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_vm_a_trickling_registry_stalls_only_its_own_reads() -> Result<()> {
    let work = common::scratch()?;
    let two = common::TwoRegistries::start(work.path()).await?;
    let (proxy, slow_labels, fast_labels) =
        (&two.proxy, two.slow_labels.clone(), two.fast_labels.clone());
    let daemon = Daemon::start_with(&work.path().join("snapshotter"), &two.config(BUDGET))?;
    let mut client = daemon.client().await?;
    // Mounting reads each layer's verified metadata; the data is fetched on first read.
    let slow_root = work.path().join("slow-root");
    let fast_root = work.path().join("fast-root");
    let _slow_mount = mounted(&mut client, slow_labels, &slow_root).await?;
    let _fast_mount = mounted(&mut client, fast_labels, &fast_root).await?;
    proxy.set_standing(Some(Fault::Trickle));

    let slow_file = slow_root.join("data/x");
    let started = Instant::now();
    let slow = std::thread::spawn(move || (std::fs::read(slow_file), started.elapsed()));
    std::thread::sleep(Duration::from_millis(500));
    let fast_started = Instant::now();
    let fast_bytes = std::fs::read(fast_root.join("data/x"))
        .with_context(|| format!("reading the healthy image's file\n{}", daemon.log()))?;
    let fast_latency = fast_started.elapsed();
    ensure!(fast_bytes.len() == 2 << 20, "short read");
    ensure!(
        !slow.is_finished(),
        "the trickling registry's read ended before the healthy one did"
    );
    let (slow_result, slow_latency) = slow.join().expect("reader thread");
    println!(
        "healthy registry's layer: 2 MiB read in {:.2} s while the trickling one waited; \
         trickling registry's layer: read failed after {:.1} s (budget {} s)",
        fast_latency.as_secs_f64(),
        slow_latency.as_secs_f64(),
        BUDGET.as_secs()
    );
    let err = slow_result
        .err()
        .context("the trickling layer's file was read")?;
    ensure!(err.raw_os_error() == Some(nix::libc::EIO), "{err}");
    // Bounded: one fetcher deadline (the budget), though the kernel asks twice (a
    // failed readahead, then the page), plus its turnaround.
    ensure!(
        slow_latency < BUDGET + Duration::from_secs(4),
        "{slow_latency:?}"
    );
    ensure!(fast_latency < BUDGET / 2, "{fast_latency:?}");
    let log = daemon.log();
    ensure!(
        log.lines()
            .any(|l| l.contains("READ of registry") && l.contains(&proxy.addr)),
        "no log line names the trickling registry:\n{log}"
    );
    ensure!(
        proxy.injected().contains(&Fault::Trickle),
        "no trickle injected"
    );
    Ok(())
}
