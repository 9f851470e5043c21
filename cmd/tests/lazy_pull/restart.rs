//! The snapshotter stopping and starting under containerd: SIGTERM while a container
//! reads data not fetched yet (the read fails at once, nothing stays in D state, the
//! next start recovers), a clean restart (views agree, each layer mounted
//! once, nothing cached fetched again), and a second cold start with the cache kept.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_test_support::DockerRegistry;
use sha2::{Digest, Sha256};

use super::reader;
use crate::containerd::Containerd;
use crate::daemon::{self, Daemon};
use crate::image::{PYTHON, fetched};

/// What the later acts of the test need.
pub struct Story<'a> {
    pub daemon: Daemon,
    pub containerd: &'a Containerd,
    pub registry: &'a DockerRegistry,
    pub image: &'a str,
    /// The pushed image's layers: three python image layers, then the big files' layer.
    pub layers: &'a [LazyLayer],
    pub config: &'a str,
}

impl Story<'_> {
    fn run_python(&self, id: &str) -> Result<()> {
        let output = self
            .containerd
            .ctr(&[
                "run",
                "--rm",
                "--snapshotter",
                "lazy-erofs",
                self.image,
                id,
                "python3",
                "-c",
                PYTHON,
            ])
            .with_context(|| format!("{}\n{}", self.containerd.log(), self.daemon.log()))?;
        let answer: serde_json::Value = serde_json::from_str(output.trim()).context(output)?;
        let want = lazy_erofs_image::blob::hex(&Sha256::digest(b"lazy-erofs"));
        ensure!(answer["sha"] == want.as_str(), "{answer}");
        Ok(())
    }

    /// Registry bytes sent for the python image's layers so far.
    fn sent(&self) -> u64 {
        fetched(self.registry, &self.layers[..3]).0
    }

    fn big_layer_sent(&self) -> u64 {
        self.registry.blob_bytes_sent(&self.layers[3].digest).0
    }

    /// Waits until containerd's and our snapshot lists agree (containerd's GC and
    /// cleanup run in the background), then asserts they do.
    fn assert_views_agree(&self) -> Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ours = || runtime.block_on(daemon::snapshot_kinds(&self.daemon));
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.containerd.snapshot_kinds()? != ours()? && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(300));
        }
        assert_eq!(self.containerd.snapshot_kinds()?, ours()?);
        Ok(())
    }
}

