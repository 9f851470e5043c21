//! The kernel side of lazy-erofs: everything that talks to `/dev/cachefiles` in
//! "ondemand" mode.
//!
//! - [`msg`]: the cachefiles message codec (OPEN / CLOSE / READ), total over any input.
//! - [`device`]: the bound `/dev/cachefiles` fd and its commands (`copen`, `restore`, …).
//! - [`reach`]: what the running kernel can do (`lazy-erofs check`).
//!
//! `unsafe` lives only in the private `sys` module: thin syscall and ioctl wrappers.

pub mod device;
pub mod msg;
pub mod reach;
mod sys;

pub use device::{AnonFd, Device, DeviceError, Request};
pub use sys::AlignedBuf;
