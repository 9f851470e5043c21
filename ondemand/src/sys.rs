//! Thin wrappers over the syscalls and ioctls that need `unsafe`. Nothing else in the
//! workspace may use `unsafe`; each block states why it is sound.
#![allow(unsafe_code)]

use std::alloc::{self, Layout};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Page size the kernel's direct I/O on cachefiles anon fds needs buffers aligned to.
pub const PAGE_SIZE: usize = 4096;

// _IOW(0x98, 1, int): tell the kernel a READ request's range has been written.
nix::ioctl_write_int!(ioc_read_complete, 0x98, 1);

/// `CACHEFILES_IOC_READ_COMPLETE` on an anon fd for the READ with `msg_id`.
pub fn read_complete(anon_fd: BorrowedFd<'_>, msg_id: u32) -> nix::Result<()> {
    let arg = nix::libc::c_ulong::from(msg_id);
    // SAFETY: the ioctl takes an int by value (no pointer), the fd is valid for the borrow.
    unsafe { ioc_read_complete(std::os::fd::AsRawFd::as_raw_fd(&anon_fd), arg) }.map(drop)
}

/// Takes ownership of an fd number the kernel installed in this process (the anon fd of
/// a cachefiles OPEN, a fanotify event's fd, an SCM_RIGHTS fd), so it is closed
/// exactly once.
///
/// Only call this with a number just read from such a message: the kernel installed
/// that fd for us and nothing else owns it.
pub fn own_installed_fd(fd: RawFd) -> Option<OwnedFd> {
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel installed this fd in our table while answering our read() of the
    // device and handed its number to us alone; no other owner exists.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of an fd the service manager passed at start (`LISTEN_FDS`).
///
/// Only call this once per number, with a number from `LISTEN_FDS` of this process
/// (checked against `LISTEN_PID`, and already made close-on-exec, which fails on a
/// closed number): systemd installed it for us and nothing else owns it.
pub fn own_inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    if fd < 3 {
        return None;
    }
    // SAFETY: systemd passed this number to this process at start and our caller takes
    // each number once; no other owner exists.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// nix's fanotify handle over a group fd we own (nix has no safe conversion).
pub fn fanotify_from_fd(fd: OwnedFd) -> nix::sys::fanotify::Fanotify {
    use std::os::fd::IntoRawFd;
    // SAFETY: `into_raw_fd` gives up our ownership; the Fanotify takes it over alone.
    unsafe { nix::sys::fanotify::Fanotify::from_raw_fd(fd.into_raw_fd()) }
}

/// Whether nobody but us has the file open: a write lease (`F_SETLEASE`, `F_WRLCK`) is
/// granted only then, counting opens inside the kernel too (a mount's backing file). The
/// lease is dropped again at once. nix has no `F_SETLEASE`.
pub fn nobody_else_has_open(fd: BorrowedFd<'_>) -> bool {
    use nix::libc;
    // SAFETY: fcntl on an fd we borrow, with integer arguments only.
    let taken = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_WRLCK) } == 0;
    if taken {
        // SAFETY: as above.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    }
    taken
}

/// Makes every heap block of at least `bytes` a mapping of its own, unmapped when freed.
/// glibc otherwise raises that threshold to the largest block freed so far, and the
/// fetcher's multi-MiB fetch buffers then stay in its per-thread arenas once freed
/// (peak RSS 190–260 MiB instead of 61 MiB over one 256 MiB sequential read). Returns
/// whether the allocator took it (false where it is not glibc's).
pub fn unmap_large_blocks(bytes: usize) -> bool {
    #[cfg(target_env = "gnu")]
    {
        let bytes = nix::libc::c_int::try_from(bytes).unwrap_or(nix::libc::c_int::MAX);
        // SAFETY: mallopt only sets an allocator parameter; glibc serialises it with the
        // arenas' own locks.
        unsafe { nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, bytes) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        let _ = bytes;
        false
    }
}

/// A zeroed, page-aligned heap buffer: writes to cachefiles anon fds are direct I/O and
/// fail with EINVAL from unaligned user memory.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8], like a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` bytes rounded up to whole pages (at least one page).
    pub fn new(len: usize) -> Self {
        let size = len.max(1).div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let layout = match Layout::from_size_align(size, PAGE_SIZE) {
            Ok(layout) => layout,
            Err(_) => alloc::handle_alloc_error(Layout::new::<u8>()),
        };
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Self { ptr, layout }
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len())
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to layout.size() initialised (zeroed) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this exact layout, freed once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// An array of `AtomicU64` in a shared memory file (memfd): the supervisor creates it,
/// each fetcher child maps the same file, so counters survive a child's SIGKILL exactly.
pub struct SharedCounters {
    ptr: std::ptr::NonNull<std::sync::atomic::AtomicU64>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is only accessed through atomics.
unsafe impl Send for SharedCounters {}
// SAFETY: as above; &AtomicU64 is Sync.
unsafe impl Sync for SharedCounters {}

impl SharedCounters {
    /// A fresh zeroed memfd of `len` counters, mapped.
    pub fn create(name: &str, len: usize) -> std::io::Result<Self> {
        let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
        let bytes = Self::bytes(len)?;
        nix::unistd::ftruncate(&fd, bytes as i64)?;
        Self::map(fd, len)
    }

