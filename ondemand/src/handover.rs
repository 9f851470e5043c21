//! The supervisor ↔ fetcher protocol over a Unix socket.
//!
//! 1. The child connects; the supervisor sends one [`Handover`] datagram carrying, as
//!    SCM_RIGHTS, the kernel-side fd (the bound `/dev/cachefiles` fd, or the child's end
//!    of a fanotify broker link) and the shared stats memfd.
//! 2. The child writes `restore` if told to, then a [`ToParent::Ready`] line.
//! 3. From then on JSON lines: the child asks [`ToParent::Resolve`] for a cookie on each
//!    OPEN and the supervisor answers [`ToChild`]. The child keeps no blob table of its own.

use std::io::{self, BufRead, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::source::{BlobSpec, RegistryCredentials};
use crate::sys;

/// The version of this protocol. The supervisor starts its fetcher from its own
/// executable (`/proc/self/exe`, which stays the same file when an upgrade replaces it on
/// disk), so both ends agree; a child still checks and refuses a newer supervisor.
pub const PROTOCOL: u32 = 1;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// [`PROTOCOL`] of the sender; absent (1) from senders before versioning.
    #[serde(default = "first_protocol")]
    pub protocol: u32,
    /// 1 for the first child, +1 per restart.
    pub generation: u64,
    /// Write `restore` before serving (every child but the first on a fresh bind).
    pub restore: bool,
    /// What the first fd is.
    #[serde(default)]
    pub backend: Backend,
}

fn first_protocol() -> u32 {
    1
}

/// The kernel transport the hand-over's first fd belongs to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The bound `/dev/cachefiles` fd.
    #[default]
    Cachefiles,
    /// The child's end of a fanotify broker link.
    Fanotify,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToParent {
    Ready {
        pid: u32,
        restored: bool,
    },
    /// `domain`: the EROFS domain of the OPEN's volume (`erofs,<domain>`), if any.
    Resolve {
        cookie: String,
        #[serde(default)]
        domain: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
// One answer per OPEN, built and dropped at once: its size does not matter.
#[allow(clippy::large_enum_variant)]
pub enum ToChild {
    Blob {
        spec: BlobSpec,
        /// Credentials given for the blob's registry at run time, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        credentials: Option<RegistryCredentials>,
    },
    Unknown,
}

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("fd hand-over socket: {0}")]
    Io(#[from] io::Error),
    #[error("hand-over message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("hand-over carried {0} fds, expected 2 (device, stats)")]
    Fds(usize),
    #[error("peer closed the hand-over socket")]
    Closed,
    #[error("hand-over line longer than {0} bytes")]
    TooLong(usize),
}

/// Supervisor side: sends the hand-over with the device and stats fds.
pub fn send_handover(
    stream: &UnixStream,
    handover: Handover,
    device: BorrowedFd<'_>,
    stats: BorrowedFd<'_>,
) -> Result<(), HandoverError> {
    let bytes = serde_json::to_vec(&handover)?;
    let fds = [device.as_raw_fd(), stats.as_raw_fd()];
    let sent = socket::sendmsg::<()>(
        stream.as_raw_fd(),
        &[io::IoSlice::new(&bytes)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)?;
    if sent != bytes.len() {
        return Err(HandoverError::Io(io::Error::other("short hand-over send")));
    }
    Ok(())
}

/// Child side: receives the hand-over and takes ownership of the two fds, close-on-exec
/// from the moment they arrive (a credential helper the fetcher starts must not hold
/// the device).
pub fn recv_handover(stream: &UnixStream) -> Result<(Handover, OwnedFd, OwnedFd), HandoverError> {
    let mut buf = [0u8; MAX_HANDOVER_LEN];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let message = socket::recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    // Own every fd received, so extras are closed rather than leaked.
    let mut owned: Vec<OwnedFd> = Vec::new();
    for cmsg in message.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            owned.extend(fds.into_iter().filter_map(sys::own_installed_fd));
        }
    }
    let n = message.bytes;
    if n == 0 {
        return Err(HandoverError::Closed);
    }
    if owned.len() != 2 {
        return Err(HandoverError::Fds(owned.len()));
    }
    let handover: Handover = serde_json::from_slice(&buf[..n])?;
    let stats = owned.pop().ok_or(HandoverError::Fds(1))?;
    let device = owned.pop().ok_or(HandoverError::Fds(0))?;
    Ok((handover, device, stats))
}

/// Writes one JSON line.
pub fn write_line<T: Serialize>(mut out: impl Write, message: &T) -> Result<(), HandoverError> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()?;
    Ok(())
}

