//! Starting `lazy-erofs-snapshotter` on a scratch root and talking to it as containerd
//! does (containerd-client's Snapshots client over the Unix socket).

// Shared by several test binaries; each uses a part.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use tonic::transport::Channel;

pub struct Daemon {
    pub child: Child,
    pub root: PathBuf,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts the daemon on `root`, waits until it serves.
    pub fn start(root: &Path) -> Result<Self> {
        Self::start_with(root, "")
    }

    /// Starts the daemon on `root` with `config` (TOML) added to its configuration file
    /// (inside its `[snapshotter]` table until `config` opens another),
    /// waits until it serves. Each root gets its own fscache tag (the kernel refuses a
    /// second cache with the same tag).
    pub fn start_with(root: &Path, config: &str) -> Result<Self> {
        Self::start_with_env(root, config, &[])
    }

    /// Like [`start_with`](Self::start_with), with `env` added to the daemon's
    /// environment (its fetcher inherits it).
    pub fn start_with_env(
        root: &Path,
        config: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Self> {
        let socket = root.join("run/snapshotter.sock");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.with_extension("log"))?;
        let config_file = root.with_extension("toml");
        let tag = format!(
            "lt-{:x}",
            root.display()
                .to_string()
                .bytes()
                .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
        );
        // Metrics off unless the test asks for them: test daemons run side by side
        // and the default port is one.
        let metrics = if config.contains("[metrics]") {
            ""
        } else {
            "[metrics]\naddress = \"\"\n"
        };
        std::fs::write(
            &config_file,
            format!("{metrics}[snapshotter]\nfscache_tag = \"{tag}\"\n{config}"),
        )?;
        let child = Command::new(lazy_erofs_test_support::bin_exe!("lazy-erofs-snapshotter"))
            .arg("--config")
            .arg(&config_file)
            .arg("--root")
            .arg(root)
            .arg("--address")
            .arg(&socket)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting lazy-erofs-snapshotter")?;
        let mut daemon = Daemon {
            child,
            root: root.to_path_buf(),
            socket,
        };
        let started = Instant::now();
        while std::os::unix::net::UnixStream::connect(&daemon.socket).is_err() {
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "snapshotter exited with {status} before serving: {}",
                    daemon.log()
                );
            }
            if started.elapsed() > Duration::from_secs(20) {
                bail!("snapshotter did not serve within 20 s: {}", daemon.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(daemon)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.with_extension("log")).unwrap_or_default()
    }

    /// The pid of the fetcher the daemon runs for lazy layers.
    pub fn fetcher_pid(&self) -> Result<i32> {
        let text = std::fs::read_to_string(self.root.join("fetcher/fetcher.pid"))?;
        Ok(text.trim().parse()?)
    }

    /// SIGKILLs the fetcher each time `progress` (bytes the registry sent) has moved on by
    /// `step` since the last kill, until `done`: every replacement makes some progress
    /// before it is killed in turn, so the reader finishes. Returns the kills.
    pub fn kill_fetcher_per(
        &self,
        step: u64,
        progress: impl Fn() -> u64,
        mut done: impl FnMut() -> Result<bool>,
        timeout: Duration,
    ) -> Result<usize> {
        let started = Instant::now();
        let mut kills = 0;
        let mut at_last_kill = progress();
        while !done()? {
            if started.elapsed() > timeout {
                bail!("the reader was not done after {timeout:?} and {kills} fetcher kills");
            }
            std::thread::sleep(Duration::from_millis(50));
            if progress() < at_last_kill + step {
                continue;
            }
            if let Ok(pid) = self.fetcher_pid()
                && nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .is_ok()
            {
                kills += 1;
                at_last_kill = progress();
            }
        }
        Ok(kills)
    }

    pub async fn client(&self) -> Result<SnapshotsClient<Channel>> {
        let channel = containerd_client::connect(&self.socket).await?;
        Ok(SnapshotsClient::new(channel))
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> Result<std::process::ExitStatus> {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        Ok(self.child.wait()?)
    }

    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A killed daemon leaves its lazy layer mounts, and they keep its withdrawn
        // cache alive; the kernel then refuses fscache mounts to every later cache
        // (ENOBUFS). Tests after this one must start clean.
        if let Ok(entries) = std::fs::read_dir(self.root.join("layers/mnt")) {
            for entry in entries.flatten() {
                let _ = nix::mount::umount2(&entry.path(), nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// Every snapshot the daemon lists (all List reply batches).
pub async fn list_all(
    client: &mut SnapshotsClient<Channel>,
) -> Result<Vec<containerd_client::services::v1::snapshots::Info>> {
    let mut stream = client
        .list(
            containerd_client::services::v1::snapshots::ListSnapshotsRequest {
                snapshotter: "lazy-erofs".into(),
                filters: vec![],
            },
        )
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(batch) = stream.message().await? {
        out.extend(batch.info);
    }
    Ok(out)
}

/// The daemon's store as (name without containerd's `namespace/id/` prefix, kind) pairs:
/// comparable with [`super::containerd::Containerd::snapshot_kinds`].
pub async fn snapshot_kinds(
    daemon: &Daemon,
) -> Result<std::collections::BTreeSet<(String, String)>> {
    snapshot_kinds_at(&daemon.socket).await
}

/// [`snapshot_kinds`] of the daemon serving `socket`.
pub async fn snapshot_kinds_at(
    socket: &Path,
) -> Result<std::collections::BTreeSet<(String, String)>> {
    use containerd_client::services::v1::snapshots as pb;
    let channel = containerd_client::connect(socket).await?;
    let mut c = SnapshotsClient::new(channel);
    let mut out = std::collections::BTreeSet::new();
    for info in list_all(&mut c).await? {
        let name = info
            .name
            .splitn(3, '/')
            .nth(2)
            .unwrap_or(&info.name)
            .to_owned();
        let kind = pb::Kind::try_from(info.kind)
            .map(|k| k.as_str_name().to_lowercase())
            .unwrap_or_default();
        out.insert((name, kind));
    }
    Ok(out)
}

/// A Prepare of `key` on `parent`, no labels.
pub fn prepare(
    key: &str,
    parent: &str,
) -> containerd_client::services::v1::snapshots::PrepareSnapshotRequest {
    containerd_client::services::v1::snapshots::PrepareSnapshotRequest {
        snapshotter: "lazy-erofs".into(),
        key: key.into(),
        parent: parent.into(),
        labels: std::collections::HashMap::new(),
    }
}

/// A Commit of active `key` as `name`, no labels.
pub fn commit(
    name: &str,
    key: &str,
) -> containerd_client::services::v1::snapshots::CommitSnapshotRequest {
    containerd_client::services::v1::snapshots::CommitSnapshotRequest {
        snapshotter: "lazy-erofs".into(),
        name: name.into(),
        key: key.into(),
        labels: std::collections::HashMap::new(),
    }
}
