//! A real containerd (Debian's 1.7.24) for tests in the VM, with lazy-erofs as a
//! `[proxy_plugins]` snapshotter, and `ctr` against it.

// Shared by several test binaries; each uses a part.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub const NAMESPACE: &str = "lazytest";

pub struct Containerd {
    /// The process we started, or the transient systemd unit running it.
    runs: Runs,
    pub address: PathBuf,
    log: PathBuf,
}

enum Runs {
    Child(Child),
    Unit(String),
}

impl Containerd {
    /// Starts containerd with its state under `dir` and lazy-erofs at `snapshotter_socket`.
    pub fn start(dir: &Path, snapshotter_socket: &Path) -> Result<Self> {
        Self::start_with(dir, snapshotter_socket, None)
    }

    /// [`Containerd::start`] with its CRI plugin on, configured by `cri` (the plugin's
    /// TOML tables), as a kubelet's node runs it.
    pub fn start_cri(dir: &Path, snapshotter_socket: &Path, cri: &str) -> Result<Self> {
        Self::start_with(dir, snapshotter_socket, Some(cri))
    }

    fn start_with(dir: &Path, snapshotter_socket: &Path, cri: Option<&str>) -> Result<Self> {
        let (config, address, log) = Self::configure(dir, snapshotter_socket, cri)?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting containerd (packaging/setup.sh installs containerd/trixie)")?;
        Self {
            runs: Runs::Child(child),
            address,
            log,
        }
        .wait_serving()
    }

    /// Starts containerd as a transient systemd service (`systemd-run`, `Type=notify`
    /// like Debian's containerd.service), for tests in the VM booted with systemd.
    pub fn start_unit(dir: &Path, snapshotter_socket: &Path) -> Result<Self> {
        let (config, address, log) = Self::configure(dir, snapshotter_socket, None)?;
        let unit = "lazytest-containerd.service".to_owned();
        let out = Command::new("systemd-run")
            .arg(format!("--unit={unit}"))
            .args([
                "-p",
                "Type=notify",
                "-p",
                "KillMode=mixed",
                "-p",
                "Delegate=yes",
            ])
            .arg("-p")
            .arg(format!("StandardError=append:{}", log.display()))
            .arg("containerd")
            .arg("--config")
            .arg(&config)
            .output()
            .context("running systemd-run")?;
        if !out.status.success() {
            bail!(
                "systemd-run containerd: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Self {
            runs: Runs::Unit(unit),
            address,
            log,
        }
        .wait_serving()
    }

    /// Writes the configuration (CRI off unless `cri` configures it); returns it, the
    /// socket address and the log path.
    fn configure(
        dir: &Path,
        snapshotter_socket: &Path,
        cri: Option<&str>,
    ) -> Result<(PathBuf, PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir)?;
        let address = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [{disabled}]
[grpc]
  address = "{address}"
[proxy_plugins]
  [proxy_plugins.lazy-erofs]
    type = "snapshot"
    address = "{socket}"
{cri}"#,
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                address = address.display(),
                socket = snapshotter_socket.display(),
                disabled = if cri.is_some() {
                    ""
                } else {
                    "\"io.containerd.grpc.v1.cri\""
                },
                cri = cri.unwrap_or_default(),
            ),
        )?;
        Ok((config, address, dir.join("containerd.log")))
    }

    fn wait_serving(mut self) -> Result<Self> {
        let started = Instant::now();
        loop {
            if self.ctr(&["version"]).is_ok() {
                return Ok(self);
            }
            if let Runs::Child(child) = &mut self.runs
                && let Some(status) = child.try_wait()?
            {
                bail!("containerd exited with {status}: {}", self.log());
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("containerd did not serve within 60 s: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ctr` in the test namespace with `args`, to spawn.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        self.ctr_command_in(NAMESPACE, args)
    }

    /// `ctr` in `namespace` with `args`, to spawn.
    pub fn ctr_command_in(&self, namespace: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(&self.address)
            .args(["--namespace", namespace])
            .args(args);
        command
    }

    /// `lazy-erofs pull image` into this containerd (its registry taken as insecure);
    /// the command's stdout.
    pub fn lazy_pull(&self, image: &str) -> Result<String> {
        let host = image.split('/').next().unwrap_or_default();
        let out = Command::new(lazy_erofs_test_support::bin_exe!("lazy-erofs"))
            .arg("pull")
            .arg("--address")
            .arg(&self.address)
            .args(["--namespace", NAMESPACE, "--insecure", host, image])
            .output()
            .context("running lazy-erofs pull")?;
        if !out.status.success() {
            bail!(
                "lazy-erofs pull {image}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ctr` in the test namespace; its stdout, or an error with its stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        self.ctr_in(NAMESPACE, args)
    }

    /// Runs `ctr` in `namespace`; its stdout, or an error with its stderr.
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Result<String> {
        let out = self
            .ctr_command_in(namespace, args)
            .output()
            .context("running ctr")?;
        if !out.status.success() {
            bail!(
                "ctr {}: {}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Containerd {
    /// Runs containerd's garbage collector now and waits for it, backend snapshot
    /// cleanup included: a lease removed with `--sync` schedules a collection and waits.
    /// Its scheduler can otherwise drop a removal that lands while a collection is
    /// finishing (the event is older than that collection's end), leaving the backend
    /// snapshot until the next removal.
    pub fn collect_garbage(&self) -> Result<()> {
        self.ctr(&["leases", "create", "--id", "gc-now"])?;
        self.ctr(&["leases", "rm", "--sync", "gc-now"])?;
        Ok(())
    }

    /// `ctr snapshots ls` for lazy-erofs as (key, kind) pairs.
    pub fn snapshot_kinds(&self) -> Result<std::collections::BTreeSet<(String, String)>> {
        let listing = self.ctr(&["snapshots", "--snapshotter", "lazy-erofs", "ls"])?;
        Ok(listing
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                Some((fields.first()?.to_string(), fields.last()?.to_lowercase()))
            })
            .collect())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        match &mut self.runs {
            Runs::Child(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Runs::Unit(unit) => {
                let _ = Command::new("systemctl").args(["stop", unit]).status();
            }
        }
    }
}
