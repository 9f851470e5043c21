//! The cachefiles "ondemand" backend (kernels 5.19–7.1 built with
//! `CACHEFILES_ONDEMAND`): the message codec and the bound `/dev/cachefiles` device.
//! Failover: the supervisor keeps the device fd, each new fetcher writes `restore`.

pub mod cull;
pub mod device;
pub mod msg;

/// Mounts EROFS over fscache: the metadata image cookie `fsid` at `target`, read-only.
/// Blocks until the fetcher has answered the kernel's OPEN.
pub fn mount(fsid: &str, target: &std::path::Path) -> nix::Result<()> {
    nix::mount::mount(
        Some("none"),
        target,
        Some("erofs"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(format!("fsid={fsid}").as_str()),
    )
}
