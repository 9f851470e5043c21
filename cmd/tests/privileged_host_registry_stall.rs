//! One slow or hostile registry must not stall the node: while a layer's registry
//! trickles (headers, then a byte every two seconds, never closing — through the fault
//! proxy, the named fake of `test-support`), a lazy Prepare of another image's layer
//! from a healthy registry completes at once, and the trickling one fails with a clear
//! error naming its registry within the configured retry budget. On this host's kernel
//! lazy layers are fetched whole at Prepare (file-backed), so the Prepare is the read.

mod common;
#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use daemon::Daemon;
use lazy_erofs_test_support::fault_proxy::Fault;

const BUDGET: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_host_a_trickling_registry_stalls_only_its_own_layer() -> Result<()> {
    ensure!(
        !Path::new("/dev/cachefiles").exists(),
        "written for a kernel without ondemand mode (file-backed lazy layers)"
    );
    let work = tempfile::tempdir_in("/var/tmp")?;
    let two = common::TwoRegistries::start(work.path()).await?;
    let (proxy, slow_labels, fast_labels) =
        (&two.proxy, two.slow_labels.clone(), two.fast_labels.clone());
    let daemon = Daemon::start_with(&work.path().join("snapshotter"), &two.config(BUDGET))?;
    proxy.set_standing(Some(Fault::Trickle));

    let mut client = daemon.client().await?;
    let started = Instant::now();
    let slow = tokio::spawn({
        let mut client = client.clone();
        async move {
            let result = client.prepare(common::lazy_prepare(slow_labels)).await;
            (result, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fast_started = Instant::now();
    let err = client
        .prepare(common::lazy_prepare(fast_labels))
        .await
        .expect_err("a lazy Prepare answers AlreadyExists");
    let fast_latency = fast_started.elapsed();
    ensure!(
        err.code() == tonic::Code::AlreadyExists,
        "{err:?}\n{}",
        daemon.log()
    );
    ensure!(
        !slow.is_finished(),
        "the trickling registry's Prepare ended before the healthy one did"
    );
    let (slow_result, slow_latency) = tokio::time::timeout(BUDGET * 4, slow)
        .await
        .context("the trickling registry's Prepare outlived four budgets")??;
    println!(
        "healthy registry's layer: {:.2} s while the trickling one waited; trickling \
         registry's layer: failed after {:.1} s (budget {} s)",
        fast_latency.as_secs_f64(),
        slow_latency.as_secs_f64(),
        BUDGET.as_secs()
    );
    let err = slow_result.expect_err("the trickling layer was fetched");
    ensure!(
        err.code() == tonic::Code::Unavailable
            && err.message().contains(&proxy.addr)
            && err.message().contains("budget"),
        "{err:?}"
    );
    // Bounded: the budget, plus a last attempt's backoff and the file writes.
    ensure!(slow_latency < BUDGET * 2, "{slow_latency:?}");
    ensure!(
        proxy.injected().contains(&Fault::Trickle),
        "no trickle injected"
    );
    Ok(())
}
