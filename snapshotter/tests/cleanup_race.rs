//! containerd's GC calls Cleanup while pods are being created: orphan removal must never
//! take the directory of a snapshot being built or just recorded. Creators and Cleanup
//! run at once; afterwards every snapshot's directory is there, with its files.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, ensure};
use lazy_erofs_snapshotter::api::Snapshotter;
use lazy_erofs_snapshotter::overlay::OverlaySnapshotter;

const CREATORS: usize = 4;
const PER_CREATOR: usize = 60;

fn upper_dir(mounts: &[containerd_client::types::Mount]) -> Result<PathBuf> {
    let mount = mounts.first().context("no mount")?;
    if mount.r#type == "bind" {
        return Ok(PathBuf::from(&mount.source));
    }
    mount
        .options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(PathBuf::from)
        .context("no upperdir")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cleanup_during_prepare_and_commit_takes_no_snapshots_directory() -> Result<()> {
    let root = tempfile::tempdir()?;
    let snapshotter = Arc::new(OverlaySnapshotter::open(root.path())?);
    let done = Arc::new(AtomicBool::new(false));
    let cleaner = {
        let (snapshotter, done) = (snapshotter.clone(), done.clone());
        tokio::spawn(async move {
            let mut runs = 0u64;
            while !done.load(Ordering::SeqCst) {
                snapshotter
                    .clear()
                    .await
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                runs += 1;
                tokio::task::yield_now().await;
            }
            anyhow::Ok(runs)
        })
    };
    let mut creators = Vec::new();
    for c in 0..CREATORS {
        let snapshotter = snapshotter.clone();
        creators.push(tokio::spawn(async move {
            for i in 0..PER_CREATOR {
                let (key, name) = (format!("active-{c}-{i}"), format!("layer-{c}-{i}"));
                let mounts = snapshotter
                    .prepare(key.clone(), String::new(), HashMap::new())
                    .await
                    .map_err(|e| anyhow::anyhow!("prepare {key}: {e:?}"))?;
                let dir = upper_dir(&mounts)?;
                std::fs::write(dir.join("file"), name.as_bytes())
                    .with_context(|| format!("writing into {key}'s directory"))?;
                snapshotter
                    .commit(name.clone(), key.clone(), HashMap::new())
                    .await
                    .map_err(|e| anyhow::anyhow!("commit {name}: {e:?}"))?;
            }
            anyhow::Ok(())
        }));
    }
    for creator in creators {
        creator.await??;
    }
    done.store(true, Ordering::SeqCst);
    let cleanups = cleaner.await??;
    println!(
        "{} snapshots created while Cleanup ran {cleanups} times",
        CREATORS * PER_CREATOR
    );
    ensure!(cleanups > 0, "Cleanup never ran");
    // Every committed layer still has its file: a view on it shows it.
    for c in 0..CREATORS {
        for i in 0..PER_CREATOR {
            let name = format!("layer-{c}-{i}");
            let mounts = snapshotter
                .view(format!("view-{c}-{i}"), name.clone(), HashMap::new())
                .await
                .map_err(|e| anyhow::anyhow!("view of {name}: {e:?}"))?;
            let lower = mounts.first().context("no mount")?.source.clone();
            let bytes = std::fs::read(PathBuf::from(&lower).join("file"))
                .with_context(|| format!("{name}'s directory {lower} lost its file"))?;
            ensure!(bytes == name.as_bytes(), "{name}: wrong file");
        }
    }
    Ok(())
}
