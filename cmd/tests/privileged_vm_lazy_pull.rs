//! The product end to end in the test VM: a Debian + python3 image converted and pushed
//! to `docker-registry` on the guest loopback, `lazy-erofs pull` into a real containerd
//! 1.7 with lazy-erofs as its proxy snapshotter, `ctr run` starting python before the
//! layers are downloaded — only the bytes read come from the registry — and a container
//! hashing a 256 MiB file while its fetcher is SIGKILLed again and again and the
//! registry fails some requests (through a fault proxy, the named fake of
//! `test-support`); a registry that stays broken gets a reader EIO in bounded time; the
//! snapshotter stopped and started (`lazy_pull/restart.rs`).

mod common;
#[path = "snapshotter/containerd.rs"]
mod containerd;
#[path = "snapshotter/daemon.rs"]
mod daemon;
#[path = "lazy_pull/image.rs"]
mod image;
#[path = "lazy_pull/reader.rs"]
mod reader;
#[path = "lazy_pull/restart.rs"]
mod restart;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use containerd::Containerd;
use daemon::Daemon;
use image::{BIG_FILE_MIB, PYTHON, big_files_layer, fetched, push_converted};
use lazy_erofs_test_support::fault_proxy::{Fault, FaultProxy};
use sha2::{Digest, Sha256};

#[test]
fn privileged_vm_lazy_pull_runs_python_and_survives_fetcher_kills() -> Result<()> {
    story("backend cachefiles", true)
}

/// The same story in the 7.x VM (no fscache): the daemon's `auto` picks fanotify; the
/// snapshotter restart part is the host test `privileged_host_fanotify_snapshotter`'s.
#[test]
fn privileged_vm7_lazy_pull_runs_python_and_survives_fetcher_kills() -> Result<()> {
    story("backend fanotify", false)
}

/// Pull, python, hash under kills, registry down; then (`with_restart`) the snapshotter
/// stopped under a reader and restarted. `backend` is the daemon's log line for its pick.
fn story(backend: &str, with_restart: bool) -> Result<()> {
    let scratch = common::scratch()?;
    let work = scratch.path();
    let registry_dir = work.join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    let big = big_files_layer(work)?;
    // Everything after the push reaches the registry through the fault proxy, so the
    // image is converted for the name it is pulled by.
    let proxy = FaultProxy::start(registry.host.clone())?;
    let image = format!("{}/lazy/python:1", proxy.addr);
    let layers = push_converted(work, &registry, &image, std::slice::from_ref(&big.tar))?;
    let config = format!(
        "[registry]\ninsecure_hosts = [\"{}\"]\n[registry.retry]\nbudget = \"4s\"\n",
        proxy.addr
    );
    let daemon = Daemon::start_with(&work.join("snapshotter"), &config)?;
    let containerd = Containerd::start(&work.join("containerd"), &daemon.socket)?;
    ensure!(
        daemon.log().contains(backend),
        "the daemon did not pick {backend}:\n{}",
        daemon.log()
    );

    let started = Instant::now();
    let pulled = containerd.lazy_pull(&image).with_context(|| daemon.log())?;
    let pull_time = started.elapsed();
    ensure!(pulled.contains("4 layers lazily"), "{pulled}");
    let ctr_run = |id: &str, args: &[&str]| -> Result<String> {
        let mut all = vec![
            "run",
            "--rm",
            "--snapshotter",
            "lazy-erofs",
            image.as_str(),
            id,
        ];
        all.extend_from_slice(args);
        containerd
            .ctr(&all)
            .with_context(|| format!("{}\n{}", containerd.log(), daemon.log()))
    };
    let output = ctr_run("python", &["python3", "-c", PYTHON])?;
    let first_output = started.elapsed();
    let answer: serde_json::Value = serde_json::from_str(output.trim()).context(output.clone())?;
    let want_sha = lazy_erofs_image::blob::hex(&Sha256::digest(b"lazy-erofs"));
    assert_eq!(answer["sha"], want_sha.as_str(), "{output}");
    ensure!(
        answer["sqlite"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.")),
        "{output}"
    );
    let (sent, size) = fetched(&registry, &layers[..3]);
    println!(
        "pull {:.2} s, python's first output at {:.2} s; registry sent {sent} of {size} layer bytes ({:.1} %)",
        pull_time.as_secs_f64(),
        first_output.as_secs_f64(),
        100.0 * sent as f64 / size as f64
    );
    ensure!(sent > 0, "nothing fetched: the layers were not read lazily");
    ensure!(
        sent < size / 2,
        "registry sent {sent} of {size} bytes: not lazy"
    );
    ensure!(
        registry.blob_bytes_sent(&layers[3].digest).0 < 1 << 20,
        "the big file's layer was fetched before anyone read it"
    );

    // Failover under a container: hash the 256 MiB file while the fetcher is killed,
    // each replacement left serving for a moment before it is killed in turn.
    let mut hasher = reader::spawn(&containerd, &image, "hash", &["sha256sum", "/data/big.bin"])?;
    // Transient registry faults mid-read: retried, and the flipped bit never lands.
    let faults = [
        Fault::Status500,
        Fault::ResetMidBody,
        Fault::FlipBit,
        Fault::TruncatedBody,
        Fault::TooManyRequests,
        Fault::FlipBit,
    ];
    proxy.queue(&faults);
    let hash_started = Instant::now();
    let mut status = None;
    // Kill once the current fetcher has moved the read on by 8 MiB: the reader finishes
    // after ~30 kills.
    let kills = daemon.kill_fetcher_per(
        8 << 20,
        || registry.blob_bytes_sent(&layers[3].digest).0,
        || Ok(hasher.try_wait()?.inspect(|s| status = Some(*s)).is_some()),
        Duration::from_secs(600),
    );
    let kills = match kills {
        Ok(kills) => kills,
        Err(err) => {
            let _ = hasher.kill();
            return Err(err.context(daemon.log()));
        }
    };
    let status = status.context("no exit status")?;
    let out = hasher.wait_with_output()?;
    let hashed = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        status.success(),
        "sha256sum in the container: {status}: {}\n{}\n{}\nkernel: {:?}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log(),
        containerd.log(),
        common::dmesg_lines().map(|l| l[l.len().saturating_sub(30)..].to_vec())
    );
    println!(
        "sha256sum of {BIG_FILE_MIB} MiB under {kills} fetcher kills in {:.1} s: {}",
        hash_started.elapsed().as_secs_f64(),
        hashed.trim()
    );
    ensure!(
        hashed.starts_with(&big.big_hash),
        "wrong hash {hashed:?}, want {}",
        big.big_hash
    );
    ensure!(kills >= 20, "only {kills} fetcher kills during the hash");
    ensure!(
        proxy.injected().len() == faults.len(),
        "faults injected: {:?}",
        proxy.injected()
    );
    registry_down(&containerd, &daemon, &proxy, &image)?;
    let restarts = daemon.log().matches("fetcher exited; restarting").count();
    ensure!(
        restarts >= kills,
        "{restarts} restarts logged for {kills} kills"
    );
    if !with_restart {
        return Ok(());
    }
    let mut story = restart::Story {
        daemon,
        containerd: &containerd,
        registry: &registry,
        image: &image,
        layers: &layers,
        config: &config,
    };
    restart::stop_under_reader(&mut story, "/data/late.bin", &big.late_hash)?;
    restart::restart_and_second_start(story)
}

