//! The kernel side of lazy-erofs: serving lazy layers' bytes to the kernel on demand.
//!
//! Transport-neutral parts:
//! - [`kernel`]: the [`Kernel`] trait a transport implements for the fetcher.
//! - [`fetcher`]: serves OPEN / READ / CLOSE concurrently from a [`BlobSource`], over
//!   any [`Kernel`] (chunk fetching, single-flight, verification, retries).
//! - [`supervisor`]: holds the device fd, runs fetcher children, fails over with
//!   `restore`; [`child`] is the child's side, [`handover`] the protocol between them;
//!   [`BlobTable`]: the blob descriptions the child asks the supervisor for.
//! - [`source`]: blob sources (local file, throttled); [`stats`]: counters shared
//!   across fetcher generations; [`fault`]: fault injection for failover tests.
//! - [`reach`]: what the running kernel can do (`lazy-erofs check`).
//!
//! One module per backend:
//! - [`cachefiles`]: EROFS over fscache, `/dev/cachefiles` in ondemand mode.
//! - [`fanotify`]: file-backed EROFS whose data file is filled on fanotify pre-content
//!   events, brokered by the supervisor.
//!
//! `unsafe` lives only in the private `sys` module: thin syscall and ioctl wrappers.

mod blob_table;
pub mod cachefiles;
pub mod child;
pub mod fanotify;
pub mod fault;
pub mod fdstore;
pub mod fetcher;
pub mod handover;
pub mod kernel;
pub mod reach;
pub mod source;
pub mod stats;
pub mod supervisor;
mod sys;

pub use blob_table::BlobTable;
pub use cachefiles::device::{AnonFd, Device, DeviceError};
pub use kernel::{CacheObject, Kernel, Request};
pub use source::{
    BlobSource, BlobSpec, FileSource, KeptRegionFiles, LazyLayerSpec, LocalBlob,
    LocalSourceFactory, RegistryCredentials, SourceError, SourceFactory, Throttle, View,
    registry_of,
};
pub use supervisor::{Event, Summary, Supervisor, SupervisorConfig};
pub use sys::{AlignedBuf, cached_bytes};
