//! Real containerd 1.7 in the test VM with lazy-erofs as its proxy snapshotter: a Debian
//! image (debootstrap minbase + a python3 layer) imported and run with `ctr`, and
//! containerd's view of the snapshots equal to ours.

mod common;
#[path = "snapshotter/containerd.rs"]
mod containerd;
#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::collections::BTreeSet;

use anyhow::{Context, Result, ensure};
use containerd::Containerd;
use daemon::Daemon;

const IMAGE: &str = "lazy-erofs.test/debian:python";

async fn our_snapshots(daemon: &Daemon) -> Result<BTreeSet<(String, String)>> {
    daemon::snapshot_kinds(daemon).await
}

fn containerd_snapshots(containerd: &Containerd) -> Result<BTreeSet<(String, String)>> {
    containerd.snapshot_kinds()
}

#[tokio::test]
async fn privileged_vm_ctr_runs_a_debian_image_on_lazy_erofs() -> Result<()> {
    let scratch = common::scratch()?;
    let layers = lazy_erofs_test_support::debian_layers()?;
    let archive = scratch.path().join("debian.tar");
    lazy_erofs_test_support::write_oci_archive(
        &archive,
        &[layers.join("base.tar"), layers.join("packages.tar")],
        &["/bin/sh"],
        IMAGE,
    )?;
    let daemon = Daemon::start(&scratch.path().join("snapshotter"))?;
    let containerd = Containerd::start(&scratch.path().join("containerd"), &daemon.socket)?;

    let started = std::time::Instant::now();
    containerd
        .ctr(&[
            "image",
            "import",
            "--snapshotter",
            "lazy-erofs",
            archive.to_str().context("path")?,
        ])
        .with_context(|| containerd.log())?;
    println!("import + unpack: {:.1} s", started.elapsed().as_secs_f64());

    let debian_version = std::process::Command::new("tar")
        .arg("-xOf")
        .arg(layers.join("base.tar"))
        .arg("./etc/debian_version")
        .output()?;
    let want = String::from_utf8(debian_version.stdout)?;
    ensure!(want.starts_with("12."), "base layer says {want:?}");
    let run = |id: &str, args: &[&str]| -> Result<String> {
        let mut all = vec!["run", "--rm", "--snapshotter", "lazy-erofs", IMAGE, id];
        all.extend_from_slice(args);
        containerd.ctr(&all).with_context(|| containerd.log())
    };
    let got = run("cat-version", &["cat", "/etc/debian_version"])?;
    assert_eq!(got, want);
    // python3 and sqlite3 come from the second layer: both layers are stacked.
    let got = run(
        "python",
        &[
            "python3",
            "-c",
            "import re, os; print(re.sub('[aeiou]', '', 'lazy erofs'), os.path.exists('/usr/bin/sqlite3'))",
        ],
    )?;
    assert_eq!(got.trim(), "lzy rfs True", "{got}");

    // containerd's view and ours agree once its garbage collector has removed the
    // containers' snapshots from us (it does so shortly after `ctr run --rm`).
    containerd.collect_garbage()?;
    let theirs = containerd_snapshots(&containerd)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut ours = our_snapshots(&daemon).await?;
    while ours != theirs && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        ours = our_snapshots(&daemon).await?;
    }
    assert_eq!(theirs, ours);
    assert_eq!(ours.len(), 2, "{ours:?}");
    assert!(ours.iter().all(|(_, kind)| kind == "committed"), "{ours:?}");
    Ok(())
}

