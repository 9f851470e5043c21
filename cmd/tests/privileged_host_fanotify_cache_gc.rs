//! Operating a node, on this host's fanotify backend (re-run in the 7.x test VM): three
//! images pulled lazily and read, two removed; `lazy-erofs gc` frees exactly what only
//! those two used, least recently used first, never the layer a container still reads
//! (which keeps reading right bytes throughout); the metrics endpoint, parsed by a
//! Prometheus parser, follows fetches and fetcher kills; `lazy-erofs status --json`
//! describes it all.

#[path = "snapshotter/admin.rs"]
mod admin;
mod common;
#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use admin::{cli_json, entry, evicted_keys, layer, sample, scrape};
use anyhow::{Context, Result, bail, ensure};
use containerd_client::services::v1::snapshots as pb;
use daemon::Daemon;
use lazy_erofs_snapshotter::lazy::remote;

const SIZE: usize = 2 << 20;

struct Image {
    labels: HashMap<String, String>,
    want: Vec<u8>,
    chain: String,
}

async fn image(work: &Path, host: &str, path: &str) -> Result<Image> {
    let image = format!("{host}/{path}");
    let labels = common::pushed(work, &image, host).await?;
    let name = image.replace(['/', ':'], "_");
    Ok(Image {
        want: lazy_erofs_test_support::pseudo_random(SIZE, name.len() as u64 * 2),
        chain: labels[remote::SNAPSHOT_REF].clone(),
        labels,
    })
}

/// A container's snapshot of `image` (lazily pulled first), mounted at `work/<key>`.
async fn container(
    daemon: &Daemon,
    work: &Path,
    key: &str,
    image: &Image,
) -> Result<(lazy_erofs_test_support::MountGuard, PathBuf)> {
    let mut snapshots = daemon.client().await?;
    let err = snapshots
        .prepare(common::lazy_prepare(image.labels.clone()))
        .await
        .expect_err("a lazy layer's Prepare answers AlreadyExists");
    ensure!(err.code() == tonic::Code::AlreadyExists, "{err:?}");
    let mounts = snapshots
        .prepare(daemon::prepare(key, &image.chain))
        .await?
        .into_inner()
        .mounts;
    let rootfs = work.join(key);
    let guard = common::mount_snapshot(mounts.first().context("no mount")?, &rootfs)?;
    Ok((guard, rootfs.join("data/x")))
}

/// Removes the container's snapshot, then the image's (what `ctr image rm` and
/// containerd's GC do).
async fn remove(daemon: &Daemon, key: &str, image: &Image) -> Result<()> {
    let mut snapshots = daemon.client().await?;
    for key in [key, image.chain.as_str()] {
        snapshots
            .remove(pb::RemoveSnapshotRequest {
                snapshotter: "lazy-erofs".into(),
                key: key.into(),
            })
            .await
            .with_context(|| format!("Remove {key}"))?;
    }
    Ok(())
}

