//! Kernel handles kept across restarts in systemd's file descriptor store.
//!
//! A bound `/dev/cachefiles` or a fanotify group lives as long as any process holds a
//! copy. Handing a copy to systemd (`FDSTORE=1`, named with `FDNAME=`) keeps the cache
//! bound and the group open while the daemon restarts or after it crashed: readers of
//! data not fetched yet wait, and the next process of the unit gets the handles back in
//! `LISTEN_FDS` / `LISTEN_FDNAMES`, validates them and serves those reads. Outside
//! systemd (no `NOTIFY_SOCKET`) nothing is stored and [`FdStore::active`] says so.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use sd_notify::NotifyState;

use crate::sys;

/// Names of the handles this daemon stores.
pub const CACHEFILES: &str = "cachefiles";
pub const FANOTIFY: &str = "fanotify";

/// Environment a child of the daemon must not inherit: it would talk to systemd as us.
pub const SYSTEMD_ENV: [&str; 4] = [
    "NOTIFY_SOCKET",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
];

static TAKEN: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Default)]
pub struct FdStore {
    active: bool,
    passed: BTreeMap<String, OwnedFd>,
}

impl FdStore {
    /// The store as systemd left it for this process: the fds passed at start, by name.
    /// Only the first call takes them (each number is owned once).
    pub fn from_env() -> Self {
        let active = std::env::var_os("NOTIFY_SOCKET").is_some();
        let mut passed = BTreeMap::new();
        if !TAKEN.swap(true, Ordering::SeqCst) {
            match sd_notify::listen_fds_with_names() {
                Ok(fds) => {
                    for (raw, name) in fds {
                        let Some(fd) = sys::own_inherited_fd(raw) else {
                            continue;
                        };
                        if passed.insert(name.clone(), fd).is_some() {
                            tracing::warn!(
                                name,
                                "systemd passed two fds of one name; the first is closed"
                            );
                        }
                    }
                }
                Err(err) => tracing::warn!(%err, "ignoring the fds systemd passed"),
            }
        }
        Self { active, passed }
    }

    /// Whether a service manager listens (`NOTIFY_SOCKET`): only then are handles kept.
    pub fn active(&self) -> bool {
        self.active
    }

    /// Takes the handle stored under `name`, if systemd passed one.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        self.passed.remove(name)
    }

    /// Names of the passed fds nobody took.
    pub fn untaken(&self) -> Vec<String> {
        self.passed.keys().cloned().collect()
    }

    /// Hands systemd a copy of `fd` under `name`. `FDPOLL=0`: systemd must not drop
    /// it when it polls readable or hung up (a cachefiles device or a fanotify group
    /// with requests queued does).
    pub fn keep(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        if !self.active {
            return Ok(());
        }
        sd_notify::notify_with_fds(
            &[
                NotifyState::FdStore,
                NotifyState::FdName(name),
                NotifyState::Custom("FDPOLL=0"),
            ],
            &[fd],
        )
    }

    /// Asks systemd to close its copy of the handle stored under `name`.
    pub fn forget(&self, name: &str) -> io::Result<()> {
        if !self.active {
            return Ok(());
        }
        sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)])
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)])
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) -> io::Result<()> {
        sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status(status)])
    }
}
