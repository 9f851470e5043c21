//! Helpers for the VM tests that drive `lazy-erofs serve` against the real kernel.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use containerd_client::services::v1::snapshots::PrepareSnapshotRequest;
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::{Registry, RegistryOptions, repository_of};
use lazy_erofs_snapshotter::lazy::remote;

/// A fresh directory on the VM's ext4 scratch disk (the cache cannot be on tmpfs).
pub fn scratch() -> Result<tempfile::TempDir> {
    let scratch = std::env::var_os("LAZY_EROFS_SCRATCH")
        .context("LAZY_EROFS_SCRATCH unset: run in the test VM (packaging/testvm/run.sh)")?;
    ensure!(
        Path::new("/dev/cachefiles").exists(),
        "/dev/cachefiles missing: kernel lacks ondemand mode"
    );
    Ok(tempfile::tempdir_in(scratch)?)
}

#[allow(unused_imports)] // used by some of the test binaries that include this module
pub use lazy_erofs_test_support::pseudo_random;

/// Runs `command` to completion; its stdout, or an error with its status and stderr.
pub fn run(command: &mut Command) -> Result<String> {
    let out = command.output().with_context(|| format!("{command:?}"))?;
    ensure!(
        out.status.success(),
        "{command:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An OCI image layout at `work/src` of the layer `tars` (bottom first), named `image`.
pub fn oci_layout(work: &Path, tars: &[PathBuf], cmd: &[&str], image: &str) -> Result<PathBuf> {
    let archive = work.join("image.tar");
    lazy_erofs_test_support::write_oci_archive(&archive, tars, cmd, image)?;
    let src = work.join("src");
    fs::create_dir_all(&src)?;
    run(Command::new("tar")
        .arg("-C")
        .arg(&src)
        .arg("-xf")
        .arg(&archive))?;
    fs::remove_file(&archive)?;
    Ok(src)
}

/// A layer tar at `tar` of `entry` under `dir`, owners by number.
pub fn tar_of(dir: &Path, entry: &str, tar: &Path) -> Result<()> {
    run(Command::new("tar")
        .args(["--numeric-owner", "-C"])
        .arg(dir)
        .arg("-cf")
        .arg(tar)
        .arg(entry))?;
    Ok(())
}

/// Converts the OCI layout `src` into a lazy one at `dst` (linux/amd64, defaults).
/// Converts layout `src` into layout `dst` for `image` (the reference it is pushed as:
/// the config binds the lazy layers to its repository).
pub fn convert(src: &Path, dst: &Path, image: &str) -> Result<()> {
    convert_chunked(src, dst, image, lazy_erofs_image::blob::DEFAULT_CHUNK_SIZE)
}

/// [`convert`] with data chunks of `chunk_size` bytes.
pub fn convert_chunked(src: &Path, dst: &Path, image: &str, chunk_size: u32) -> Result<()> {
    convert_with(
        src,
        dst,
        image,
        lazy_erofs_image::convert::ConvertOptions {
            chunk_size,
            ..lazy_erofs_image::convert::ConvertOptions::default()
        },
    )
}

/// Converts for `image`'s repository with `options`.
pub fn convert_with(
    src: &Path,
    dst: &Path,
    image: &str,
    options: lazy_erofs_image::convert::ConvertOptions,
) -> Result<()> {
    let options = lazy_erofs_image::convert::ConvertOptions {
        repository: Some(repository_of(image)?),
        ..options
    };
    lazy_erofs_image::convert::convert_layout(src, dst, "linux/amd64", &options, &mut |_, _, r| r)?;
    Ok(())
}

pub fn mkfs_erofs(image: &Path, src: &Path) -> Result<()> {
    lazy_erofs_test_support::mkfs_erofs(image, src).map_err(anyhow::Error::msg)
}

pub fn mount_fsid(fsid: &str, mnt: &Path) -> Result<std::process::Output> {
    fs::create_dir_all(mnt)?;
    Ok(Command::new("timeout")
        .args(["60", "mount", "-t", "erofs", "none", "-o"])
        .arg(format!("fsid={fsid}"))
        .arg(mnt)
        .output()?)
}

/// Mounts and fails with mount's own message if it did not work.
pub fn mount_ok(fsid: &str, mnt: &Path) -> Result<()> {
    let out = mount_fsid(fsid, mnt)?;
    ensure!(
        out.status.success(),
        "mount fsid={fsid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub fn umount(mnt: &Path) -> Result<()> {
    let out = Command::new("umount").arg(mnt).output()?;
    ensure!(
        out.status.success(),
        "umount {}: {}",
        mnt.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub fn process_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

pub fn wait_until(what: &str, timeout: Duration, cond: impl Fn() -> bool) -> Result<()> {
    let start = Instant::now();
    while !cond() {
        ensure!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub fn drop_caches() -> Result<()> {
    Ok(fs::write("/proc/sys/vm/drop_caches", "3")?)
}

/// Kernel log lines so far; compare before and after a test.
pub fn dmesg_lines() -> Result<Vec<String>> {
    let out = Command::new("dmesg").output().context("dmesg")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// New kernel log lines that signal trouble: hung tasks, cachefiles or erofs errors.
pub fn kernel_trouble_since(before: usize) -> Result<Vec<String>> {
    let lines = dmesg_lines()?;
    Ok(lines
        .into_iter()
        .skip(before)
        .filter(|l| {
            let l = l.to_lowercase();
            l.contains("hung_task")
                || l.contains("blocked for more than")
                || (l.contains("cachefiles") && (l.contains("error") || l.contains("fail")))
                || (l.contains("erofs") && l.contains("error"))
        })
        .collect())
}

/// A running `lazy-erofs serve`.
pub struct Serve {
    child: Child,
    pub run_dir: PathBuf,
    stdout: mpsc::Receiver<String>,
    stderr_log: PathBuf,
    /// What serve printed before `ready` (e.g. the layers of `--image`).
    pub preamble: Vec<String>,
}

pub struct ServeOptions<'a> {
    pub blobs: Vec<(&'a str, &'a Path)>,
    pub throttle: Option<&'a str>,
    pub no_restore: bool,
    pub fault: Option<&'a str>,
    /// More arguments for `serve` (e.g. `--image REF --insecure HOST`).
    pub extra_args: Vec<String>,
    /// `RUST_LOG` of serve and its fetcher (default `info`).
    pub log: Option<&'a str>,
}

impl<'a> ServeOptions<'a> {
    /// One blob, no throttle, restore on, no fault: override fields as needed.
    pub fn blob(name: &'a str, path: &'a Path) -> Self {
        Self {
            blobs: vec![(name, path)],
            throttle: None,
            no_restore: false,
            fault: None,
            extra_args: Vec::new(),
            log: None,
        }
    }
}

impl Serve {
    pub fn start(work: &Path, options: ServeOptions<'_>) -> Result<Self> {
        let cache = work.join("cache");
        let run_dir = work.join("run");
        // Not created here: serve creates a missing cache directory itself.
        let stderr_log = work.join("serve.log");
        let mut cmd = Command::new(lazy_erofs_test_support::bin_exe!("lazy-erofs"));
        cmd.arg("serve")
            .arg("--cache-dir")
            .arg(&cache)
            .arg("--run-dir")
            .arg(&run_dir);
        cmd.args(["--status-interval", "1"]);
        for (name, path) in &options.blobs {
            cmd.arg("--blob").arg(format!("{name}={}", path.display()));
        }
        if let Some(throttle) = options.throttle {
            cmd.args(["--throttle", throttle]);
        }
        if options.no_restore {
            cmd.arg("--no-restore");
        }
        cmd.args(&options.extra_args);
        match options.fault {
            Some(fault) => cmd.env("LAZY_EROFS_FAULT", fault),
            None => cmd.env_remove("LAZY_EROFS_FAULT"),
        };
        cmd.env("RUST_LOG", options.log.unwrap_or("info"));
        cmd.stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr_log)?);
        let mut child = cmd.spawn().context("spawn lazy-erofs serve")?;
        let out = child.stdout.take().context("serve stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut serve = Self {
            child,
            run_dir,
            stdout: rx,
            stderr_log,
            preamble: Vec::new(),
        };
        loop {
            match serve.stdout.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line.starts_with("ready: ") => return Ok(serve),
                Ok(line) => serve.preamble.push(line),
                other => bail!(
                    "serve did not become ready ({other:?}); log:\n{}",
                    serve.log()
                ),
            }
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// The serving fetcher's pid (the pid file is written once it serves).
    pub fn fetcher_pid(&self) -> Result<i32> {
        let text = fs::read_to_string(self.run_dir.join("fetcher.pid"))?;
        Ok(text.trim().parse()?)
    }

    /// SIGKILLs the serving fetcher and waits until a replacement serves.
    pub fn kill_fetcher(&self) -> Result<()> {
        let pid = self.fetcher_pid()?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        let start = Instant::now();
        while self.fetcher_pid().ok() == Some(pid) || self.fetcher_pid().is_err() {
            ensure!(
                start.elapsed() < Duration::from_secs(30),
                "no new fetcher after killing {pid}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILLs the supervisor itself (not its fetcher) and reaps it.
    pub fn kill_supervisor(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM; returns the final stats JSON.
    pub fn stop(mut self) -> Result<serde_json::Value> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let status = self.child.wait()?;
        ensure!(
            status.success(),
            "serve exited with {status}; log:\n{}",
            self.log()
        );
        let stats = self
            .stdout
            .iter()
            .find_map(|line| line.strip_prefix("stats ").map(str::to_owned))
            .context("no stats line from serve")?;
        Ok(serde_json::from_str(&stats)?)
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// JSON blob `digest` of OCI layout `dir`.
fn layout_json(dir: &Path, digest: &str) -> Result<serde_json::Value> {
    let hex = digest.strip_prefix("sha256:").context("digest")?;
    Ok(serde_json::from_slice(&fs::read(
        dir.join("blobs/sha256").join(hex),
    )?)?)
}

/// The manifest and config of the only image in OCI layout `dir`, as JSON.
pub fn manifest_and_config(dir: &Path) -> Result<(serde_json::Value, serde_json::Value)> {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("index.json"))?)?;
    let manifest = layout_json(
        dir,
        index["manifests"][0]["digest"].as_str().context("index")?,
    )?;
    let config = layout_json(
        dir,
        manifest["config"]["digest"].as_str().context("config")?,
    )?;
    Ok((manifest, config))
}

/// The config's `rootfs.diff_ids`.
pub fn diff_ids(config: &serde_json::Value) -> Result<Vec<String>> {
    serde_json::from_value(config["rootfs"]["diff_ids"].clone()).context("diff_ids")
}

/// What a hostile publisher can do to its own image: `edit` the manifest and config of
/// the only image in layout `dir`, which is then written back with new digests.
pub fn edit_image(
    dir: &Path,
    edit: impl FnOnce(&mut serde_json::Value, &mut serde_json::Value),
) -> Result<()> {
    let put = |bytes: &[u8]| -> Result<(String, usize)> {
        let digest = lazy_erofs_test_support::sha256_digest(bytes);
        fs::write(dir.join("blobs/sha256").join(&digest[7..]), bytes)?;
        Ok((digest, bytes.len()))
    };
    let (mut manifest, mut config) = manifest_and_config(dir)?;
    edit(&mut manifest, &mut config);
    let (digest, size) = put(&serde_json::to_vec(&config)?)?;
    manifest["config"]["digest"] = digest.into();
    manifest["config"]["size"] = size.into();
    let (digest, size) = put(&serde_json::to_vec(&manifest)?)?;
    let mut index: serde_json::Value = serde_json::from_slice(&fs::read(dir.join("index.json"))?)?;
    index["manifests"][0]["digest"] = digest.into();
    index["manifests"][0]["size"] = size.into();
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

/// The diff ids the lazy layers of `manifest` get in an image served from `repository`.
pub fn bindings(
    manifest: &oci_spec::image::ImageManifest,
    repository: &str,
) -> Result<Vec<String>> {
    manifest
        .layers()
        .iter()
        .map(|d| {
            Ok(LazyLayer::from_descriptor(d)?
                .context("not lazy")?
                .binding(repository))
        })
        .collect()
}

/// Mounts what a snapshotter's Mounts reply says at `target` (unmounted on drop).
pub fn mount_snapshot(
    mount: &containerd_client::types::Mount,
    target: &Path,
) -> Result<lazy_erofs_test_support::MountGuard> {
    fs::create_dir_all(target)?;
    nix::mount::mount(
        Some(mount.source.as_str()),
        target,
        Some(mount.r#type.as_str()),
        nix::mount::MsFlags::empty(),
        Some(mount.options.join(",").as_str()),
    )
    .with_context(|| format!("mounting {mount:?}"))?;
    Ok(lazy_erofs_test_support::MountGuard(target.to_path_buf()))
}

/// A one-layer image of a 2 MiB `/data/x` converted for `image` and pushed to
/// `push_host` (the same repository); the remote-snapshot labels of its layer.
pub async fn pushed(work: &Path, image: &str, push_host: &str) -> Result<HashMap<String, String>> {
    pushed_with(
        work,
        image,
        push_host,
        &RegistryOptions::insecure(push_host),
    )
    .await
}

/// The bytes of [`pushed`]'s `/data/x` for `image`.
pub fn pushed_file(image: &str) -> Vec<u8> {
    let name = image.replace(['/', ':'], "_");
    lazy_erofs_test_support::pseudo_random(2 << 20, name.len() as u64 * 2)
}

/// [`pushed`] with `options` (credentials) for the registry.
pub async fn pushed_with(
    work: &Path,
    image: &str,
    push_host: &str,
    options: &RegistryOptions,
) -> Result<HashMap<String, String>> {
    let name = image.replace(['/', ':'], "_");
    let dir = work.join(&name);
    std::fs::create_dir_all(&dir)?;
    let tar = dir.join("layer.tar");
    let bytes = pushed_file(image);
    std::fs::write(
        &tar,
        lazy_erofs_test_support::layer_tar(&[("data/x", &bytes)])?,
    )?;
    let src = oci_layout(&dir, &[tar], &["sh"], image)?;
    let dst = dir.join("dst");
    convert(&src, &dst, image)?;
    let path = image.split_once('/').context("image")?.1;
    let client = Registry::new(options);
    client
        .push_layout(&dst, &format!("{push_host}/{path}"))
        .await?;
    let (manifest, manifest_digest) = client.pull_manifest(&format!("{push_host}/{path}")).await?;
    let layer = LazyLayer::from_descriptor(manifest.layers().first().context("no layer")?)?
        .context("lazy")?;
    Ok([
        (remote::SNAPSHOT_REF, layer.binding(&repository_of(image)?)),
        (remote::LAYER_DIGEST, layer.digest.clone()),
        (remote::IMAGE_REF, image.to_owned()),
        (remote::MANIFEST_DIGEST, manifest_digest),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect())
}

/// The Prepare containerd sends for a remote layer: `extract-<chain id>`, no parent.
pub fn lazy_prepare(labels: HashMap<String, String>) -> PrepareSnapshotRequest {
    PrepareSnapshotRequest {
        snapshotter: "lazy-erofs".into(),
        key: format!("extract-{}", labels[remote::SNAPSHOT_REF]),
        parent: String::new(),
        labels,
    }
}

/// Two registries on loopback, the first behind the fault proxy, each holding a
/// one-layer lazy image ([`pushed`]): `slow/app:1` named by the proxy's address and
/// `fast/app:1`.
pub struct TwoRegistries {
    pub slow_registry: lazy_erofs_test_support::DockerRegistry,
    pub fast: lazy_erofs_test_support::DockerRegistry,
    pub proxy: lazy_erofs_test_support::fault_proxy::FaultProxy,
    pub slow_labels: HashMap<String, String>,
    pub fast_labels: HashMap<String, String>,
}

impl TwoRegistries {
    pub async fn start(work: &Path) -> Result<Self> {
        let registry = |name: &str| -> Result<lazy_erofs_test_support::DockerRegistry> {
            let dir = work.join(name);
            fs::create_dir_all(&dir)?;
            lazy_erofs_test_support::start_docker_registry(&dir, None)
        };
        let (slow_registry, fast) = (registry("slow")?, registry("fast")?);
        let proxy =
            lazy_erofs_test_support::fault_proxy::FaultProxy::start(slow_registry.host.clone())?;
        let slow_image = format!("{}/slow/app:1", proxy.addr);
        let fast_image = format!("{}/fast/app:1", fast.host);
        let slow_labels = pushed(work, &slow_image, &slow_registry.host).await?;
        let fast_labels = pushed(work, &fast_image, &fast.host).await?;
        Ok(Self {
            slow_registry,
            fast,
            proxy,
            slow_labels,
            fast_labels,
        })
    }

    /// The daemon's configuration for both registries with retry budget `budget`.
    pub fn config(&self, budget: Duration) -> String {
        format!(
            "[registry]\ninsecure_hosts = [\"{}\", \"{}\"]\nretry = {{ budget = \"{}s\" }}\n",
            self.proxy.addr,
            self.fast.host,
            budget.as_secs()
        )
    }
}