/// SIGTERM while a container hashes `path` (not fetched yet): the daemon exits, its
/// `/dev/cachefiles` fd closes, and the reader must fail (ENOBUFS, or EIO for a read in
/// flight) at once — no task left in D state. The next start clears the stale layer mount once the container
/// is gone and the same file then hashes right.
pub fn stop_under_reader(story: &mut Story<'_>, path: &str, want: &str) -> Result<()> {
    let image = story.image;
    let before = story.big_layer_sent();
    let hasher = reader::spawn(story.containerd, image, "hash-down", &["sha256sum", path])?;
    // Stop once the reader is well into the file.
    let deadline = Instant::now() + Duration::from_secs(120);
    while story.big_layer_sent() < before + (4 << 20) {
        ensure!(
            Instant::now() < deadline,
            "the reader of {path} fetched nothing in 120 s\n{}",
            story.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stopping = Instant::now();
    let status = story.daemon.stop()?;
    let stop_time = stopping.elapsed();
    ensure!(
        status.success(),
        "SIGTERM: {status}\n{}",
        story.daemon.log()
    );
    ensure!(
        story
            .daemon
            .log()
            .contains("running containers use lazy layers"),
        "the daemon did not log the containers using lazy layers:\n{}",
        story.daemon.log()
    );
    let (out, ended) =
        reader::wait_bounded(hasher, Duration::from_secs(120), || story.daemon.log())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let fetched_mib = (story.big_layer_sent() - before) as f64 / f64::from(1 << 20);
    println!(
        "snapshotter stopped under a reader: SIGTERM took {:.2} s; the reader ended {:.2} s \
         after it with {status_text} after {fetched_mib:.1} MiB fetched: {}",
        stop_time.as_secs_f64(),
        ended.as_secs_f64(),
        stderr.lines().next().unwrap_or_default(),
        status_text = out.status,
    );
    ensure!(
        !out.status.success(),
        "the read of {path} succeeded with the snapshotter down: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A READ in flight when the fd closes fails with EIO; later reads find the cache
    // withdrawn and fail with ENOBUFS.
    ensure!(
        stderr.contains("No buffer space available") || stderr.contains("Input/output error"),
        "{stderr}"
    );
    ensure!(
        ended < Duration::from_secs(30),
        "the reader took {ended:?} to fail"
    );
    let stuck = reader::tasks_in_d_state()?;
    ensure!(stuck.is_empty(), "tasks in D state:\n{stuck}");

    let root = story.daemon.root.clone();
    story.daemon = Daemon::start_with(&root, story.config)?;
    // `ctr run --rm` could not remove its snapshot while we were down.
    if story
        .containerd
        .ctr(&["containers", "ls", "-q"])?
        .lines()
        .any(|id| id == "hash-down")
    {
        story.containerd.ctr(&["containers", "rm", "hash-down"])?;
    }
    let hasher = reader::spawn(story.containerd, image, "hash-up", &["sha256sum", path])?;
    let (out, took) =
        reader::wait_bounded(hasher, Duration::from_secs(300), || story.daemon.log())?;
    let hashed = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && hashed.starts_with(want),
        "after the restart: {hashed} {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        story.daemon.log()
    );
    println!(
        "after the restart the same file hashes right in {:.1} s",
        took.as_secs_f64()
    );
    story.assert_views_agree()
}

/// Snapshotter restart (SIGTERM, start again: views agree, each layer mounted once, new
/// containers start, nothing cached fetched again), then a second cold start after
/// containerd dropped the image and its snapshots, with the cache kept.
pub fn restart_and_second_start(mut story: Story<'_>) -> Result<()> {
    let status = story.daemon.stop()?;
    ensure!(
        status.success(),
        "SIGTERM: {status}\n{}",
        story.daemon.log()
    );
    let root = story.daemon.root.clone();
    let left = layer_mounts(&root)?;
    ensure!(left.is_empty(), "layer mounts left after SIGTERM: {left:?}");
    story.daemon = Daemon::start_with(&root, story.config)?;
    let region_bytes: u64 = story.layers[..3]
        .iter()
        .map(LazyLayer::verified_region_len)
        .sum();

    let sent_before = story.sent();
    story.run_python("python-again")?;
    let mounts = layer_mounts(&root)?;
    let mut unique = mounts.clone();
    unique.dedup();
    ensure!(
        mounts.len() == 4 && unique.len() == 4,
        "layer mounts after restart: {mounts:?}"
    );
    story.assert_views_agree()?;
    let resent = story.sent() - sent_before;
    println!(
        "after a snapshotter restart: python again, registry sent {resent} bytes \
         (verified regions: {region_bytes})"
    );
    ensure!(
        resent <= region_bytes,
        "{resent} bytes fetched again after the restart: cached chunks were fetched"
    );

    // containerd forgets the image; its GC removes the snapshots from us.
    story
        .containerd
        .ctr(&["image", "rm", "--sync", story.image])?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ours = || runtime.block_on(daemon::snapshot_kinds(&story.daemon));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ours()?.is_empty() {
        ensure!(
            Instant::now() < deadline,
            "containerd's GC left snapshots: {:?}",
            ours()?
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let left = layer_mounts(&root)?;
    ensure!(
        left.is_empty(),
        "layer mounts outlived their snapshots: {left:?}"
    );
    let sent_before = story.sent();
    let started = Instant::now();
    story.containerd.lazy_pull(story.image)?;
    story.run_python("python-warm")?;
    let resent = story.sent() - sent_before;
    println!(
        "second cold start with the cache kept: first output at {:.2} s, registry sent {resent} bytes",
        started.elapsed().as_secs_f64()
    );
    ensure!(
        resent <= region_bytes,
        "{resent} bytes fetched again on the second start: cached chunks were fetched"
    );
    Ok(())
}

/// Mount points of lazy layers under `root`, sorted (repeats kept).
fn layer_mounts(root: &Path) -> Result<Vec<String>> {
    let prefix = root.join("layers/mnt").display().to_string();
    let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter(|point| point.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    mounts.sort();
    Ok(mounts)
}
