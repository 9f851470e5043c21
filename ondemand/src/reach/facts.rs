//! Reads the facts [`super::evaluate`] judges from the running system.

use std::fs;
use std::io::Read;
use std::path::Path;

use super::{Facts, KernelConfig, MarkTrial, Trial};
use crate::cachefiles::device::{Device, DeviceError};

/// Gathers facts about the running kernel. A trial bind is attempted when running as
/// root, in a fresh directory under `scratch_parent` (which must be on a disk
/// filesystem, not tmpfs), removed afterwards.
pub fn gather(scratch_parent: &Path) -> Facts {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    Facts {
        config: read_config(&release),
        device_node: Path::new(crate::cachefiles::device::DEVICE_PATH).exists(),
        misc_registered: fs::read_to_string("/proc/misc")
            .map(|misc| {
                misc.lines()
                    .any(|l| l.split_whitespace().nth(1) == Some("cachefiles"))
            })
            .unwrap_or(false),
        filesystems: fs::read_to_string("/proc/filesystems")
            .map(|text| {
                text.lines()
                    .filter_map(|l| l.split_whitespace().last())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
        trial: trial_bind(scratch_parent),
        mark_trial: trial_mark(scratch_parent),
        release,
    }
}

/// Marks a fresh file in a scratch directory for pre-content events: the kernel (6.14+,
/// CONFIG_FANOTIFY_ACCESS_PERMISSIONS) and the filesystem (ext4, xfs, btrfs) must agree.
fn trial_mark(scratch_parent: &Path) -> MarkTrial {
    if !nix::unistd::geteuid().is_root() {
        return MarkTrial::NotRun("not root".to_owned());
    }
    let dir = match tempfile::Builder::new()
        .prefix("lazy-erofs-check.")
        .tempdir_in(scratch_parent)
    {
        Ok(dir) => dir,
        Err(e) => {
            return MarkTrial::NotRun(format!(
                "cannot create a directory in {}: {e}",
                scratch_parent.display()
            ));
        }
    };
    let file = dir.path().join("probe");
    if let Err(e) = fs::write(&file, b"x") {
        return MarkTrial::NotRun(format!("cannot create {}: {e}", file.display()));
    }
    let result = crate::fanotify::Group::new().and_then(|group| group.mark(&file));
    match result {
        Ok(()) => MarkTrial::Marked {
            dir: scratch_parent.display().to_string(),
        },
        Err(e) => MarkTrial::Failed(e.to_string()),
    }
}

fn read_config(release: &str) -> Option<KernelConfig> {
    if let Ok(file) = fs::File::open("/proc/config.gz") {
        let mut text = String::new();
        if flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .is_ok()
        {
            return Some(KernelConfig::parse("/proc/config.gz", &text));
        }
    }
    let boot = format!("/boot/config-{release}");
    fs::read_to_string(&boot)
        .ok()
        .map(|text| KernelConfig::parse(&boot, &text))
}

fn trial_bind(scratch_parent: &Path) -> Trial {
    if !nix::unistd::geteuid().is_root() {
        return Trial::NotRun("not root".to_owned());
    }
    if !Path::new(crate::cachefiles::device::DEVICE_PATH).exists() {
        return Trial::NotRun(format!(
            "{} missing",
            crate::cachefiles::device::DEVICE_PATH
        ));
    }
    let dir = scratch_parent.join(format!("lazy-erofs-check.{}", std::process::id()));
    if let Err(e) = fs::create_dir_all(&dir) {
        return Trial::NotRun(format!("cannot create {}: {e}", dir.display()));
    }
    let trial = bind_and_restore(&dir);
    remove_scratch(&dir);
    trial
}

fn bind_and_restore(dir: &Path) -> Trial {
    let failed = |err: DeviceError| {
        let (command, errno) = match &err {
            DeviceError::Command { command, source } => {
                (command.clone(), source.raw_os_error().unwrap_or(0))
            }
            DeviceError::Open(source) => ("open".to_owned(), source.raw_os_error().unwrap_or(0)),
            _ => (String::new(), 0),
        };
        let message = match &err {
            DeviceError::Command { source, .. } | DeviceError::Open(source) => source.to_string(),
            other => other.to_string(),
        };
        Trial::Failed {
            command,
            errno,
            message,
        }
    };
    let device = match Device::open() {
        Ok(device) => device,
        Err(err) => return failed(err),
    };
    if let Err(err) = device.bind_ondemand(dir, "lazy-erofs-check") {
        return failed(err);
    }
    // No daemon has read anything from this fresh cache, so restore has nothing to
    // re-send: it only shows whether the kernel knows the command.
    let restore = device.restore().map_err(|e| match e {
        DeviceError::Command { source, .. } => source.to_string(),
        other => other.to_string(),
    });
    drop(device); // closing the device unbinds the cache
    Trial::Bound {
        dir: dir.display().to_string(),
        restore,
    }
}

fn remove_scratch(dir: &Path) {
    // The kernel may still be releasing the cache; a leftover directory is harmless.
    if let Err(e) = fs::remove_dir_all(dir) {
        tracing::debug!(dir = %dir.display(), error = %e, "could not remove trial cache directory");
    }
}
