//! Starting the fanotify group keeper (see `lazy_erofs_ondemand::fanotify::keeper`) and
//! the hidden `fanotify-keeper` subcommand it runs as.

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use lazy_erofs_ondemand::fanotify::{Group, keeper};

/// The running keeper; while this lives the keeper only waits.
pub struct Keeper {
    socket: Option<UnixStream>,
    pid: u32,
}

impl Keeper {
    /// Lets the keeper take over now (a planned stop, after every event is answered).
    pub fn release(mut self) {
        tracing::info!(pid = self.pid, "the group keeper takes over");
        self.socket.take();
    }
}

/// Starts the keeper in its own process group (a terminal's ^C or a kill of ours must not
/// reach it) and gives it the group. `successor_wait`: how long, once we are gone, it
/// leaves reads waiting for a restarted daemon before answering them itself.
pub fn spawn(group: &Group, cache_dir: &Path, successor_wait: Duration) -> Result<Keeper> {
    let (ours, theirs) = UnixStream::pair().context("socket pair")?;
    let exe = crate::own_executable()?;
    let mut command = Command::new(exe);
    for name in lazy_erofs_ondemand::fdstore::SYSTEMD_ENV {
        command.env_remove(name);
    }
    let child = command
        .arg("fanotify-keeper")
        .arg("--cache-dir")
        .arg(cache_dir)
        .arg("--successor-wait")
        .arg(humantime::format_duration(successor_wait).to_string())
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::null())
        .process_group(0)
        .spawn()
        .context("spawning the keeper")?;
    keeper::send_group(&ours, group).context("handing the group to the keeper")?;
    let pid = child.id();
    // Not waited for: it outlives us whenever a reader still holds a layer.
    drop(child);
    Ok(Keeper {
        socket: Some(ours),
        pid,
    })
}

#[derive(Debug, Args)]
pub struct KeeperArgs {
    /// The cache directory whose data files the group marks.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: PathBuf,
    /// Once the daemon is gone, leave reads waiting this long for a successor to adopt
    /// the group before answering them (present pages, else EIO).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub successor_wait: Duration,
}

/// The keeper process: its stdin is the socket from [`spawn`].
pub fn run(args: &KeeperArgs) -> Result<()> {
    use std::os::fd::AsFd;
    let stdin = std::io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("the keeper's stdin")?;
    keeper::run(
        UnixStream::from(stdin),
        &args.cache_dir,
        args.successor_wait,
    )?;
    Ok(())
}