/// A stream of `ctr snapshots` prepare/commit/rm calls until `stop`; returns the
/// snapshot names of the calls that failed (those in flight when the daemon died).
fn churn(
    containerd: &Containerd,
    round: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> Vec<String> {
    let mut failed = Vec::new();
    let sn = ["snapshots", "--snapshotter", "lazy-erofs"];
    let ctr = |args: &[&str]| containerd.ctr(&[&sn[..], args].concat());
    for i in 0.. {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        let (key, name) = (format!("a-{round}-{i}"), format!("l-{round}-{i}"));
        if ctr(&["prepare", &key, "base"]).is_err() {
            failed.push(key);
            continue;
        }
        if ctr(&["commit", &name, &key]).is_err() {
            failed.extend([key, name]);
            continue;
        }
        if i % 3 == 2 && ctr(&["rm", &name]).is_err() {
            failed.push(name);
        }
    }
    failed
}

#[tokio::test]
async fn privileged_vm_kill_9_under_containerd_keeps_its_view_and_ours_equal() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let scratch = common::scratch()?;
    let root = scratch.path().join("snapshotter");
    let mut daemon = Daemon::start(&root)?;
    let containerd = Containerd::start(&scratch.path().join("containerd"), &daemon.socket)?;
    let sn = ["snapshots", "--snapshotter", "lazy-erofs"];
    containerd.ctr(&[&sn[..], &["prepare", "base-active", ""]].concat())?;
    containerd.ctr(&[&sn[..], &["commit", "base", "base-active"]].concat())?;

    let mut in_flight = Vec::new();
    for round in 0..4 {
        let stop = AtomicBool::new(false);
        let failed = std::thread::scope(|scope| -> Result<Vec<String>> {
            let worker = scope.spawn(|| churn(&containerd, round, &stop));
            std::thread::sleep(std::time::Duration::from_millis(1500 + 700 * round as u64));
            daemon.kill()?;
            // Down for a moment: calls in that window fail and containerd must reconnect.
            std::thread::sleep(std::time::Duration::from_millis(500));
            daemon = Daemon::start(&root)?;
            // containerd reconnects by itself (its proxy backoff is at most 3 s).
            std::thread::sleep(std::time::Duration::from_secs(4));
            stop.store(true, Ordering::SeqCst);
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("churn thread panicked"))
        })?;
        in_flight.extend(failed);
    }
    ensure!(
        !in_flight.is_empty(),
        "no call ever failed: the kills missed"
    );
    // A removal marks our snapshotter for containerd's garbage collector, which removes
    // backend snapshots it has no record of; the collection is then run and waited for.
    containerd.ctr(&[&sn[..], &["prepare", "gc-trigger", "base"]].concat())?;
    containerd.ctr(&[&sn[..], &["rm", "gc-trigger"]].concat())?;
    containerd.collect_garbage()?;

    let theirs = containerd_snapshots(&containerd)?;
    let names = |set: &BTreeSet<(String, String)>| -> BTreeSet<String> {
        set.iter().map(|(name, _)| name.clone()).collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut ours = our_snapshots(&daemon).await?;
    let differs = |ours: &BTreeSet<(String, String)>| -> Vec<(String, String)> {
        ours.symmetric_difference(&theirs).cloned().collect()
    };
    while differs(&ours)
        .iter()
        .any(|(name, _)| !in_flight.contains(name))
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        ours = our_snapshots(&daemon).await?;
    }
    let unexplained: Vec<(String, String)> = differs(&ours)
        .into_iter()
        .filter(|(name, _)| !in_flight.contains(name))
        .collect();
    println!(
        "{} snapshots in containerd, {} in ours, calls in flight at the kills: {in_flight:?}",
        theirs.len(),
        ours.len()
    );
    ensure!(
        unexplained.is_empty(),
        "views differ beyond the calls in flight: {unexplained:?}\ncontainerd: {:?}\nours: {:?}\n\
         containerd's warnings (a failed garbage collection names the call):\n{}\n\
         our warnings:\n{}",
        names(&theirs),
        names(&ours),
        warnings(&containerd.log()),
        warnings(&daemon.log())
    );
    ensure!(theirs.len() > 10, "too little happened: {theirs:?}");
    Ok(())
}

/// The last warning and error lines of a log, for a failure message.
fn warnings(log: &str) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|line| {
            let line = line.to_lowercase();
            line.contains("warn") || line.contains("error")
        })
        .collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
