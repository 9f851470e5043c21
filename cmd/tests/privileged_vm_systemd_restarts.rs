//! The snapshotter as the packaged systemd service, restarted and SIGKILLed under a
//! container that reads lazily (in the VM booted with systemd as PID 1; containerd a
//! systemd service too): the kernel
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    /// `systemctl restart`.
    Restart,
    /// SIGKILL of the main process; systemd starts it again.
    Kill,
}

/// On cachefiles the bound device waits in the store through both: the kernel keeps
/// every request, and the new process's fetcher `restore`s them.
#[test]
fn privileged_vm_systemd_restarts_and_kills_lose_no_read_on_cachefiles() -> Result<()> {
    let acts: Vec<Act> = (0..RESTARTS + KILLS)
        .map(|i| if i % 2 == 0 { Act::Restart } else { Act::Kill })
        .collect();
    with_service("cachefiles", |s| {
        hash_under(s, "/data/big.bin", &s.big.big_hash, &acts)?;
        let log = s.service.log();
        let taken_back = log
            .matches("took back the bound cache systemd kept")
            .count();
        ensure!(
            taken_back >= acts.len(),
            "{taken_back} handle take-backs logged for {} restarts",
            acts.len()
        );
        Ok(())
    })
}

/// On fanotify a planned restart stops reading events (they queue in the group, which
/// the keeper and systemd hold) and finishes the ones it read: no reader notices. A
/// SIGKILL leaves the events the dead broker had read unanswerable by anyone else but
/// by number: they are denied (EIO); reads that start later wait and are served.
#[test]
fn privileged_vm7_systemd_restarts_lose_no_read_on_fanotify() -> Result<()> {
    with_service("fanotify", |s| {
        hash_under(
            s,
            "/data/big.bin",
            &s.big.big_hash,
            &[Act::Restart; RESTARTS],
        )?;
        sigkill_outcome(s)
    })
}

/// What the acts of a story need.
struct Story<'a> {
    service: &'a Service,
    containerd: &'a Containerd,
    registry: &'a lazy_erofs_test_support::DockerRegistry,
    image: &'a str,
    layers: &'a [lazy_erofs_image::manifest::LazyLayer],
    big: &'a image::BigFiles,
}

/// The image pushed, the packaged unit installed for `backend` and started, containerd
/// on it, the image pulled lazily and python run once; then `acts`, then the checks
/// after it all.
fn with_service(backend: &str, acts: impl FnOnce(&Story<'_>) -> Result<()>) -> Result<()> {
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
        "[snapshotter]\nfscache_tag = \"lt-systemd\"\nbackend = \"{backend}\"\n\
         [registry]\ninsecure_hosts = [\"{}\"]\n",
        registry.host
    );
    let service = Service::install_and_start(&root, &config)?;
    let result = (|| {
        ensure!(
            service.log().contains(&format!("backend {backend}")),
            "the daemon did not pick {backend}"
        );
        let containerd = Containerd::start_unit(&work.join("containerd"), &service.socket)?;
        let pulled = containerd.lazy_pull(&image)?;
        ensure!(pulled.contains("4 layers lazily"), "{pulled}");
        run_python(&containerd, &image, "python-1")?;
        let story = Story {
            service: &service,
            containerd: &containerd,
            registry: &registry,
            image: &image,
            layers: &layers,
            big: &big,
        };
        acts(&story)?;
        after_it_all(&story)
    })();
    let log = service.log();
    let _ = service.stop();
    result.with_context(|| format!("daemon log:\n{log}"))
}

