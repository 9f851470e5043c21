//! The keeper: a small process that holds a copy of the fanotify group fd so the group
//! outlives the broker. Closing a pre-content group's last fd lets every pending and
//! future read through (fail-open), and the unfetched ranges of a sparse data file read
//! as zeros. So while the broker's process lives, the keeper only waits; when that
//! process is gone, however it ended (planned stop, SIGKILL), the keeper:
//!
//! 1. denies every event the dead broker had read and not answered: it cannot know their
//!    fd numbers, so it answers every number below the broker's fd limit (numbers no
//!    pending event carries are refused by the kernel, harmlessly);
//! 2. from then on answers reads itself: pages in a layer's present record are let
//!    through, anything else fails with EIO — correct bytes or an error, never zeros;
//! 3. hands the group to a successor that asks on `<cache dir>/keeper.sock` (a
//!    restarted broker adopts the group, marks and all, so the old mounts' readers and
//!    the new ones are answered by one group), and exits;
//! 4. or exits, closing the group, once no data file in the cache directory is open by
//!    anyone (the kernel's open of a mount's backing file counts, detached or not).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use super::group::{Answer, Group};
use super::link;
use super::present::Present;
use crate::sys;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ToKeeper {
    /// The group fd rides with this message.
    Group { fd_limit: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("keeper socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the keeper got no group fd")]
    NoGroup,
}

/// Broker side: sends the group over the keeper's socket (its stdin). The socket's other
/// end must stay open for as long as this process serves the group.
pub fn send_group(socket: &UnixStream, group: &Group) -> std::io::Result<()> {
    link::send(
        socket.as_fd(),
        &ToKeeper::Group {
            fd_limit: fd_limit(),
        },
        Some(group.as_fd()),
    )
}

/// This process's fd limit: every event fd it reads is numbered below it.
pub fn fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1 << 20, |(soft, _)| soft)
}

/// The keeper process's body: returns once the group may be closed safely.
/// `successor_wait`: how long reads are left queued (readers pause) for a successor to
/// adopt the group before the keeper answers them itself.
pub fn run(
    socket: UnixStream,
    cache_dir: &Path,
    successor_wait: Duration,
) -> Result<(), KeeperError> {
    let Some((ToKeeper::Group { fd_limit }, Some(fd))) = link::recv::<ToKeeper>(socket.as_fd())?
    else {
        return Err(KeeperError::NoGroup);
    };
    let group = Group::from_fd(fd);
    // Listening from the start: a successor that connects while the broker is still
    // going, or while stale events are denied, waits in the backlog instead of finding
    // no keeper and making a second group (whose reads this one would then fail).
    let adoption = listen(cache_dir);
    // The broker's process holds the other end: EOF (or any error) means it is gone.
    while link::recv::<ToKeeper>(socket.as_fd()).is_ok_and(|m| m.is_some()) {}
    let started = Instant::now();
    let stale = deny_stale(&group, fd_limit);
    tracing::info!(
        stale,
        fd_limit,
        elapsed = ?started.elapsed(),
        ?successor_wait,
        "broker gone; reads wait for a successor, then the keeper answers them from what is present"
    );
    let mut layers = Layers::scan(cache_dir);
    let serve_from = Instant::now() + successor_wait;
    loop {
        if let Some(listener) = &adoption
            && let Ok((successor, _)) = listener.accept()
        {
            let _ = successor.set_nonblocking(false);
            if send_group(&successor, &group).is_ok() {
                tracing::info!("the group is adopted by a successor; the keeper exits");
                let _ = std::fs::remove_file(socket_path(cache_dir));
                return Ok(());
            }
        }
        if Instant::now() < serve_from {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        if link::wait_readable(group.as_fd(), Duration::from_millis(200))? {
            let outcome = group.read_events().map_err(std::io::Error::other)?;
            for event in outcome.events {
                let answer = if layers.present(&event) {
                    Answer::Allow
                } else {
                    Answer::Deny(Errno::EIO)
                };
                if let Err(err) = group.answer(event, answer) {
                    tracing::error!(%err, "keeper cannot answer an event");
                }
            }
        }
        if layers.all_unused() {
            tracing::info!("no layer file is in use any more; the keeper exits");
            return Ok(());
        }
        layers.rescan_if_due(cache_dir);
    }
}

fn socket_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join("keeper.sock")
}

