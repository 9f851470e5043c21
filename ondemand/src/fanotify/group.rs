//! A fanotify pre-content group: marks on backing files, permission events with their
//! range, and answers. Kernel 6.14+ (`FAN_PRE_ACCESS`, range info records).
//!
//! nix has `fanotify_init` and `fanotify_mark` but neither the pre-content mask bit, nor
//! info records, nor answers carrying an errno: those few structs are decoded here.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::fanotify::{EventFFlags, Fanotify, InitFlags, MarkFlags, MaskFlags};

use crate::sys;

/// `FAN_PRE_ACCESS`: a read (or write) of a range is about to happen.
pub const FAN_PRE_ACCESS: u64 = 0x0010_0000;
/// `FAN_Q_OVERFLOW`: events were lost.
const FAN_Q_OVERFLOW: u64 = 0x0000_4000;
const FAN_ALLOW: u32 = 0x01;
const FAN_DENY: u32 = 0x02;
const FANOTIFY_METADATA_VERSION: u8 = 3;
const METADATA_LEN: usize = 24;
const INFO_TYPE_RANGE: u8 = 6;
const RANGE_INFO_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error(
        "fanotify pre-content groups are not available here ({0}): needs Linux 6.14+ with \
         CONFIG_FANOTIFY_ACCESS_PERMISSIONS, and CAP_SYS_ADMIN"
    )]
    Init(#[source] Errno),
    #[error(
        "{path}: the filesystem refuses fanotify pre-content marks ({source}); put the \
         cache on ext4, xfs or btrfs (not tmpfs or overlayfs)"
    )]
    Unsupported {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("fanotify mark on {path}: {source}")]
    Mark {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("reading fanotify events: {0}")]
    Read(#[source] io::Error),
    #[error("answering a fanotify event: {0}")]
    Respond(#[source] io::Error),
}

/// One permission event: someone waits to read `len` bytes at `offset` of the file
/// `fd` refers to until it is answered.
#[derive(Debug)]
pub struct AccessEvent {
    /// Opened by the kernel without notification: reads and writes through it raise no
    /// events. Its number in this process names the event in the answer.
    pub fd: OwnedFd,
    pub offset: u64,
    pub len: u64,
    pub pid: i32,
}

/// What [`Group::read_events`] found besides access events.
#[derive(Debug, Default)]
pub struct ReadOutcome {
    pub events: Vec<AccessEvent>,
    /// The queue overflowed: the kernel dropped events (it answers none of them).
    pub overflowed: bool,
}

/// How an event is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Allow,
    /// The reader's syscall fails with this errno (EIO, EAGAIN, …).
    Deny(Errno),
}

impl Answer {
    fn bits(self) -> u32 {
        match self {
            Self::Allow => FAN_ALLOW,
            // FAN_DENY_ERRNO(e): the errno rides in the top byte (pre-content groups).
            Self::Deny(errno) => FAN_DENY | ((errno as u32 & 0xff) << 24),
        }
    }
}

/// The group fd; closing it lets every pending and future access through (fail-open),
/// so whoever owns it keeps it for as long as a mount reads marked files.
#[derive(Debug)]
pub struct Group {
    fanotify: Fanotify,
}

impl Group {
    /// A non-blocking, close-on-exec pre-content group whose event fds are opened
    /// read-write (so fetched bytes can be written through them) and close-on-exec.
    pub fn new() -> Result<Self, GroupError> {
        let fanotify = Fanotify::init(
            InitFlags::FAN_CLASS_PRE_CONTENT | InitFlags::FAN_CLOEXEC | InitFlags::FAN_NONBLOCK,
            EventFFlags::O_RDWR | EventFFlags::O_LARGEFILE | EventFFlags::O_CLOEXEC,
        )
        .map_err(GroupError::Init)?;
        Ok(Self { fanotify })
    }