    /// Maps a memfd received from the supervisor; it must hold at least `len` counters.
    pub fn map(fd: OwnedFd, len: usize) -> std::io::Result<Self> {
        let bytes = Self::bytes(len)?;
        let size = nix::sys::stat::fstat(&fd)?.st_size;
        if u64::try_from(size).unwrap_or(0) < bytes as u64 {
            return Err(std::io::Error::other(format!(
                "shared counters file has {size} bytes, need {bytes}"
            )));
        }
        let length = std::num::NonZeroUsize::new(bytes)
            .ok_or_else(|| std::io::Error::other("zero-sized counters"))?;
        // SAFETY: a fresh shared mapping of a file we hold, sized above; no existing
        // memory is affected and the kernel picks the address.
        let raw = unsafe {
            nix::sys::mman::mmap(
                None,
                length,
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                &fd,
                0,
            )?
        };
        Ok(Self {
            ptr: raw.cast(),
            len,
            fd,
        })
    }

    fn bytes(len: usize) -> std::io::Result<usize> {
        len.checked_mul(8)
            .filter(|&b| b > 0)
            .ok_or_else(|| std::io::Error::other("bad counter count"))
    }

    pub fn counters(&self) -> &[std::sync::atomic::AtomicU64] {
        // SAFETY: the mapping holds len 8-byte-aligned (page-aligned base) u64 slots, lives
        // as long as self, and is only ever accessed atomically, by us and other processes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for SharedCounters {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in map(); no references outlive self.
        let _ = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.len * 8) };
    }
}

/// Bytes of `fd`'s file (`len` bytes long) in the page cache: what has been read of it
/// since it was first opened, unless evicted. By `mincore(2)` over a read-only shared
/// mapping, which reads nothing (`cachestat(2)` would need no mapping, but kernels are
/// built without it).
pub fn cached_bytes(fd: BorrowedFd<'_>, len: u64) -> std::io::Result<u64> {
    use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
    let Some(size) = usize::try_from(len)
        .ok()
        .and_then(std::num::NonZeroUsize::new)
    else {
        return Ok(0);
    };
    // SAFETY: a fresh read-only shared mapping of a whole file, never dereferenced here:
    // only its address is handed to mincore, then it is unmapped.
    let addr = unsafe {
        mmap(
            None,
            size,
            ProtFlags::PROT_READ,
            MapFlags::MAP_SHARED,
            fd,
            0,
        )
    }
    .map_err(std::io::Error::from)?;
    let pages = size.get().div_ceil(PAGE_SIZE);
    let mut vec = vec![0u8; pages];
    // SAFETY: `addr` is the start of a live mapping of `size` bytes, and `vec` holds one
    // byte per page of it, as mincore writes.
    let rc = unsafe { nix::libc::mincore(addr.as_ptr(), size.get(), vec.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: unmaps exactly the mapping made above, which nothing else refers to.
    let unmapped = unsafe { munmap(addr, size.get()) };
    if rc != 0 {
        return Err(err);
    }
    unmapped.map_err(std::io::Error::from)?;
    let resident = vec.iter().filter(|&&b| b & 1 == 1).count() as u64;
    Ok(resident * PAGE_SIZE as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_page_aligned_and_whole_pages() {
        let buf = AlignedBuf::new(5000);
        assert_eq!(buf.as_ptr() as usize % PAGE_SIZE, 0);
        assert_eq!(buf.len(), 8192);
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(AlignedBuf::new(0).len(), PAGE_SIZE);
    }

    #[test]
    fn shared_counters_are_shared_between_mappings() {
        use std::sync::atomic::Ordering;
        let a = SharedCounters::create("test", 10).expect("memfd");
        let dup = a.fd().try_clone_to_owned().expect("dup");
        let b = SharedCounters::map(dup, 10).expect("map");
        a.counters()[3].fetch_add(7, Ordering::SeqCst);
        assert_eq!(b.counters()[3].load(Ordering::SeqCst), 7);
        let small = a.fd().try_clone_to_owned().expect("dup");
        assert!(
            SharedCounters::map(small, 1000).is_err(),
            "too small a file must be refused"
        );
    }
}