/// The adoption socket (0600, in the 0700 cache directory), non-blocking.
fn listen(cache_dir: &Path) -> Option<UnixListener> {
    let path = socket_path(cache_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .and_then(|l| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .map_err(|e| tracing::warn!(path = %path.display(), %e, "no adoption socket; a successor makes a group of its own"))
        .ok()?;
    Some(listener)
}

/// A successor's side: the group a keeper of `cache_dir` holds, if one is alive.
pub fn adopt(cache_dir: &Path) -> Option<Group> {
    let stream = UnixStream::connect(socket_path(cache_dir)).ok()?;
    // The keeper answers once the broker is gone and its stale events are denied (one
    // write per fd number below the broker's limit: about a second for 2^20).
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .ok()?;
    match link::recv::<ToKeeper>(stream.as_fd()) {
        Ok(Some((ToKeeper::Group { .. }, Some(fd)))) => Some(Group::from_fd(fd)),
        _ => None,
    }
}

/// Denies every event a dead process read but never answered (numbered below
/// `fd_limit`, that process's fd limit); returns how many. Call before this process
/// reads any event itself: its own events could carry the same numbers.
pub fn deny_stale(group: &Group, fd_limit: u64) -> u64 {
    let limit = i32::try_from(fd_limit).unwrap_or(i32::MAX);
    (0..limit)
        .filter(|&fd| group.respond(fd, Answer::Deny(Errno::EIO)).is_ok())
        .count() as u64
}

struct Layer {
    data: PathBuf,
    /// Held only to ask whether anyone else has the file open.
    probe: OwnedFd,
    present: Present,
}

/// The data files of a cache directory, by inode.
struct Layers {
    by_inode: HashMap<(u64, u64), Layer>,
    next_scan: Instant,
}

impl Layers {
    fn scan(cache_dir: &Path) -> Self {
        let mut layers = Self {
            by_inode: HashMap::new(),
            next_scan: Instant::now(),
        };
        layers.rescan_if_due(cache_dir);
        layers
    }

    /// Picks up data files that appeared (the record of each is read once, when found:
    /// the broker that wrote them is gone).
    fn rescan_if_due(&mut self, cache_dir: &Path) {
        if Instant::now() < self.next_scan {
            return;
        }
        self.next_scan = Instant::now() + Duration::from_secs(5);
        let Ok(entries) = std::fs::read_dir(cache_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let data = entry.path();
            if data.extension().is_none_or(|e| e != "data") {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&data) else {
                continue;
            };
            let key = (meta.dev(), meta.ino());
            if self.by_inode.contains_key(&key) {
                continue;
            }
            let Ok(file) = OpenOptions::new().read(true).write(true).open(&data) else {
                continue;
            };
            let present = Present::load(&data.with_extension("present"), meta.len());
            self.by_inode.insert(
                key,
                Layer {
                    data,
                    probe: file.into(),
                    present,
                },
            );
        }
    }

    fn present(&self, event: &super::group::AccessEvent) -> bool {
        let Ok(meta) = std::fs::File::from(match event.fd.try_clone() {
            Ok(fd) => fd,
            Err(_) => return false,
        })
        .metadata() else {
            return false;
        };
        self.by_inode
            .get(&(meta.dev(), meta.ino()))
            .is_some_and(|l| l.present.contains(event.offset, event.len))
    }

    fn all_unused(&self) -> bool {
        self.by_inode.values().all(|layer| {
            let free = sys::nobody_else_has_open(layer.probe.as_fd());
            if !free {
                tracing::trace!(data = %layer.data.display(), fd = layer.probe.as_raw_fd(), "still in use");
            }
            free
        })
    }
}