/// A registry that keeps failing: a container reading data not fetched yet gets EIO
/// within the retry budget and the log says why; once it recovers, the same read works.
fn registry_down(
    containerd: &Containerd,
    daemon: &Daemon,
    proxy: &FaultProxy,
    image: &str,
) -> Result<()> {
    // pydoc's topics are not read by starting python: not fetched yet. Hashed in the
    // container, so its output fits a pipe while we wait.
    let path = "/usr/lib/python3.11/pydoc_data/topics.py";
    let read = ["sha256sum", path];
    let want = Command::new("tar")
        .arg("-xOf")
        .arg(lazy_erofs_test_support::debian_layers()?.join("python.tar"))
        .arg(format!(".{path}"))
        .output()?;
    ensure!(
        want.status.success() && want.stdout.len() > 100_000,
        "{path} not in python.tar"
    );
    let want = lazy_erofs_image::blob::hex(&Sha256::digest(&want.stdout));
    let ctr = |id: &str| -> Result<std::process::Output> {
        let child = reader::spawn(containerd, image, id, &read)?;
        Ok(reader::wait_bounded(child, Duration::from_secs(180), || daemon.log())?.0)
    };
    proxy.set_standing(Some(Fault::Status500));
    let started = Instant::now();
    let out = ctr("down")?;
    let failed_after = started.elapsed();
    proxy.set_standing(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "registry down: reader failed after {:.1} s: {}",
        failed_after.as_secs_f64(),
        stderr.trim()
    );
    ensure!(
        !out.status.success(),
        "read succeeded with the registry down"
    );
    ensure!(stderr.contains("Input/output error"), "{stderr}");
    ensure!(
        failed_after < Duration::from_secs(120),
        "EIO took {failed_after:?}"
    );
    ensure!(
        daemon.log().contains("500"),
        "the log does not say the registry failed:\n{}",
        daemon.log()
    );
    // Back up: the same read works (nothing was poisoned by the failures). A chunk that
    // ran out of time fails at once for a second (the fetcher's failure memo).
    std::thread::sleep(Duration::from_secs(1));
    let out = ctr("up")?;
    let got = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && got.starts_with(&want),
        "after recovery: {got} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
