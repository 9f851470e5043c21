//! The snapshotter as the packaged systemd service, restarted and SIGKILLed under a
//! container that reads lazily (in the VM booted with systemd as PID 1): the kernel
//! handles wait in systemd's file descriptor store, each new process takes them back
//! and serves the reads its predecessor left, and the container never sees an error or
//! a wrong byte. Afterwards nothing leaked, containerd's and our views agree, and a new
//! container from the same image fetches nothing again.

mod common;
#[path = "snapshotter/containerd.rs"]
mod containerd;
#[path = "snapshotter/daemon.rs"]
mod daemon;
#[path = "lazy_pull/image.rs"]
mod image;
#[path = "lazy_pull/reader.rs"]
mod reader;
#[path = "systemd/unit.rs"]
mod unit;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use containerd::Containerd;
use image::{BIG_FILE_MIB, PYTHON, big_files_layer, fetched, push_converted};
use unit::Service;

const RESTARTS: usize = 10;
const KILLS: usize = 10;

#[test]
fn privileged_vm_systemd_restarts_and_kills_lose_no_read_on_cachefiles() -> Result<()> {
    unit::require_systemd()?;
    let scratch = common::scratch()?;
    let work = scratch.path();
    let registry_dir = work.join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    let big = big_files_layer(work)?;
    let image = format!("{}/lazy/python:1", registry.host);
    let layers = push_converted(work, &registry, &image, std::slice::from_ref(&big.tar))?;
    let root = work.join("snapshotter");
    let config = format!(
        "[snapshotter]\nfscache_tag = \"lt-systemd\"\nbackend = \"cachefiles\"\n\
         [registry]\ninsecure_hosts = [\"{}\"]\n",
        registry.host
    );
    let service = Service::install_and_start(&root, &config)?;
    let result = story(&service, work, &registry, &image, &layers, &big.big_hash);
    let log = service.log();
    let _ = service.stop();
    result.with_context(|| format!("daemon log:\n{log}"))
}

fn story(
    service: &Service,
    work: &std::path::Path,
    registry: &lazy_erofs_test_support::DockerRegistry,
    image: &str,
    layers: &[lazy_erofs_image::manifest::LazyLayer],
    big_hash: &str,
) -> Result<()> {
    ensure!(
        service.log().contains("backend cachefiles"),
        "{}",
        service.log()
    );
    let containerd = Containerd::start(&work.join("containerd"), &service.socket)?;
    let pulled = containerd.lazy_pull(image)?;
    ensure!(pulled.contains("4 layers lazily"), "{pulled}");
    run_python(&containerd, image, "python-1")?;

    // The hash reads the big file from the registry while the daemon goes and comes
    // back 20 times; each act waits until the reader moved on by 8 MiB.
    let big_sent = || registry.blob_bytes_sent(&layers[3].digest).0;
    let mut hasher = reader::spawn(&containerd, image, "hash", &["sha256sum", "/data/big.bin"])?;
    let started = Instant::now();
    let mut gaps = Vec::new();
    let mut acts = 0;
    let mut sent_at_last = big_sent();
    let status = loop {
        if let Some(status) = hasher.try_wait()? {
            break status;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(900),
            "sha256sum still running after 900 s and {acts} restarts"
        );
        std::thread::sleep(Duration::from_millis(50));
        if acts == RESTARTS + KILLS || big_sent() < sent_at_last + (8 << 20) {
            continue;
        }
        let old = service.main_pid()?;
        let stopped = Instant::now();
        // Restarts and kills alternate.
        if acts % 2 == 0 {
            service.restart()?;
        } else {
            service.kill_main()?;
        }
        service.wait_for_successor(old, Duration::from_secs(60))?;
        // The gap: from the signal until the registry sends the reader's next bytes to
        // the new process's fetcher.
        let before = big_sent();
        while big_sent() == before && hasher.try_wait()?.is_none() {
            ensure!(
                stopped.elapsed() < Duration::from_secs(120),
                "no read served within 120 s of restart {acts}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        gaps.push(stopped.elapsed());
        acts += 1;
        sent_at_last = big_sent();
    };
    let out = hasher.wait_with_output()?;
    let hashed = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        status.success(),
        "sha256sum in the container after {acts} restarts: {status}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        hashed.starts_with(big_hash),
        "wrong hash {hashed:?}, want {big_hash}"
    );
    ensure!(
        acts == RESTARTS + KILLS,
        "only {acts} restarts and kills during the hash"
    );
    let log = service.log();
    let taken_back = log
        .matches("took back the bound cache systemd kept")
        .count();
    ensure!(
        taken_back >= acts,
        "{taken_back} handle take-backs logged for {acts} restarts"
    );
    gaps.sort();
    let ms = |q: f64| gaps[((gaps.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    println!(
        "sha256sum of {BIG_FILE_MIB} MiB under {RESTARTS} systemctl restarts and {KILLS} \
         SIGKILLs in {:.1} s: right hash; restart gap (signal to the next read served) \
         p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        started.elapsed().as_secs_f64(),
        ms(0.5),
        ms(0.99),
        ms(1.0)
    );
    after_it_all(service, &containerd, registry, image, layers)
}

/// No leaked mounts, the two views agree, a new container fetches nothing again.
fn after_it_all(
    service: &Service,
    containerd: &Containerd,
    registry: &lazy_erofs_test_support::DockerRegistry,
    image: &str,
    layers: &[lazy_erofs_image::manifest::LazyLayer],
) -> Result<()> {
    let mnt = service.root.join("layers/mnt");
    let mut mounts = unit::erofs_mounts_under(&mnt)?;
    mounts.sort();
    let distinct = {
        let mut d = mounts.clone();
        d.dedup();
        d
    };
    ensure!(
        mounts.len() == layers.len() && distinct.len() == mounts.len(),
        "layer mounts after the restarts: {mounts:?} (want one per layer, {})",
        layers.len()
    );
    ensure!(
        common::dmesg_lines()?
            .iter()
            .all(|l| !l.contains("erofs") || !l.contains("error")),
        "erofs errors in the kernel log"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ours = || -> Result<std::collections::BTreeSet<(String, String)>> {
        runtime.block_on(daemon::snapshot_kinds_at(&service.socket))
    };
    while containerd.snapshot_kinds()? != ours()? && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(containerd.snapshot_kinds()?, ours()?);
    let before = fetched(registry, layers).0;
    run_python(containerd, image, "python-2")?;
    let again = fetched(registry, layers).0 - before;
    println!("a new container after the restarts fetched {again} bytes");
    ensure!(again == 0, "the new container fetched {again} bytes again");
    Ok(())
}

fn run_python(containerd: &Containerd, image: &str, id: &str) -> Result<()> {
    let output = containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "lazy-erofs",
        image,
        id,
        "python3",
        "-c",
        PYTHON,
    ])?;
    let answer: serde_json::Value = serde_json::from_str(output.trim()).context(output)?;
    ensure!(
        answer["sha"].as_str().is_some_and(|s| s.len() == 64),
        "{answer}"
    );
    Ok(())
}
