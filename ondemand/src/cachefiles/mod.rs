//! The cachefiles "ondemand" backend (kernels 5.19–7.1 built with
//! `CACHEFILES_ONDEMAND`): the message codec and the bound `/dev/cachefiles` device.
//! Failover: the supervisor keeps the device fd, each new fetcher writes `restore`.

pub mod device;
pub mod msg;