/// Longest hand-over datagram and JSON line accepted: the peer is trusted, but a bug on
/// either side must not make the other allocate without bound.
pub const MAX_HANDOVER_LEN: usize = 4096;
pub const MAX_LINE_LEN: usize = 1 << 20;

/// Reads one JSON line of at most [`MAX_LINE_LEN`] bytes; `Closed` at end of stream.
pub fn read_line<T: for<'de> Deserialize<'de>>(
    input: &mut impl BufRead,
) -> Result<T, HandoverError> {
    let mut line = Vec::new();
    let n = io::Read::take(&mut *input, MAX_LINE_LEN as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(HandoverError::Closed);
    }
    if line.len() > MAX_LINE_LEN {
        return Err(HandoverError::TooLong(MAX_LINE_LEN));
    }
    Ok(serde_json::from_slice(line.trim_ascii_end())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    #[test]
    fn handover_carries_two_fds_and_lines_round_trip() {
        let (parent, child) = UnixStream::pair().expect("pair");
        let stats = crate::stats::Stats::create().expect("memfd");
        let dev = std::fs::File::open("/dev/null").expect("null");
        use std::os::fd::AsFd;
        send_handover(
            &parent,
            Handover {
                protocol: PROTOCOL,
                generation: 3,
                restore: true,
                backend: Backend::Fanotify,
            },
            dev.as_fd(),
            stats.fd(),
        )
        .expect("send");
        let (handover, _dev, _stats) = recv_handover(&child).expect("recv");
        assert_eq!(
            handover,
            Handover {
                protocol: PROTOCOL,
                generation: 3,
                restore: true,
                backend: Backend::Fanotify,
            }
        );

        write_line(
            &child,
            &ToParent::Resolve {
                cookie: "layer".into(),
                domain: Some("d".into()),
            },
        )
        .expect("write");
        let got: ToParent = read_line(&mut BufReader::new(&parent)).expect("read");
        assert_eq!(
            got,
            ToParent::Resolve {
                cookie: "layer".into(),
                domain: Some("d".into()),
            }
        );
    }

    #[test]
    fn handover_without_fds_is_refused() {
        let (parent, child) = UnixStream::pair().expect("pair");
        use std::io::Write as _;
        (&parent)
            .write_all(br#"{"generation":1,"restore":false}"#)
            .expect("write");
        assert!(matches!(recv_handover(&child), Err(HandoverError::Fds(0))));
        drop(parent);
        assert!(matches!(recv_handover(&child), Err(HandoverError::Closed)));
    }

    #[test]
    fn received_fds_are_close_on_exec_and_long_lines_refused() {
        use nix::fcntl::{FcntlArg, FdFlag, fcntl};
        let (parent, child) = UnixStream::pair().expect("pair");
        let stats = crate::stats::Stats::create().expect("memfd");
        let dev = std::fs::File::open("/dev/null").expect("null");
        use std::os::fd::AsFd;
        send_handover(&parent, Handover::default(), dev.as_fd(), stats.fd()).expect("send");
        let (_, dev, stats) = recv_handover(&child).expect("recv");
        for fd in [&dev, &stats] {
            let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFD).expect("F_GETFD");
            assert!(
                FdFlag::from_bits_truncate(flags).contains(FdFlag::FD_CLOEXEC),
                "{fd:?} is inherited by exec"
            );
        }
        let long = vec![b' '; MAX_LINE_LEN + 10];
        let mut input = BufReader::new(&long[..]);
        assert!(matches!(
            read_line::<ToChild>(&mut input),
            Err(HandoverError::TooLong(_))
        ));
    }

    #[test]
    fn a_blob_answer_carries_its_registry_credentials_and_never_prints_them() {
        let spec = BlobSpec::Local(crate::source::LocalBlob {
            path: "/blob".into(),
            throttle: None,
        });
        let bare = ToChild::Blob {
            spec: spec.clone(),
            credentials: None,
        };
        let mut line = Vec::new();
        write_line(&mut line, &bare).expect("write");
        assert!(!String::from_utf8_lossy(&line).contains("credentials"));
        let given = ToChild::Blob {
            spec,
            credentials: Some(RegistryCredentials {
                registry: "registry.example".into(),
                username: "kubelet".into(),
                password: "hunter2".into(),
            }),
        };
        let mut line = Vec::new();
        write_line(&mut line, &given).expect("write");
        let back: ToChild = read_line(&mut BufReader::new(&line[..])).expect("read");
        assert_eq!(back, given);
        assert!(!format!("{back:?}").contains("hunter2"), "{back:?}");
    }

    #[test]
    fn garbage_line_is_an_error() {
        let mut input = BufReader::new(&b"{not json\n"[..]);
        assert!(matches!(
            read_line::<ToChild>(&mut input),
            Err(HandoverError::Json(_))
        ));
    }
}
