//! EROFS metadata writer (own code: no crate writes this layout).
//!
//! The caller describes a filesystem as an [`FsTree`]; [`write_metadata`] lays it out as
//! an EROFS image with 4 KiB blocks: superblock (with checksum), one extra device (the
//! data space, named by its tag), compact or extended inodes as each needs, directories
//! of any size, inline and shared-free xattrs, symlinks, devices, fifos, sockets, hard
//! links. Small files are inline in the metadata; larger ones are chunk-indexed into the
//! data device at block addresses the caller chose. The same tree always gives the same
//! bytes.

mod dir;
mod layout;
mod ondisk;
mod tree;
mod xattr;

pub use layout::{WriteOptions, write_metadata};
pub use tree::{Content, FileData, FsTree, Metadata, NodeId, TreeError};

/// Filesystem block size: fscache mode needs 4 KiB.
pub const BLOCK_SIZE: u64 = 4096;
/// Granularity of chunk indexes into the data device.
pub const CHUNK_SIZE: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error(
        "{path}: xattr name {name:?} has no EROFS prefix (user., trusted., security., system.posix_acl_*)"
    )]
    XattrPrefix { path: String, name: String },
    #[error("{path}: xattr {name:?} is too large ({len} bytes)")]
    XattrTooLarge {
        path: String,
        name: String,
        len: usize,
    },
    #[error("{path}: {what}")]
    Limit { path: String, what: String },
    #[error("the image needs more than 2^32 blocks")]
    TooLarge,
}
