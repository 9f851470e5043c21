//! `lazy-erofs-snapshotter` on a small ext4 filesystem filled to the brim: while it is
//! full, creating snapshots and writing the metadata store fail with ResourceExhausted
//! and a message that says so, reads keep working; once space is freed every call works
//! again without a restart (the store reopens itself after redb's I/O error latch), and
//! nothing a call acknowledged is lost, before or after a kill -9.

mod common;
#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use containerd_client::services::v1::snapshots as pb;
use daemon::{Daemon, commit, prepare};
use tonic::Code;

const SNAPSHOTTER: &str = "lazy-erofs";

type Client = pb::snapshots_client::SnapshotsClient<tonic::transport::Channel>;

/// A loop-mounted ext4 filesystem, unmounted on drop.
struct SmallFs {
    mnt: PathBuf,
}

impl SmallFs {
    fn new(work: &Path, mib: u64) -> Result<Self> {
        let image = work.join("small.img");
        std::fs::File::create(&image)?.set_len(mib << 20)?;
        // No blocks reserved for root: the daemon runs as root and must see the disk full.
        common::run(
            Command::new("mkfs.ext4")
                .args(["-q", "-m", "0"])
                .arg(&image),
        )?;
        let mnt = work.join("fs");
        std::fs::create_dir(&mnt)?;
        common::run(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&mnt),
        )?;
        Ok(Self { mnt })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

/// Writes `path` until the filesystem has no block left; returns the bytes written.
fn fill(path: &Path) -> Result<u64> {
    let mut file = std::fs::File::create(path)?;
    let mut written = 0;
    for size in [1 << 20, 4096, 512] {
        let chunk = vec![0x5a_u8; size];
        loop {
            match file.write(&chunk) {
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    // Flushing may find the last delayed-allocation writes do not fit: still full.
    let _ = file.sync_all();
    Ok(written)
}

async fn set_label(
    c: &mut Client,
    name: &str,
    key: &str,
    value: &str,
) -> Result<(), tonic::Status> {
    c.update(pb::UpdateSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        info: Some(pb::Info {
            name: name.into(),
            labels: HashMap::from([(key.to_owned(), value.to_owned())]),
            ..pb::Info::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec![format!("labels.{key}")],
        }),
    })
    .await
    .map(drop)
}

async fn labels(c: &mut Client, name: &str) -> Result<HashMap<String, String>> {
    let info = c
        .stat(pb::StatSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: name.into(),
        })
        .await?
        .into_inner()
        .info
        .context("no info")?;
    Ok(info.labels)
}

/// The failure of a call made while the disk is full: ResourceExhausted, saying why.
fn full(status: &tonic::Status) -> Result<()> {
    ensure!(
        status.code() == Code::ResourceExhausted
            && status.message().contains("no space left on the device"),
        "not a clear disk-full error: {status:?}"
    );
    Ok(())
}

/// What the client saw succeed; checked against the daemon after each phase.
struct Acknowledged {
    file: PathBuf,
    labels: HashMap<String, String>,
}

async fn check(c: &mut Client, ack: &Acknowledged) -> Result<()> {
    let mounts = c
        .mounts(pb::MountsRequest {
            snapshotter: SNAPSHOTTER.into(),
            key: "app".into(),
        })
        .await?
        .into_inner()
        .mounts;
    ensure!(!mounts.is_empty(), "no mounts for app");
    ensure!(
        std::fs::read(&ack.file)? == b"acknowledged before the disk filled",
        "the committed layer's file changed"
    );
    let now = labels(c, "app").await?;
    for (key, value) in &ack.labels {
        ensure!(now.get(key) == Some(value), "acknowledged label {key} lost");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_host_disk_full_gives_clear_errors_and_recovers_without_a_restart() -> Result<()>
{
    let work = tempfile::tempdir()?;
    let small = SmallFs::new(work.path(), 48)?;
    let root = small.mnt.clone();
    let mut daemon = Daemon::start(&root)?;
    let mut c = daemon.client().await?;

    // Acknowledged before the disk fills: a committed layer with a file, an active
    // snapshot on it.
    let mounts = c
        .prepare(prepare("base-work", ""))
        .await?
        .into_inner()
        .mounts;
    let layer_dir = PathBuf::from(&mounts.first().context("no mount")?.source);
    std::fs::write(
        layer_dir.join("file"),
        b"acknowledged before the disk filled",
    )?;
    c.commit(commit("base", "base-work")).await?;
    c.prepare(prepare("app", "base")).await?;
    let file = std::fs::read_dir(root.join("snapshots"))?
        .flatten()
        .map(|e| e.path().join("fs/file"))
        .find(|p| p.exists())
        .context("the committed file is nowhere")?;
    let mut ack = Acknowledged {
        file,
        labels: HashMap::new(),
    };

    let filler = root.join("filler");
    let filled = fill(&filler)?;
    println!("filled the filesystem with {} MiB", filled >> 20);

    // A new snapshot needs a directory: refused, clearly.
    let status = c
        .prepare(prepare("while-full", "base"))
        .await
        .expect_err("Prepare on a full disk succeeded");
    full(&status)?;
    println!(
        "Prepare while full: {:?}: {}",
        status.code(),
        status.message()
    );

    // The store: label writes until one cannot be stored.
    let value = "v".repeat(4000);
    let mut store_refused = None;
    for i in 0..2000 {
        let key = format!("k{i}");
        match set_label(&mut c, "app", &key, &value).await {
            Ok(()) => {
                ack.labels.insert(key, value.clone());
            }
            Err(status) => {
                full(&status)?;
                store_refused = Some((i, status));
                break;
            }
        }
    }
    let Some((after, status)) = store_refused else {
        bail!("2000 label writes fit on a full disk: the test did not fill the store");
    };
    println!(
        "store write {after} while full: {:?}: {}",
        status.code(),
        status.message()
    );
    // Still refused (redb latched the error), still clear; reads still served.
    full(
        &set_label(&mut c, "app", "again", "x")
            .await
            .expect_err("latched write"),
    )?;
    check(&mut c, &ack).await.context("while full")?;

    std::fs::remove_file(&filler)?;
    // Everything works again, without a restart.
    set_label(&mut c, "app", "after", "freed").await?;
    ack.labels.insert("after".into(), "freed".into());
    c.prepare(prepare("after-work", "base")).await?;
    c.commit(commit("after", "after-work")).await?;
    check(&mut c, &ack).await.context("after freeing space")?;
    ensure!(
        daemon
            .log()
            .contains("metadata store reopened after an I/O error"),
        "{}",
        daemon.log()
    );

    // Nothing acknowledged is lost across a kill -9 either.
    daemon.kill()?;
    let daemon = Daemon::start(&root)?;
    let mut c = daemon.client().await?;
    check(&mut c, &ack).await.context("after a restart")?;
    labels(&mut c, "after")
        .await
        .context("the snapshot committed after freeing space")?;
    drop(daemon);
    drop(small);
    Ok(())
}
