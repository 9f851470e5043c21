//! The packaged `lazy-erofs-snapshotter.service` installed into the test VM's systemd
//! (booted with `packaging/testvm/run.sh --init systemd`), with a drop-in pointing it at
//! this build's binary and a scratch root, driven with `systemctl`.

// Shared by several test binaries; each uses a part.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

pub const UNIT: &str = "lazy-erofs-snapshotter.service";

/// Fails unless systemd is PID 1: these tests need the real service manager.
pub fn require_systemd() -> Result<()> {
    let comm = std::fs::read_to_string("/proc/1/comm")?;
    ensure!(
        comm.trim() == "systemd",
        "PID 1 is {comm:?}, not systemd: run this test under `packaging/testvm/run.sh \
         --init systemd` (the vm-systemd nextest profile)"
    );
    Ok(())
}

pub fn systemctl(args: &[&str]) -> Result<String> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .context("running systemctl")?;
    if !out.status.success() {
        bail!(
            "systemctl {}: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The snapshotter as a systemd service.
pub struct Service {
    pub root: PathBuf,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Service {
    /// Installs the packaged unit with a drop-in for `root` and `config` (TOML), starts
    /// it (`Type=notify`: returns once it serves).
    pub fn install_and_start(root: &Path, config: &str) -> Result<Self> {
        let packaged = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/systemd/lazy-erofs-snapshotter.service"
        );
        std::fs::copy(packaged, Path::new("/etc/systemd/system").join(UNIT))?;
        let socket = root.join("run/snapshotter.sock");
        let log = root.with_extension("log");
        let config_file = root.with_extension("toml");
        std::fs::write(&config_file, config)?;
        let dropin = Path::new("/etc/systemd/system").join(format!("{UNIT}.d"));
        std::fs::create_dir_all(&dropin)?;
        std::fs::write(
            dropin.join("test.conf"),
            format!(
                "[Service]\nExecStart=\nExecStart={bin} --config {config} --root {root} --address {socket}\n\
                 Environment=RUST_LOG=info\nStandardError=append:{log}\n",
                bin = lazy_erofs_test_support::bin_exe!("lazy-erofs-snapshotter").display(),
                config = config_file.display(),
                root = root.display(),
                socket = socket.display(),
                log = log.display(),
            ),
        )?;
        systemctl(&["daemon-reload"])?;
        let this = Self {
            root: root.to_path_buf(),
            socket,
            log,
        };
        systemctl(&["start", UNIT]).with_context(|| this.log())?;
        Ok(this)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's pid as systemd knows it (0 when none runs).
    pub fn main_pid(&self) -> Result<u32> {
        let out = systemctl(&["show", "-p", "MainPID", "--value", UNIT])?;
        Ok(out.trim().parse()?)
    }

    /// Waits until a daemon other than `old` runs and has said READY=1.
    pub fn wait_for_successor(&self, old: u32, limit: Duration) -> Result<u32> {
        let started = Instant::now();
        loop {
            let pid = self.main_pid()?;
            let state = systemctl(&["show", "-p", "ActiveState,SubState", "--value", UNIT])?;
            if pid != 0 && pid != old && state.split_whitespace().eq(["active", "running"]) {
                return Ok(pid);
            }
            ensure!(
                started.elapsed() < limit,
                "no new daemon within {limit:?} (pid {pid}, {state:?})\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `systemctl restart`: SIGTERM, wait for the exit, start again (returns once the new
    /// process says READY=1).
    pub fn restart(&self) -> Result<()> {
        systemctl(&["restart", UNIT])
            .map(drop)
            .with_context(|| self.log())
    }

    /// SIGKILL of the main process only; systemd restarts it (`Restart=always`).
    pub fn kill_main(&self) -> Result<()> {
        systemctl(&["kill", "--kill-who=main", "-s", "SIGKILL", UNIT]).map(drop)
    }

    pub fn stop(&self) -> Result<()> {
        systemctl(&["stop", UNIT])
            .map(drop)
            .with_context(|| self.log())
    }
}

/// The erofs mounts under `dir`, from the mount table (one line each; a mount twice on
/// one path shows twice).
pub fn erofs_mounts_under(dir: &Path) -> Result<Vec<String>> {
    let needle = format!("{}/", dir.display());
    Ok(std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .filter(|line| line.contains(" - erofs "))
        .filter_map(|line| line.split(' ').nth(4))
        .filter(|path| path.starts_with(&needle))
        .map(str::to_owned)
        .collect())
}
