//! Helpers the workspace's tests share. A dev-dependency only: nothing here ships.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Deterministic pseudo-random bytes (xorshift64), so a failure reproduces exactly.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Runs erofs-utils' `mkfs.erofs IMAGE SRC`; the error carries its stderr.
pub fn mkfs_erofs(image: &Path, src: &Path) -> Result<(), String> {
    let out = Command::new("mkfs.erofs")
        .arg(image)
        .arg(src)
        .output()
        .map_err(|e| format!("run mkfs.erofs: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mkfs.erofs: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Unmounts on drop, so a failing test does not leave mounts behind.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let _ = nix::mount::umount(&self.0);
    }
}

/// Mounts an EROFS image file-backed (Linux ≥ 6.12) with `data` as its extra device.
pub fn mount_erofs_file(image: &Path, data: &Path, mnt: &Path) -> nix::Result<MountGuard> {
    let options = format!("device={}", data.display());
    nix::mount::mount(
        Some(image),
        mnt,
        Some("erofs"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(options.as_str()),
    )?;
    Ok(MountGuard(mnt.to_path_buf()))
}
