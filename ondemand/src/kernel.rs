//! What the transport-neutral fetcher needs of a kernel transport: requests in (OPEN,
//! READ, CLOSE), OPEN answers out, and per-object handles that READ replies are written
//! into and completed on. The cachefiles device and the fanotify broker link implement it;
//! the fetcher's tests drive a recording fake.

use std::io;
use std::time::Duration;

use nix::errno::Errno;

use crate::cachefiles::device::{AnonFd, DeviceError};
use crate::cachefiles::msg::{Close, Open, Read};

/// A request from the kernel side (the cachefiles device or the fanotify broker), with
/// the per-object handle of an OPEN already owned.
#[derive(Debug)]
pub enum Request<O = AnonFd> {
    Open { open: Open, anon: O },
    Read(Read),
    Close(Close),
}

/// What a fetcher needs of the kernel: requests in, OPEN answers out. The cachefiles
/// `Device` and the fanotify `BrokerLink` are the real ones; the fetcher's tests drive a
/// recording fake through the paths the kernel cannot be made to take on demand (a
/// failing `copen`, a READ racing its CLOSE).
pub trait Kernel: Send + Sync + 'static {
    /// The per-object handle an OPEN brings.
    type Object: CacheObject;
    /// Waits up to `timeout` for the next request; `Ok(None)` if none came.
    fn next_request(
        &self,
        buf: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<Request<Self::Object>>, DeviceError>;
    /// Answers an OPEN with the object's size, or refuses it with an errno.
    fn copen(&self, msg_id: u32, size: Result<u64, Errno>) -> Result<(), DeviceError>;
}

/// One cache object: READ replies are written into it, then completed.
pub trait CacheObject: Send + Sync + 'static {
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Tells the kernel READ `msg_id` is done (an unwritten range reads as EIO).
    fn complete(&self, msg_id: u32) -> io::Result<()>;
    /// Whether `offset..offset + len` is all in the cache file already (a previous
    /// fetcher wrote it). `false` when it cannot tell: the range is fetched again.
    fn holds(&self, _offset: u64, _len: u64) -> bool {
        false
    }
}

/// Whether `offset..offset + len` of `fd`'s file is all data (no hole in it), by
/// `SEEK_DATA` / `SEEK_HOLE`; `false` on any error (the caller fetches again).
pub(crate) fn range_is_data(fd: std::os::fd::BorrowedFd<'_>, offset: u64, len: u64) -> bool {
    use nix::unistd::{Whence, lseek};
    let (Ok(start), Ok(end)) = (
        i64::try_from(offset),
        i64::try_from(offset.saturating_add(len)),
    ) else {
        return false;
    };
    if len == 0 {
        return true;
    }
    matches!(lseek(fd, start, Whence::SeekData), Ok(at) if at == start)
        && matches!(lseek(fd, start, Whence::SeekHole), Ok(hole) if hole >= end)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    #[test]
    fn only_ranges_written_whole_count_as_held() {
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(4 << 20).expect("set_len");
        file.write_all_at(&vec![1u8; 1 << 20], 1 << 20)
            .expect("write");
        let held = |offset: u64, len: u64| super::range_is_data(file.as_fd(), offset, len);
        assert!(!held(0, 1 << 20), "a hole");
        assert!(held(1 << 20, 1 << 20), "the written MiB");
        assert!(!held(1 << 20, 2 << 20), "written, then a hole");
        assert!(!held(3 << 20, 2 << 20), "past the end");
    }
}
