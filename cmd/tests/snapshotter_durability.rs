//! kill -9 of `lazy-erofs-snapshotter` in the middle of a stream of Prepare/Commit/
//! Remove calls, again and again: after each restart the store opens, every call the
//! client saw succeed is there (and nothing it never asked for), and the snapshot tree
//! holds exactly one directory per snapshot — no half-built or half-removed leftovers.

#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use containerd_client::services::v1::snapshots as pb;
use daemon::Daemon;

const SNAPSHOTTER: &str = "lazy-erofs";
const ROUNDS: usize = 15;

/// What the client knows: committed names (with parents) and the one call in flight.
#[derive(Default)]
struct Model {
    committed: BTreeMap<String, String>,
    in_flight: Option<String>,
}

async fn list(c: &mut daemon_client::Client) -> Result<BTreeMap<String, (i32, String)>> {
    Ok(daemon::list_all(c)
        .await?
        .into_iter()
        .map(|info| (info.name, (info.kind, info.parent)))
        .collect())
}

mod daemon_client {
    pub type Client = containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient<
        tonic::transport::Channel,
    >;
}

/// Whether a failed call failed because the daemon died (the connection went), not
/// because it refused the call: anything else is a bug this test must report.
fn killed(status: &tonic::Status) -> Result<()> {
    // The transport's error is the status's source: a request cut off by the kill reads
    // "operation was canceled" with hyper's "connection closed" beneath it.
    let message = format!(
        "{} {:?}",
        status.message(),
        std::error::Error::source(status)
    )
    .to_lowercase();
    let transport = [
        "transport",
        "connection",
        "h2 protocol",
        "broken pipe",
        "reset",
    ]
    .iter()
    .any(|m| message.contains(m));
    ensure!(
        status.code() == tonic::Code::Unavailable
            || (matches!(
                status.code(),
                tonic::Code::Unknown | tonic::Code::Internal | tonic::Code::Cancelled
            ) && transport),
        "a call failed, but not from the kill: {status:?}"
    );
    Ok(())
}

/// Prepare → commit layers on top of each other, removing the top now and then, until
/// a call fails (the daemon was killed).
async fn churn(c: &mut daemon_client::Client, model: &mut Model, round: usize) -> Result<()> {
    for step in 0.. {
        let parent = model
            .committed
            .keys()
            .next_back()
            .cloned()
            .unwrap_or_default();
        let key = format!("active-{round}-{step}");
        let name = format!("layer-{round:02}-{step:04}");
        model.in_flight = Some(key.clone());
        let prepared = c
            .prepare(pb::PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.clone(),
                parent: parent.clone(),
                labels: Default::default(),
            })
            .await;
        if let Err(status) = &prepared {
            return killed(status);
        }
        model.in_flight = Some(name.clone());
        let committed = c
            .commit(pb::CommitSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                name: name.clone(),
                key: key.clone(),
                labels: Default::default(),
            })
            .await;
        if let Err(status) = &committed {
            return killed(status);
        }
        model.committed.insert(name.clone(), parent);
        if step % 3 == 2 {
            model.in_flight = Some(name.clone());
            let removed = c
                .remove(pb::RemoveSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: name.clone(),
                })
                .await;
            if let Err(status) = &removed {
                return killed(status);
            }
            model.committed.remove(&name);
        }
        model.in_flight = None;
    }
    Ok(())
}

#[tokio::test]
async fn kill_9_during_prepare_commit_remove_leaves_a_consistent_store_and_tree() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("root");
    let mut model = Model::default();
    let mut calls_interrupted = 0;
    for round in 0..ROUNDS {
        let mut daemon = Daemon::start(&root)?;
        let mut c = daemon.client().await?;

        // After the previous kill: what the client saw succeed is there, plus at most
        // the snapshot of the call that was in flight.
        let listed = list(&mut c).await?;
        let committed: BTreeSet<&String> = listed
            .iter()
            .filter(|(_, (kind, _))| *kind == pb::Kind::Committed as i32)
            .map(|(name, _)| name)
            .collect();
        let expected: BTreeSet<&String> = model.committed.keys().collect();
        let in_flight = model.in_flight.as_ref();
        for name in expected.symmetric_difference(&committed) {
            ensure!(
                Some(*name) == in_flight,
                "round {round}: {name} differs between client ({expected:?}) and store ({committed:?})"
            );
        }
        for (name, (_, parent)) in &listed {
            if let Some(want) = model.committed.get(name) {
                ensure!(parent == want, "{name}: parent {parent}, want {want}");
            }
        }
        // One directory per snapshot, nothing half-done.
        let dirs: Vec<String> = std::fs::read_dir(root.join("snapshots"))?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_>>()?;
        let strays: Vec<&String> = dirs.iter().filter(|d| d.parse::<u64>().is_err()).collect();
        ensure!(
            dirs.len() == listed.len() && strays.is_empty(),
            "round {round}: {} directories for {} snapshots; leftovers {strays:?}",
            dirs.len(),
            listed.len()
        );
        // Nothing mounted under the root.
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        ensure!(!mountinfo.contains(root.to_str().context("path")?));

        // Resynchronise: active leftovers go, the in-flight outcome is what the store says.
        for (name, (kind, _)) in &listed {
            if *kind != pb::Kind::Committed as i32 {
                c.remove(pb::RemoveSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: name.clone(),
                })
                .await?;
            }
        }
        model.committed = listed
            .into_iter()
            .filter(|(_, (kind, _))| *kind == pb::Kind::Committed as i32)
            .map(|(name, (_, parent))| (name, parent))
            .collect();
        model.in_flight = None;

        // Kill at a varying point of the next stream of calls.
        let pid = daemon.child.id();
        let delay = Duration::from_millis(20 + (round as u64 * 37) % 150);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
        });
        churn(&mut c, &mut model, round).await?;
        killer
            .join()
            .map_err(|_| anyhow::anyhow!("killer thread"))??;
        daemon.kill().ok();
        if model.in_flight.is_some() {
            calls_interrupted += 1;
        }
    }
    println!(
        "{ROUNDS} kills, {calls_interrupted} with a call in flight, {} committed snapshots at the end",
        model.committed.len()
    );
    ensure!(
        calls_interrupted > ROUNDS / 2,
        "kills rarely hit a call: {calls_interrupted}"
    );
    Ok(())
}

/// The failures a kill causes pass [`killed`], including a request cut off mid-call
/// (seen once in CI); a refusal by a living daemon does not.
#[test]
fn a_cut_connection_counts_as_the_kill_and_a_refusal_does_not() {
    let mut cut = tonic::Status::cancelled("operation was canceled");
    cut.set_source(std::sync::Arc::new(std::io::Error::other(
        "hyper::Error(Canceled, \"connection closed\")",
    )));
    assert!(killed(&cut).is_ok());
    assert!(killed(&tonic::Status::unavailable("tcp connect error")).is_ok());
    assert!(killed(&tonic::Status::cancelled("operation was canceled")).is_err());
    assert!(killed(&tonic::Status::already_exists("snapshot exists")).is_err());
}
