//! The broker ↔ fetcher link: one `SOCK_SEQPACKET` socket pair per fetcher child, one
//! JSON message per packet, a file's fd riding with each [`ToFetcher::Open`].
//!
//! The child side implements [`Kernel`], so the transport-neutral fetcher serves the
//! broker exactly as it serves `/dev/cachefiles`: OPEN → `Copen`, READ → chunks written
//! through the layer's fd (`Written` per write) → `Done`.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::cachefiles::device::DeviceError;
use crate::cachefiles::msg::{Open, Read};
use crate::kernel::{CacheObject, Kernel, Request};
use crate::sys;

/// Longest packet either side sends or accepts.
const MAX_PACKET: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToFetcher {
    /// Serve layer `object_id`, registered with the supervisor as `name`; its data file
    /// (opened without notification) comes with the packet.
    Open {
        msg_id: u32,
        object_id: u32,
        name: String,
    },
    /// A reader waits for `[offset, offset + len)` of layer `object_id`.
    Read {
        msg_id: u32,
        object_id: u32,
        offset: u64,
        len: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToBroker {
    /// The answer to an Open: the source's size, or the errno it was refused with.
    Copen {
        msg_id: u32,
        result: Result<u64, i32>,
    },
    /// Verified bytes are in the data file at `[offset, offset + len)`.
    Written {
        object_id: u32,
        offset: u64,
        len: u64,
    },
    /// The fetcher is done with Read `msg_id` (whether its bytes arrived is for the
    /// broker to check against what was written).
    Done { msg_id: u32 },
}

/// A socket pair for one child: `(broker end, child end)`, close-on-exec.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socket::socketpair(
        socket::AddressFamily::Unix,
        socket::SockType::SeqPacket,
        None,
        socket::SockFlag::SOCK_CLOEXEC,
    )?;
    Ok((a, b))
}

/// Sends one message, with `fd` attached if given.
pub fn send<T: Serialize>(
    socket: BorrowedFd<'_>,
    message: &T,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    let fds: Vec<RawFd> = fd.iter().map(AsRawFd::as_raw_fd).collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    loop {
        match socket::sendmsg::<()>(
            socket.as_raw_fd(),
            &[io::IoSlice::new(&bytes)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message and its fd, if any; `Ok(None)` when the peer has closed.
/// Any fds beyond the first are closed.
pub fn recv<T: for<'de> Deserialize<'de>>(
    socket: BorrowedFd<'_>,
) -> io::Result<Option<(T, Option<OwnedFd>)>> {
    let mut buf = [0u8; MAX_PACKET];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let message = loop {
        match socket::recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => break m,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for cmsg in message.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            fds.extend(raw.into_iter().filter_map(sys::own_installed_fd));
        }
    }
    let n = message.bytes;
    if n == 0 {
        return Ok(None);
    }
    let parsed = serde_json::from_slice(&buf[..n]).map_err(io::Error::other)?;
    Ok(Some((parsed, fds.into_iter().next())))
}

/// Waits up to `timeout` for `fd` to become readable (or hung up).
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(n) => Ok(n > 0),
        Err(Errno::EINTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The child's end: the broker as the fetcher's [`Kernel`].
#[derive(Debug)]
pub struct BrokerLink {
    socket: Arc<OwnedFd>,
}

impl BrokerLink {
    pub fn new(socket: OwnedFd) -> Self {
        Self {
            socket: Arc::new(socket),
        }
    }
}

fn link_error(e: io::Error) -> DeviceError {
    DeviceError::Link(e)
}

impl Kernel for BrokerLink {
    type Object = DataFile;

    fn next_request(
        &self,
        _buf: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<Request<DataFile>>, DeviceError> {
        if !wait_readable(self.socket.as_fd(), timeout).map_err(link_error)? {
            return Ok(None);
        }
        let Some((message, fd)) = recv::<ToFetcher>(self.socket.as_fd()).map_err(link_error)?
        else {
            return Err(link_error(io::Error::other("the broker closed the link")));
        };
        Ok(Some(match message {
            ToFetcher::Open {
                msg_id,
                object_id,
                name,
            } => {
                let fd = fd.ok_or_else(|| {
                    link_error(io::Error::other("an Open came without its data file"))
                })?;
                let file = File::from(fd);
                let size = file.metadata().map_err(link_error)?.len();
                Request::Open {
                    open: Open {
                        msg_id,
                        object_id,
                        volume_key: Vec::new(),
                        cookie_key: name.into_bytes(),
                        flags: 0,
                    },
                    anon: DataFile {
                        file,
                        size,
                        object_id,
                        socket: self.socket.clone(),
                    },
                }
            }
            ToFetcher::Read {
                msg_id,
                object_id,
                offset,
                len,
            } => Request::Read(Read {
                msg_id,
                object_id,
                offset,
                len,
            }),
        }))
    }

    fn copen(&self, msg_id: u32, size: Result<u64, Errno>) -> Result<(), DeviceError> {
        let result = size.map_err(|e| e as i32);
        send(
            self.socket.as_fd(),
            &ToBroker::Copen { msg_id, result },
            None,
        )
        .map_err(|source| DeviceError::Command {
            command: "copen".into(),
            source,
        })
    }
}

/// A layer's data file, written through an fd that raises no events.
#[derive(Debug)]
pub struct DataFile {
    file: File,
    size: u64,
    object_id: u32,
    socket: Arc<OwnedFd>,
}

impl CacheObject for DataFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        // The fetcher writes whole pages; the data file ends where the data space does.
        let len = buf
            .len()
            .min(usize::try_from(self.size.saturating_sub(offset)).unwrap_or(usize::MAX));
        self.file.write_all_at(&buf[..len], offset)?;
        send(
            self.socket.as_fd(),
            &ToBroker::Written {
                object_id: self.object_id,
                offset,
                len: len as u64,
            },
            None,
        )
    }

    fn complete(&self, msg_id: u32) -> io::Result<()> {
        send(self.socket.as_fd(), &ToBroker::Done { msg_id }, None)
    }

    fn holds(&self, offset: u64, len: u64) -> bool {
        let len = len.min(self.size.saturating_sub(offset));
        crate::kernel::range_is_data(self.file.as_fd(), offset, len)
    }
}