/// A container hashes `path` (lazily, from the registry) while `acts` happen one after
/// the other, each once the new process has sent the reader 2 MiB more and at least
/// 2.5 s after the last: the hash must
/// come out right. (Readahead keeps up to 4 MiB in flight across an act, so the bytes
/// sent per act run well past the threshold; at 8 MiB a 256 MiB hash ended after 16.)
fn hash_under(s: &Story<'_>, path: &str, want: &str, acts: &[Act]) -> Result<()> {
    let big_sent = || s.registry.blob_bytes_sent(&s.layers[3].digest).0;
    // At most 4 MiB/s: twenty acts of 2–3 s each must fit in one hash, whatever the
    // VM's speed that day (sha256sum alone ran out after 15).
    let script = "import hashlib, sys, time\n\
                  h = hashlib.sha256()\n\
                  with open(sys.argv[1], 'rb') as f:\n\
                  \x20   for b in iter(lambda: f.read(1 << 20), b''):\n\
                  \x20       h.update(b)\n\
                  \x20       time.sleep(0.25)\n\
                  print(h.hexdigest(), sys.argv[1])";
    let mut hasher = reader::spawn(
        s.containerd,
        s.image,
        "hash",
        &["python3", "-c", script, path],
    )?;
    let started = Instant::now();
    let mut gaps = Vec::new();
    let mut done = 0;
    let mut sent_at_last = big_sent();
    let mut last_act: Option<Instant> = None;
    let status = loop {
        if let Some(status) = hasher.try_wait()? {
            break status;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(900),
            "sha256sum still running after 900 s and {done} acts"
        );
        std::thread::sleep(Duration::from_millis(50));
        // systemd refuses a sixth start within 10 s (StartLimitBurst): acts at most
        // every 2.5 s, as an operator's restarts would come.
        let since_last = last_act.map_or(Duration::MAX, |at: Instant| at.elapsed());
        if done == acts.len()
            || big_sent() < sent_at_last + (2 << 20)
            || since_last < Duration::from_millis(2500)
        {
            continue;
        }
        last_act = Some(Instant::now());
        let old = s.service.main_pid()?;
        let stopped = Instant::now();
        match acts[done] {
            Act::Restart => s.service.restart()?,
            Act::Kill => s.service.kill_main()?,
        }
        s.service.wait_for_successor(old, Duration::from_secs(60))?;
        // The gap: from the signal until the registry sends the reader's next bytes to
        // the new process's fetcher.
        let before = big_sent();
        while big_sent() == before && hasher.try_wait()?.is_none() {
            ensure!(
                stopped.elapsed() < Duration::from_secs(120),
                "no read served within 120 s of act {done}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        gaps.push(stopped.elapsed());
        done += 1;
        sent_at_last = big_sent();
    };
    let out = hasher.wait_with_output()?;
    let hashed = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        status.success(),
        "sha256sum in the container after {done} acts: {status}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        hashed.starts_with(want),
        "wrong hash {hashed:?}, want {want}"
    );
    ensure!(
        done == acts.len(),
        "only {done} of {} acts during the hash",
        acts.len()
    );
    gaps.sort();
    let ms = |q: f64| gaps[((gaps.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    let count = |act| acts.iter().filter(|a| **a == act).count();
    println!(
        "sha256sum of {BIG_FILE_MIB} MiB under {} systemctl restarts and {} SIGKILLs in \
         {:.1} s: right hash; restart gap (signal to the next read served) p50 {:.0} ms, \
         p99 {:.0} ms, max {:.0} ms",
        count(Act::Restart),
        count(Act::Kill),
        started.elapsed().as_secs_f64(),
        ms(0.5),
        ms(0.99),
        ms(1.0)
    );
    Ok(())
}

/// SIGKILL under a reader of the late file: it ends with the right hash or EIO, never a
/// wrong hash; once the daemon is back, the same read gives the right hash.
fn sigkill_outcome(s: &Story<'_>) -> Result<()> {
    let late = "/data/late.bin";
    let want = &s.big.late_hash;
    let big_sent = || s.registry.blob_bytes_sent(&s.layers[3].digest).0;
    let before = big_sent();
    let hasher = reader::spawn(s.containerd, s.image, "late", &["sha256sum", late])?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while big_sent() < before + (4 << 20) {
        ensure!(
            Instant::now() < deadline,
            "the reader of {late} fetched nothing in 120 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let old = s.service.main_pid()?;
    s.service.kill_main()?;
    let (out, ended) = reader::wait_bounded(hasher, Duration::from_secs(300), || s.service.log())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "SIGKILL under a reader: it ended {:.1} s later with {}: {}",
        ended.as_secs_f64(),
        out.status,
        if out.status.success() {
            stdout.trim()
        } else {
            stderr.trim()
        }
    );
    if out.status.success() {
        ensure!(
            stdout.starts_with(want.as_str()),
            "wrong hash after SIGKILL: {stdout}"
        );
    } else {
        ensure!(stderr.contains("Input/output error"), "{stderr}");
    }
    s.service.wait_for_successor(old, Duration::from_secs(60))?;
    let again = s.containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "lazy-erofs",
        s.image,
        "late-2",
        "sha256sum",
        late,
    ])?;
    ensure!(
        again.starts_with(want.as_str()),
        "after the restart: {again}"
    );
    Ok(())
}

/// No leaked mounts, the two views agree, a new container fetches nothing again.
fn after_it_all(s: &Story<'_>) -> Result<()> {
    let (service, containerd, registry, image, layers) =
        (s.service, s.containerd, s.registry, s.image, s.layers);
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
