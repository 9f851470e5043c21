//! The bound `/dev/cachefiles` device: commands (`dir`, `tag`, `bind ondemand`, `copen`,
//! `restore`), request reads, and the anon fds the kernel hands out with OPEN.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::cachefiles::msg::{self, Message, MsgError};
pub use crate::kernel::{CacheObject, Kernel, Request};
use crate::sys;

pub const DEVICE_PATH: &str = "/dev/cachefiles";

/// Large enough for any message: OPEN carries two short keys.
pub const MAX_MSG_LEN: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot open {DEVICE_PATH}: {0}")]
    Open(#[source] io::Error),
    #[error("{DEVICE_PATH} command '{command}' failed: {source}")]
    Command {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("reading {DEVICE_PATH}: {0}")]
    Read(#[source] io::Error),
    #[error("malformed message from the kernel: {0}")]
    Malformed(#[from] MsgError),
    #[error("cache directory path is not valid UTF-8 or contains a newline: {0:?}")]
    BadPath(std::path::PathBuf),
    /// A kept fd (from a service manager's store) is not a bound `/dev/cachefiles`.
    #[error("the kept fd is not a bound {DEVICE_PATH}: {0}")]
    NotBound(String),
    /// The fanotify backend's broker link failed (the broker is gone).
    #[error("fanotify broker link: {0}")]
    Link(#[source] io::Error),
}

impl Kernel for Device {
    type Object = AnonFd;

    fn next_request(
        &self,
        buf: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<Request>, DeviceError> {
        Device::next_request(self, buf, timeout)
    }

    fn copen(&self, msg_id: u32, size: Result<u64, Errno>) -> Result<(), DeviceError> {
        Device::copen(self, msg_id, size)
    }
}

impl CacheObject for AnonFd {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        AnonFd::write_all_at(self, buf, offset)
    }

    fn complete(&self, msg_id: u32) -> io::Result<()> {
        AnonFd::complete(self, msg_id)
    }

    // The anon fd seeks in the cache file behind it (cachefiles_ondemand_fd_llseek).
    fn holds(&self, offset: u64, len: u64) -> bool {
        crate::kernel::range_is_data(self.file.as_fd(), offset, len)
    }
}

/// `/dev/cachefiles`, opened and (once [`Device::bind`] succeeded) bound in ondemand mode.
#[derive(Debug)]
pub struct Device {
    file: File,
}

impl Device {
    /// Opens the device without binding it (one opener per host: EBUSY otherwise).
    pub fn open() -> Result<Self, DeviceError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(DEVICE_PATH)
            .map_err(DeviceError::Open)?;
        Ok(Self { file })
    }

    /// Opens the device and binds an ondemand cache in `cache_dir` (which must exist and
    /// not be on tmpfs) under `tag`.
    pub fn bind(cache_dir: &Path, tag: &str) -> Result<Self, DeviceError> {
        let device = Self::open()?;
        device.bind_ondemand(cache_dir, tag)?;
        Ok(device)
    }

    /// `dir`, `tag`, `bind ondemand` on an opened device.
    pub fn bind_ondemand(&self, cache_dir: &Path, tag: &str) -> Result<(), DeviceError> {
        let dir = cache_dir
            .to_str()
            .filter(|d| !d.contains('\n'))
            .ok_or_else(|| DeviceError::BadPath(cache_dir.to_path_buf()))?;
        self.command(&format!("dir {dir}"))?;
        self.command(&format!("tag {tag}"))?;
        self.command("bind ondemand")
    }

    /// Takes back a device fd a previous process of this daemon bound and left in a
    /// service manager's keeping: checks that it is `/dev/cachefiles` (same device
    /// number) and still bound (the kernel refuses a second `bind` with EBUSY; an
    /// unbound one would fail with EINVAL, having no directory).
    pub fn adopt(fd: OwnedFd) -> Result<Self, DeviceError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let file = File::from(fd);
        let ours = file.metadata().map_err(DeviceError::Open)?;
        let device = std::fs::metadata(DEVICE_PATH).map_err(DeviceError::Open)?;
        if !ours.file_type().is_char_device() || ours.rdev() != device.rdev() {
            return Err(DeviceError::NotBound(format!(
                "device number {:#x}, {DEVICE_PATH} is {:#x}",
                ours.rdev(),
                device.rdev()
            )));
        }
        let device = Self { file };
        match nix::unistd::write(&device.file, b"bind ondemand") {
            Err(Errno::EBUSY) => Ok(device),
            Ok(_) => Err(DeviceError::NotBound(
                "it accepted a new bind (the old cache was gone)".into(),
            )),
            Err(errno) => Err(DeviceError::NotBound(format!("bind probe: {errno}"))),
        }
    }

    /// Wraps a device fd received from another process (already bound).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self {
            file: File::from(fd),
        }
    }

    /// Writes one command in one `write(2)`; the kernel answers each write with success
    /// or an errno.
    pub fn command(&self, command: &str) -> Result<(), DeviceError> {
        match nix::unistd::write(&self.file, command.as_bytes()) {
            Ok(_) => Ok(()),
            Err(errno) => Err(DeviceError::Command {
                command: command.to_owned(),
                source: errno.into(),
            }),
        }
    }

    /// Answers an OPEN: the object's size, or a negative errno to refuse it (the mount
    /// then fails with that error).
    pub fn copen(&self, msg_id: u32, size: Result<u64, Errno>) -> Result<(), DeviceError> {
        match size {
            Ok(size) => self.command(&format!("copen {msg_id},{size}")),
            Err(errno) => self.command(&format!("copen {msg_id},-{}", errno as i32)),
        }
    }

    /// Asks the kernel to re-send every request still in flight (after a fetcher died).
    pub fn restore(&self) -> Result<(), DeviceError> {
        self.command("restore")
    }

    /// Waits up to `timeout` for a request and reads it into `buf` (reused between
    /// calls; [`MAX_MSG_LEN`] bytes fit any message). `Ok(None)` when none arrived.
    /// A malformed OPEN is refused with `copen -EINVAL` (so no mount hangs on it) and
    /// its anon fd closed before the error is returned.
    pub fn next_request(
        &self,
        buf: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<Request>, DeviceError> {
        let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(0) | Err(Errno::EINTR) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(DeviceError::Read(e.into())),
        }
        buf.resize(MAX_MSG_LEN, 0);
        let n = match nix::unistd::read(&self.file, buf) {
            Ok(n) => n,
            Err(Errno::EINTR | Errno::EAGAIN) => return Ok(None),
            Err(e) => return Err(DeviceError::Read(e.into())),
        };
        if n == 0 {
            return Ok(None);
        }
        self.decode(&buf[..n]).map(Some)
    }

    fn decode(&self, buf: &[u8]) -> Result<Request, DeviceError> {
        let anon = msg::open_fd(buf).and_then(sys::own_installed_fd).map(|fd| {
            // The kernel installs anon fds without O_CLOEXEC: a program the fetcher
            // starts (a docker credential helper) would keep a dead fetcher's cache
            // objects open and defeat failover.
            if let Err(e) = set_cloexec(&fd) {
                tracing::warn!(error = %e, "cannot mark a cache object fd close-on-exec");
            }
            AnonFd::new(fd)
        });
        match msg::parse(buf) {
            Ok(Message::Open(open)) => match anon {
                Some(anon) => Ok(Request::Open { open, anon }),
                // parse() accepts only valid fd numbers, so this is unreachable; refuse
                // rather than leave the mount waiting.
                None => {
                    let _ = self.copen(open.msg_id, Err(Errno::EINVAL));
                    Err(DeviceError::Malformed(MsgError::BadFd(u32::MAX)))
                }
            },
            Ok(Message::Read(read)) => Ok(Request::Read(read)),
            Ok(Message::Close(close)) => Ok(Request::Close(close)),
            Err(err) => {
                drop(anon);
                if msg::is_open(buf)
                    && let Some(msg_id) = msg::msg_id(buf)
                {
                    let _ = self.copen(msg_id, Err(Errno::EINVAL));
                }
                Err(err.into())
            }
        }
    }
}

impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl From<Device> for OwnedFd {
    fn from(device: Device) -> OwnedFd {
        device.file.into()
    }
}

/// The per-object fd the kernel installs with an OPEN: READ replies are written into it
/// and completed with an ioctl. Writes are direct I/O: use page-aligned buffers
/// ([`crate::AlignedBuf`]) and 4 KiB-aligned offsets and lengths.
#[derive(Debug)]
pub struct AnonFd {
    file: File,
}

impl AnonFd {
    fn new(fd: OwnedFd) -> Self {
        Self {
            file: File::from(fd),
        }
    }

    /// Writes all of `buf` at `offset`; a short write continues where it stopped.
    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Tells the kernel the READ `msg_id` is done; the range it asked for must have been
    /// written (an unwritten range reads as EIO).
    pub fn complete(&self, msg_id: u32) -> io::Result<()> {
        sys::read_complete(self.file.as_fd(), msg_id).map_err(io::Error::from)
    }
}

/// Sets `FD_CLOEXEC` on `fd`.
pub(crate) fn set_cloexec(fd: &impl AsFd) -> nix::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    fcntl(fd.as_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map(drop)
}