    /// A group handed over by a predecessor (the fd of a [`Group::new`]).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self {
            fanotify: sys::fanotify_from_fd(fd),
        }
    }

    /// Marks `path` for pre-access events. Must come before the mount opens the file:
    /// a file's notification mode is fixed when it is opened.
    pub fn mark(&self, path: &Path) -> Result<(), GroupError> {
        self.mark_op(MarkFlags::FAN_MARK_ADD, path)
    }

    /// Drops the mark of a file whose every byte is present.
    pub fn unmark(&self, path: &Path) -> Result<(), GroupError> {
        self.mark_op(MarkFlags::FAN_MARK_REMOVE, path)
    }

    fn mark_op(&self, op: MarkFlags, path: &Path) -> Result<(), GroupError> {
        let mask = MaskFlags::from_bits_retain(FAN_PRE_ACCESS);
        self.fanotify
            .mark(op, mask, nix::fcntl::AT_FDCWD, Some(path))
            .map_err(|source| match source {
                Errno::EINVAL | Errno::EOPNOTSUPP | Errno::EXDEV => GroupError::Unsupported {
                    path: path.to_owned(),
                    source,
                },
                source => GroupError::Mark {
                    path: path.to_owned(),
                    source,
                },
            })
    }

    /// Reads whatever events are queued (none: an empty outcome).
    pub fn read_events(&self) -> Result<ReadOutcome, GroupError> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut outcome = ReadOutcome::default();
        loop {
            let n = match nix::unistd::read(self.fanotify.as_fd(), &mut buf) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => return Ok(outcome),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(GroupError::Read(e.into())),
            };
            if n == 0 {
                return Ok(outcome);
            }
            for foreign in parse_events(&buf[..n], &mut outcome) {
                // Not a read we serve (we mark for nothing else): let it through.
                self.respond(foreign.as_raw_fd(), Answer::Allow)?;
            }
        }
    }

    /// Answers the event whose fd had number `fd` in the process that read it.
    pub fn respond(&self, fd: RawFd, answer: Answer) -> Result<(), GroupError> {
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&fd.to_ne_bytes());
        bytes[4..].copy_from_slice(&answer.bits().to_ne_bytes());
        loop {
            match nix::unistd::write(self.fanotify.as_fd(), &bytes) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(GroupError::Respond(e.into())),
            }
        }
    }

    /// Answers `event` and closes its fd (the number is free again only after the
    /// answer, so no later event can be confused with it).
    pub fn answer(&self, event: AccessEvent, answer: Answer) -> Result<(), GroupError> {
        self.respond(event.fd.as_raw_fd(), answer)
    }
}

impl AsFd for Group {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fanotify.as_fd()
    }
}

/// Decodes a buffer of event records into `outcome`; returns the fds of events that are
/// not pre-access events, for the caller to let through.
fn parse_events(buf: &[u8], outcome: &mut ReadOutcome) -> Vec<OwnedFd> {
    let mut foreign = Vec::new();
    let mut at = 0;
    while buf.len() - at >= METADATA_LEN {
        let record = &buf[at..];
        let event_len = u32_at(record, 0) as usize;
        if event_len < METADATA_LEN || event_len > record.len() {
            tracing::error!(
                event_len,
                "malformed fanotify event record; rest of the buffer dropped"
            );
            return foreign;
        }
        let version = record[4];
        let metadata_len = usize::from(u16::from_ne_bytes([record[6], record[7]]));
        let mask = u64::from_ne_bytes(record[8..16].try_into().unwrap_or_default());
        let fd = i32::from_ne_bytes(record[16..20].try_into().unwrap_or_default());
        let pid = i32::from_ne_bytes(record[20..24].try_into().unwrap_or_default());
        at += event_len;
        if mask & FAN_Q_OVERFLOW != 0 {
            outcome.overflowed = true;
        }
        let Some(fd) = sys::own_installed_fd(fd) else {
            continue;
        };
        if version != FANOTIFY_METADATA_VERSION || mask & FAN_PRE_ACCESS == 0 {
            tracing::error!(version, mask, "unexpected fanotify event; allowed");
            foreign.push(fd);
            continue;
        }
        let (offset, len) = range_info(&record[metadata_len.min(event_len)..event_len])
            // No range record: the whole file (the kernel sends one for every read).
            .unwrap_or((0, u64::MAX));
        outcome.events.push(AccessEvent {
            fd,
            offset,
            len,
            pid,
        });
    }
    foreign
}

/// The (offset, count) of the first range info record among `infos`.
fn range_info(mut infos: &[u8]) -> Option<(u64, u64)> {
    while infos.len() >= 4 {
        let info_type = infos[0];
        let len = usize::from(u16::from_ne_bytes([infos[2], infos[3]]));
        if len < 4 || len > infos.len() {
            return None;
        }
        if info_type == INFO_TYPE_RANGE && len >= RANGE_INFO_LEN {
            let offset = u64::from_ne_bytes(infos[8..16].try_into().ok()?);
            let count = u64::from_ne_bytes(infos[16..24].try_into().ok()?);
            return Some((offset, count));
        }
        infos = &infos[len..];
    }
    None
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default())
}
