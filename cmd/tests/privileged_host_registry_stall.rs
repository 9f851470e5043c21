//! One slow or hostile registry must not stall the node: while a layer's registry
//! trickles (headers, then a byte every two seconds, never closing — through the fault
//! proxy, the named fake of `test-support`), a lazy Prepare of another image's layer
//! from a healthy registry completes at once, and the trickling one fails with a clear
//! error naming its registry within the configured retry budget. On this host's kernel
//! lazy layers are fetched whole at Prepare (file-backed), so the Prepare is the read.

mod common;
#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use containerd_client::services::v1::snapshots::PrepareSnapshotRequest;
use daemon::Daemon;
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::{Registry, RegistryOptions, repository_of};
use lazy_erofs_snapshotter::lazy::remote;
use lazy_erofs_test_support::fault_proxy::{Fault, FaultProxy};

const BUDGET: Duration = Duration::from_secs(6);

/// A one-layer image converted for `image` and pushed to `push_host` (the same
/// repository); the remote-snapshot labels of its layer.
async fn pushed(work: &Path, image: &str, push_host: &str) -> Result<HashMap<String, String>> {
    let name = image.replace(['/', ':'], "_");
    let dir = work.join(&name);
    std::fs::create_dir_all(&dir)?;
    let tar = dir.join("layer.tar");
    let bytes = lazy_erofs_test_support::pseudo_random(2 << 20, name.len() as u64 * 2);
    std::fs::write(
        &tar,
        lazy_erofs_test_support::layer_tar(&[("data/x", &bytes)])?,
    )?;
    let src = common::oci_layout(&dir, &[tar], &["sh"], image)?;
    let dst = dir.join("dst");
    common::convert(&src, &dst, image)?;
    let path = image.split_once('/').context("image")?.1;
    let client = Registry::new(&RegistryOptions::insecure(push_host));
    client
        .push_layout(&dst, &format!("{push_host}/{path}"))
        .await?;
    let (manifest, manifest_digest) = client.pull_manifest(&format!("{push_host}/{path}")).await?;
    let layer = LazyLayer::from_descriptor(manifest.layers().first().context("no layer")?)?
        .context("lazy")?;
    Ok([
        (remote::SNAPSHOT_REF, layer.binding(&repository_of(image)?)),
        (remote::LAYER_DIGEST, layer.digest.clone()),
        (remote::IMAGE_REF, image.to_owned()),
        (remote::MANIFEST_DIGEST, manifest_digest),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect())
}

fn prepare(labels: HashMap<String, String>) -> PrepareSnapshotRequest {
    PrepareSnapshotRequest {
        snapshotter: "lazy-erofs".into(),
        key: format!("extract-{}", labels[remote::SNAPSHOT_REF]),
        parent: String::new(),
        labels,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_host_a_trickling_registry_stalls_only_its_own_layer() -> Result<()> {
    ensure!(
        !Path::new("/dev/cachefiles").exists(),
        "written for a kernel without ondemand mode (file-backed lazy layers)"
    );
    let work = tempfile::tempdir_in("/var/tmp")?;
    let registry = |name: &str| -> Result<lazy_erofs_test_support::DockerRegistry> {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir)?;
        lazy_erofs_test_support::start_docker_registry(&dir, None)
    };
    let (slow_registry, fast) = (registry("slow")?, registry("fast")?);
    let proxy = FaultProxy::start(slow_registry.host.clone())?;
    let slow_image = format!("{}/slow/app:1", proxy.addr);
    let fast_image = format!("{}/fast/app:1", fast.host);
    let slow_labels = pushed(work.path(), &slow_image, &slow_registry.host).await?;
    let fast_labels = pushed(work.path(), &fast_image, &fast.host).await?;
    let daemon = Daemon::start_with(
        &work.path().join("snapshotter"),
        &format!(
            "[registry]\ninsecure_hosts = [\"{}\", \"{}\"]\nretry = {{ budget = \"{}s\" }}\n",
            proxy.addr,
            fast.host,
            BUDGET.as_secs()
        ),
    )?;
    proxy.set_standing(Some(Fault::Trickle));

    let mut client = daemon.client().await?;
    let started = Instant::now();
    let slow = tokio::spawn({
        let mut client = client.clone();
        async move {
            let result = client.prepare(prepare(slow_labels)).await;
            (result, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fast_started = Instant::now();
    let err = client
        .prepare(prepare(fast_labels))
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
