//! `lazy-erofs-snapshotter` through its gRPC socket, as containerd's proxy plugin
//! client talks to it: the codes and messages for bad requests (the daemon keeps
//! serving), socket permissions, clean SIGTERM.

#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::os::unix::fs::PermissionsExt;

use anyhow::Result;
use containerd_client::services::v1::snapshots as pb;
use daemon::{Daemon, commit, prepare};
use tonic::Code;

const SNAPSHOTTER: &str = "lazy-erofs";

/// `snapshotter` plus `key`: the shape of every key-only request.
macro_rules! keyed {
    ($request:ident, $key:expr) => {
        pb::$request {
            snapshotter: SNAPSHOTTER.into(),
            key: $key.into(),
        }
    };
}

/// The status of a call that must fail: its code and that its message says `says`.
fn refused<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    says: &str,
) {
    let status = result.expect_err("the call succeeded");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(says),
        "{:?} does not say {says:?}",
        status.message()
    );
}

#[tokio::test]
async fn bad_requests_get_the_right_codes_and_the_daemon_keeps_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut daemon = Daemon::start(&dir.path().join("root"))?;
    let mut c = daemon.client().await?;

    // A base layer committed, a child active on it.
    c.prepare(prepare("base-active", "")).await?;
    c.commit(commit("base", "base-active")).await?;
    c.prepare(prepare("child", "base")).await?;

    refused(
        c.prepare(prepare("x", "no-such-parent")).await,
        Code::NotFound,
        "no-such-parent",
    );
    refused(
        c.prepare(prepare("child", "base")).await,
        Code::AlreadyExists,
        "child",
    );
    refused(
        c.prepare(prepare("y", "child")).await,
        Code::InvalidArgument,
        "not committed",
    );
    refused(
        c.prepare(prepare("", "")).await,
        Code::InvalidArgument,
        "empty",
    );
    refused(
        c.remove(keyed!(RemoveSnapshotRequest, "base")).await,
        Code::FailedPrecondition,
        "has children",
    );
    refused(
        c.commit(commit("base", "child")).await,
        Code::AlreadyExists,
        "base",
    );
    refused(
        c.commit(commit("again", "base")).await,
        Code::FailedPrecondition,
        "committed",
    );

    let mut huge = prepare("labelled", "");
    huge.labels.insert("k".into(), "v".repeat(5000));
    refused(
        c.prepare(huge).await,
        Code::InvalidArgument,
        "greater than maximum size",
    );
    let mut empty_key = prepare("labelled", "");
    empty_key.labels.insert(String::new(), "v".into());
    refused(
        c.prepare(empty_key).await,
        Code::InvalidArgument,
        "label key is empty",
    );

    // An unknown key in every call that takes one.
    let unknown = "no-such-key";
    refused(
        c.stat(keyed!(StatSnapshotRequest, unknown)).await,
        Code::NotFound,
        unknown,
    );
    refused(
        c.mounts(keyed!(MountsRequest, unknown)).await,
        Code::NotFound,
        unknown,
    );
    refused(
        c.commit(commit("n", unknown)).await,
        Code::NotFound,
        unknown,
    );
    refused(
        c.remove(keyed!(RemoveSnapshotRequest, unknown)).await,
        Code::NotFound,
        unknown,
    );
    refused(
        c.usage(keyed!(UsageRequest, unknown)).await,
        Code::NotFound,
        unknown,
    );
    refused(
        c.update(pb::UpdateSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            info: Some(pb::Info {
                name: unknown.into(),
                ..pb::Info::default()
            }),
            update_mask: None,
        })
        .await,
        Code::NotFound,
        unknown,
    );
    refused(
        c.update(pb::UpdateSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            info: None,
            update_mask: None,
        })
        .await,
        Code::InvalidArgument,
        "without snapshot info",
    );
    refused(
        c.update(pb::UpdateSnapshotRequest {
            snapshotter: SNAPSHOTTER.into(),
            info: Some(pb::Info {
                name: "base".into(),
                ..pb::Info::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["parent".into()],
            }),
        })
        .await,
        Code::InvalidArgument,
        "\"parent\"",
    );
    let mut list = c
        .list(pb::ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.into(),
            filters: vec!["colour==red".into()],
        })
        .await;
    if let Ok(stream) = &mut list {
        // Some servers report list errors in the stream; ours refuses the call.
        panic!(
            "bad filter accepted: {:?}",
            stream.get_mut().message().await
        );
    }
    refused(list, Code::InvalidArgument, "unknown field");

    // Still serving, and the store is as the successful calls left it.
    let mut names: Vec<String> = daemon::list_all(&mut c)
        .await?
        .into_iter()
        .map(|i| i.name)
        .collect();
    names.sort();
    assert_eq!(names, ["base", "child"]);
    c.prepare(prepare("after", "base")).await?;

    // Socket 0660 in a 0700 directory; SIGTERM exits 0 and removes the socket.
    let mode = |p: &std::path::Path| -> Result<u32> {
        Ok(std::fs::metadata(p)?.permissions().mode() & 0o777)
    };
    assert_eq!(mode(&daemon.socket)?, 0o660);
    assert_eq!(mode(daemon.socket.parent().expect("socket dir"))?, 0o700);
    drop(c);
    let status = daemon.stop()?;
    assert!(status.success(), "{status}: {}", daemon.log());
    assert!(!daemon.socket.exists());
    Ok(())
}

#[tokio::test]
async fn a_second_daemon_on_a_live_socket_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let first = Daemon::start(&dir.path().join("root"))?;
    let second =
        std::process::Command::new(lazy_erofs_test_support::bin_exe!("lazy-erofs-snapshotter"))
            .arg("--root")
            .arg(dir.path().join("root"))
            .arg("--address")
            .arg(&first.socket)
            .output()?;
    assert_eq!(second.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains("served by another running snapshotter"),
        "{stderr}"
    );
    // The first one is unharmed.
    let mut c = first.client().await?;
    c.prepare(prepare("still-serving", "")).await?;
    Ok(())
}