/// Reads `path` in 64 KiB pieces over and over (page cache dropped between passes),
/// comparing every piece, until `stop`; counts pieces read right in `progress`.
fn reader(
    path: PathBuf,
    want: Vec<u8>,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<u64>> {
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)?;
        let mut piece = vec![0u8; 64 << 10];
        let mut pieces = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for offset in (0..SIZE).step_by(piece.len()) {
                file.read_exact_at(&mut piece, offset as u64)
                    .with_context(|| format!("reading {} at {offset}", path.display()))?;
                if piece[..] != want[offset..offset + piece.len()] {
                    bail!("wrong bytes at {offset} of {}", path.display());
                }
                pieces += 1;
                progress.store(pieces, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = common::drop_caches();
        }
        Ok(pieces)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_host_fanotify_cache_gc_frees_what_removed_images_used_and_never_a_mounted_layer()
-> Result<()> {
    let parent = std::env::var_os("LAZY_EROFS_SCRATCH").unwrap_or_else(|| "/var/tmp".into());
    let work = tempfile::tempdir_in(parent)?;
    let registry_dir = work.path().join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    // Names of different lengths: pushed() seeds each layer's bytes by it.
    let a = image(work.path(), &registry.host, "lazy/gc-a:1").await?;
    let b = image(work.path(), &registry.host, "lazy/gc-bb:1").await?;
    let c = image(work.path(), &registry.host, "lazy/gc-ccc:1").await?;
    // No free-space floor: this test is about grace and max_bytes, and the host's disk may
    // well be under the default 10 % free (a CI machine was, and everything went).
    let config = format!(
        "[registry]\ninsecure_hosts = [\"{}\"]\n\
         [cache]\nunreferenced_grace = \"1h\"\ngc_interval = \"0s\"\nmin_free_percent = 0\n\
         [metrics]\naddress = \"127.0.0.1:0\"\n",
        registry.host
    );
    // Debug for the fetcher and the registry client: the log follows each READ down to
    // its range requests.
    let daemon = Daemon::start_with_env(
        &work.path().join("snapshotter"),
        &config,
        &[(
            "RUST_LOG",
            "info,lazy_erofs_ondemand::fetcher=debug,lazy_erofs_image::registry=debug,\
             read_trace=debug"
                .as_ref(),
        )],
    )?;
    let socket = daemon.socket.clone();

    // A and B are read whole, C a first piece.
    let (guard_a, file_a) = container(&daemon, work.path(), "ca", &a).await?;
    ensure!(std::fs::read(&file_a)? == a.want, "A: wrong bytes");
    let (guard_b, file_b) = container(&daemon, work.path(), "cb", &b).await?;
    ensure!(std::fs::read(&file_b)? == b.want, "B: wrong bytes");
    let (_guard_c, file_c) = container(&daemon, work.path(), "cc", &c).await?;
    let mut head = vec![0u8; 64 << 10];
    std::fs::File::open(&file_c)?.read_exact_at(&mut head, 0)?;
    ensure!(head == c.want[..head.len()], "C: wrong first bytes");

    followed_in_the_log(&daemon.log(), &a)?;

    let status = cli_json(&socket, &["status"])?;
    println!("status: {status:#}");
    ensure!(status["backend"]["name"] == "fanotify", "{status:#}");
    ensure!(
        status["fetcher"]["pid"] == daemon.fetcher_pid()?,
        "fetcher pid: {status:#}"
    );
    ensure!(status["fetcher"]["generation"].as_u64() >= Some(1));
    ensure!(status["cache"]["layers_mounted"] == 3, "{status:#}");
    for (image, whole) in [(&a, true), (&b, true), (&c, false)] {
        let l = layer(&status, &image.labels[remote::LAYER_DIGEST])?;
        ensure!(l["state"] == "mounted", "{l}");
        let fetched = l["fetched_percent"].as_f64().context("fetched_percent")?;
        ensure!(
            if whole {
                fetched == 100.0
            } else {
                fetched > 0.0 && fetched < 100.0
            },
            "fetched {fetched} %: {l}"
        );
    }
    let key = |image: &Image| -> Result<String> {
        Ok(
            layer(&status, &image.labels[remote::LAYER_DIGEST])?["cache_key"]
                .as_str()
                .context("cache_key")?
                .to_owned(),
        )
    };
    let (key_a, key_b, key_c) = (key(&a)?, key(&b)?, key(&c)?);
    let layer_bytes: u64 = status["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .filter_map(|l| l["bytes"].as_u64())
        .sum();
    ensure!(status["cache"]["bytes"] == layer_bytes, "{status:#}");
    let metrics = status["metrics_address"]
        .as_str()
        .context("no metrics address")?
        .to_owned();

    // Two fetcher kills, then C read on: bytes fetched grow, restarts count the kills.
    let before = scrape(&metrics)?;
    for _ in 0..2 {
        let pid = daemon.fetcher_pid()?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        common::wait_until("a new fetcher", Duration::from_secs(30), || {
            daemon.fetcher_pid().is_ok_and(|p| p != pid)
        })?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let reading = reader(
        file_c.clone(),
        c.want.clone(),
        stop.clone(),
        progress.clone(),
    );
    // The first pass fetches the rest of C (32 pieces, 10 ms apart): past its first
    // MiB, the new fetcher has fetched.
    common::wait_until(
        "C's reader past its first MiB",
        Duration::from_secs(60),
        || reading.is_finished() || progress.load(Ordering::Relaxed) > 16,
    )?;
    ensure!(!reading.is_finished(), "the reader of C stopped early");
    let after = scrape(&metrics)?;
    let delta = |name, label| sample(&after, name, label) - sample(&before, name, label);
    println!(
        "metrics: fetched {} -> {} bytes, restarts {} -> {}, reads served +{}",
        sample(&before, "lazyerofs_fetched_bytes_total", None),
        sample(&after, "lazyerofs_fetched_bytes_total", None),
        sample(&before, "lazyerofs_fetcher_restarts_total", None),
        sample(&after, "lazyerofs_fetcher_restarts_total", None),
        delta("lazyerofs_kernel_reads_total", Some(("result", "served")))
    );
    ensure!(
        delta("lazyerofs_fetched_bytes_total", None) > 0.0,
        "no bytes fetched"
    );
    ensure!(
        delta("lazyerofs_fetcher_restarts_total", None) == 2.0,
        "restarts"
    );
    ensure!(delta("lazyerofs_kernel_reads_total", Some(("result", "served"))) > 0.0);
    ensure!(
        sample(
            &after,
            "lazyerofs_kernel_reads_total",
            Some(("result", "failed"))
        ) == 0.0
    );
    ensure!(sample(&after, "lazyerofs_verification_failures_total", None) == 0.0);
    ensure!(
        sample(
            &after,
            "lazyerofs_registry_requests_total",
            Some(("outcome", "ok"))
        ) > 0.0,
        "no registry requests counted"
    );
    ensure!(sample(&after, "lazyerofs_failover_gap_seconds", None) >= 1.0);
    ensure!(
        sample(
            &after,
            "lazyerofs_grpc_calls_total",
            Some(("method", "prepare"))
        ) >= 6.0,
        "gRPC calls: {:?}",
        after
            .samples
            .iter()
            .filter(|s| s.metric.contains("grpc"))
            .collect::<Vec<_>>()
    );

    // Remove A, then (a second later) B.
    drop(guard_a);
    remove(&daemon, "ca", &a).await?;
    std::thread::sleep(Duration::from_millis(1100));
    drop(guard_b);
    remove(&daemon, "cb", &b).await?;
    let status = cli_json(&socket, &["status"])?;
    let bytes_before = status["cache"]["bytes"].as_u64().context("bytes")?;
    let bytes_of =
        |key: &str| -> Result<u64> { entry(&status, key)?["bytes"].as_u64().context("bytes") };
    let (bytes_a, bytes_b, bytes_c) = (bytes_of(&key_a)?, bytes_of(&key_b)?, bytes_of(&key_c)?);
    ensure!(
        entry(&status, &key_a)?["state"] == "unreferenced",
        "{status:#}"
    );
    ensure!(entry(&status, &key_c)?["state"] == "mounted", "{status:#}");
    ensure!(status["cache"]["layers_unreferenced"] == 2, "{status:#}");

    // Within the grace period and no limit: nothing goes.
    let report = cli_json(&socket, &["gc"])?;
    ensure!(evicted_keys(&report).is_empty(), "{report:#}");
    // A limit that only A's eviction meets: A, the least recently used, goes (dry run
    // first: it names it and removes nothing).
    let limit = (bytes_before - bytes_a).to_string();
    let dry = cli_json(&socket, &["gc", "--dry-run", "--max-bytes", &limit])?;
    let first = cli_json(&socket, &["gc", "--max-bytes", &limit])?;
    println!("gc with max_bytes {limit}: {first:#}");
    ensure!(
        evicted_keys(&dry) == evicted_keys(&first),
        "{dry:#}\n{first:#}"
    );
    ensure!(evicted_keys(&first) == [key_a.clone()], "{first:#}");
    ensure!(
        first["evicted"][0]["reason"] == "over_max_bytes",
        "{first:#}"
    );
    ensure!(first["evicted"][0]["bytes"] == bytes_a, "{first:#}");
    // A limit below what the mounted C holds: B goes, C stays.
    let second = cli_json(&socket, &["gc", "--max-bytes", "1"])?;
    println!("gc with max_bytes 1: {second:#}");
    ensure!(evicted_keys(&second) == [key_b.clone()], "{second:#}");
    ensure!(second["evicted"][0]["bytes"] == bytes_b, "{second:#}");
    ensure!(
        second["skipped"].as_array().is_some_and(Vec::is_empty),
        "{second:#}"
    );

    let status = cli_json(&socket, &["status"])?;
    let bytes_after = status["cache"]["bytes"].as_u64().context("bytes")?;
    println!(
        "cache: {bytes_before} bytes before, {bytes_after} after; A {bytes_a}, B {bytes_b}, \
         C (mounted) {bytes_c}"
    );
    ensure!(
        bytes_after == bytes_before - bytes_a - bytes_b,
        "the cache did not shrink by what A and B used: {status:#}"
    );
    ensure!(
        status["layers"].as_array().map(Vec::len) == Some(1),
        "{status:#}"
    );
    ensure!(layer(&status, &c.labels[remote::LAYER_DIGEST])?["state"] == "mounted");
    ensure!(
        status["cache"]["entries"].as_array().map(Vec::len) == Some(1),
        "{status:#}"
    );
    let m = scrape(&metrics)?;
    ensure!(
        sample(
            &m,
            "lazyerofs_cache_evictions_total",
            Some(("reason", "over_max_bytes"))
        ) == 2.0
    );
    ensure!(sample(&m, "lazyerofs_cache_evicted_bytes_total", None) == (bytes_a + bytes_b) as f64);
    ensure!(
        sample(
            &m,
            "lazyerofs_cache_layers",
            Some(("state", "unreferenced"))
        ) == 0.0
    );
    ensure!(sample(&m, "lazyerofs_cache_layers", Some(("state", "mounted"))) == 1.0);

    // C's reader goes on: a whole pass more after the GC (however slow the machine),
    // then it stops with every piece right; A comes back from the registry, right.
    let after_gc = progress.load(Ordering::Relaxed);
    common::wait_until(
        "C's reader to read a whole pass after the GC",
        Duration::from_secs(120),
        || reading.is_finished() || progress.load(Ordering::Relaxed) >= after_gc + 32,
    )?;
    stop.store(true, Ordering::Relaxed);
    let pieces = reading
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    ensure!(
        pieces >= after_gc + 32,
        "C's reader read {pieces} pieces, {after_gc} of them before the GC ended"
    );
    let (_guard_a, file_a) = container(&daemon, work.path(), "ca2", &a).await?;
    ensure!(
        std::fs::read(&file_a)? == a.want,
        "A after its eviction: wrong bytes"
    );
    println!("C's reader: {pieces} pieces of 64 KiB read right during kills and GC");
    Ok(())
}

/// One READ of `image`'s layer can be followed in the log from the kernel's request
/// (cookie, range) through its chunk to the registry's range request of that blob, and
/// its Prepare names the layer.
fn followed_in_the_log(log: &str, image: &Image) -> Result<()> {
    let digest = &image.labels[remote::LAYER_DIGEST];
    let prepared = log
        .lines()
        .any(|l| l.contains("lazy_prepare{") && l.contains(digest.as_str()));
    ensure!(prepared, "no lazy_prepare span names {digest}:\n{log}");
    let read = log.lines().find(|l| {
        l.contains("read{cookie=")
            && l.contains("offset=")
            && l.contains(":chunk{index=")
            && l.contains(&format!(":range{{digest=\"{digest}\""))
            && l.contains("range read elapsed=")
    });
    let read = read.with_context(|| format!("no READ followed to a range request:\n{log}"))?;
    println!("a READ in the log: {read}");
    // The per-READ trace: where each READ's, unit's and data read's time went.
    for fields in [
        &["queue_us=", "wait_us=", "complete_us=", "total_us="][..],
        &["source_us=", "write_us="],
        &["range_us=", "decompress_us=", "verify_us="],
    ] {
        let line = log
            .lines()
            .find(|l| l.contains("read_trace:") && fields.iter().all(|f| l.contains(f)));
        let line = line.with_context(|| format!("no read_trace line with {fields:?}"))?;
        println!("traced: {line}");
    }
    Ok(())
}
