//! The kernel side of lazy-erofs: everything that talks to `/dev/cachefiles` in
//! "ondemand" mode.
//!
//! - [`msg`]: the cachefiles message codec (OPEN / CLOSE / READ), total over any input.
//! - [`device`]: the bound `/dev/cachefiles` fd and its commands (`copen`, `restore`, …).
//! - [`fetcher`]: serves OPEN / READ / CLOSE concurrently from a [`BlobSource`].
//! - [`supervisor`]: holds the device fd, runs fetcher children, fails over with
//!   `restore`; [`child`] is the child's side, [`handover`] the protocol between them.
//! - [`source`]: blob sources (local file, throttled); [`stats`]: counters shared
//!   across fetcher generations; [`fault`]: fault injection for failover tests.
//! - [`reach`]: what the running kernel can do (`lazy-erofs check`).
//!
//! `unsafe` lives only in the private `sys` module: thin syscall and ioctl wrappers.

pub mod child;
pub mod device;
pub mod fault;
pub mod fetcher;
pub mod handover;
pub mod msg;
pub mod reach;
pub mod source;
pub mod stats;
pub mod supervisor;
mod sys;

pub use device::{AnonFd, CacheObject, Device, DeviceError, Kernel, Request};
pub use source::{
    BlobSource, BlobSpec, FileSource, LazyLayerSpec, LocalBlob, LocalSourceFactory, SourceError,
    SourceFactory, Throttle, View,
};
pub use supervisor::{BlobTable, Event, Summary, Supervisor, SupervisorConfig};
pub use sys::AlignedBuf;
