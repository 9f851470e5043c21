//! Helpers the workspace's tests share. A dev-dependency only: nothing here ships.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

pub mod fault_proxy;
pub mod token;

use serde_json::json;
use sha2::Digest;

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

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        sha2::Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

fn put_blob(layout: &Path, bytes: &[u8]) -> std::io::Result<String> {
    let digest = sha256_digest(bytes);
    fs::write(layout.join("blobs/sha256").join(&digest[7..]), bytes)?;
    Ok(digest)
}

/// An uncompressed layer tar of regular files (mode 0644, root-owned, fixed mtime).
pub fn layer_tar(files: &[(&str, &[u8])]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        builder.append_data(&mut h, name, *data)?;
    }
    builder.into_inner()
}

/// An OCI image layout with a gzip layer and a plain one (linux/amd64, tagged
/// `test:1`); returns the layers' diff ids.
pub fn make_oci_layout(root: &Path) -> anyhow::Result<Vec<String>> {
    fs::create_dir_all(root.join("blobs/sha256"))?;
    fs::write(root.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let tar1 = layer_tar(&[("etc/hostname", b"lazy\n"), ("usr/bin/big", &big)])?;
    let tar2 = layer_tar(&[("etc/motd", b"hello\n")])?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar1)?;
    let gz1 = gz.finish()?;
    let (l1, l2) = (put_blob(root, &gz1)?, put_blob(root, &tar2)?);
    let diff_ids = vec![sha256_digest(&tar1), sha256_digest(&tar2)];
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {"Cmd": ["/bin/sh"]}
    }))?;
    let config_digest = put_blob(root, &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l1, "size": gz1.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l2, "size": tar2.len()}
        ]
    }))?;
    let manifest_digest = put_blob(root, &manifest)?;
    fs::write(
        root.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest.len(),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": "test:1"}
            }]
        }))?,
    )?;
    Ok(diff_ids)
}

/// A `docker-registry` (distribution) process on a free loopback port; killed on drop.
pub struct DockerRegistry {
    child: std::process::Child,
    /// `127.0.0.1:PORT`
    pub host: String,
    /// Its access log (combined log format: one line per request, with status and bytes).
    pub access_log: PathBuf,
}

impl DockerRegistry {
    /// Bytes the registry sent in answer to GETs of blob `digest` so far, and how many
    /// such requests it answered.
    pub fn blob_bytes_sent(&self, digest: &str) -> (u64, usize) {
        let sent = self.blob_responses(digest);
        (sent.iter().sum(), sent.len())
    }

    /// The bytes of each GET of blob `digest` so far, in order.
    pub fn blob_responses(&self, digest: &str) -> Vec<u64> {
        let log = fs::read_to_string(&self.access_log).unwrap_or_default();
        // The path ends at a space, or at a query (containerd asks a mirror with
        // `?ns=<registry>`).
        let needle = format!("/blobs/{digest}");
        let names_blob = |line: &str| {
            line.match_indices(&needle)
                .any(|(at, _)| matches!(line.as_bytes().get(at + needle.len()), Some(b' ' | b'?')))
        };
        log.lines()
            .filter(|line| line.contains("\"GET ") && names_blob(line))
            .filter_map(|line| {
                // ... "GET /v2/... HTTP/1.1" 206 1048576 "" "agent"
                let after = line.split('"').nth(2)?;
                let mut fields = after.split_whitespace();
                let _status = fields.next()?;
                fields.next()?.parse::<u64>().ok()
            })
            .collect()
    }
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts docker-registry with its storage under `dir`; with `htpasswd`, basic auth is on.
pub fn start_docker_registry(
    dir: &Path,
    htpasswd: Option<&Path>,
) -> anyhow::Result<DockerRegistry> {
    let auth = htpasswd.map_or(String::new(), |file| {
        format!(
            "auth:\n  htpasswd:\n    realm: lazy-erofs-test\n    path: {}\n",
            file.display()
        )
    });
    start_docker_registry_with_config(dir, &auth)
}

/// Starts docker-registry with its storage under `dir`, wanting `user`'s `password`
/// (basic auth, an htpasswd file made by `htpasswd -B`) for every request.
pub fn start_docker_registry_with_password(
    dir: &Path,
    user: &str,
    password: &str,
) -> anyhow::Result<DockerRegistry> {
    use anyhow::Context;
    let htpasswd = dir.join("htpasswd");
    let status = Command::new("htpasswd")
        .arg("-Bbc")
        .arg(&htpasswd)
        .args([user, password])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("htpasswd (apache2-utils, installed by packaging/setup.sh)")?;
    anyhow::ensure!(status.success(), "htpasswd failed: {status}");
    start_docker_registry(dir, Some(&htpasswd))
}

/// Starts docker-registry with its storage under `dir` (`<dir>/registry-storage`) and
/// `extra` appended to its configuration (YAML: an `auth:` or `middleware:` section;
/// empty for none).
pub fn start_docker_registry_with_config(
    dir: &Path,
    extra: &str,
) -> anyhow::Result<DockerRegistry> {
    use anyhow::Context;
    let host = free_loopback_host()?;
    let config = dir.join("registry-config.yml");
    fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {host}\n{extra}",
            dir.join("registry-storage").display()
        ),
    )?;
    let access_log = dir.join("registry-access.log");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(fs::File::create(&access_log)?)
        .stderr(fs::File::create(dir.join("registry.log"))?)
        .spawn()
        .context("start docker-registry (packaging/setup.sh installs it)")?;
    let registry = DockerRegistry {
        child,
        host,
        access_log,
    };
    wait_listening(&registry.host, "docker-registry")?;
    Ok(registry)
}

/// Waits (up to 20 s) until something accepts connections on `host`.
fn wait_listening(host: &str, what: &str) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(host).is_err() {
        anyhow::ensure!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{what} did not listen on {host}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

/// A free port on the loopback address, as `127.0.0.1:PORT`.
fn free_loopback_host() -> anyhow::Result<String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(format!("127.0.0.1:{port}"))
}

/// A static file server (busybox `httpd`, which answers range requests) for `root` on a
/// free loopback port, as a registry's blob storage; killed on drop.
pub struct StaticFiles {
    child: std::process::Child,
    /// `127.0.0.1:PORT`
    pub host: String,
}

impl Drop for StaticFiles {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn serve_static_files(root: &Path) -> anyhow::Result<StaticFiles> {
    use anyhow::Context;
    let host = free_loopback_host()?;
    fs::create_dir_all(root)?;
    let child = Command::new("busybox")
        .args(["httpd", "-f", "-p", &host, "-h"])
        .arg(root)
        .spawn()
        .context("start busybox httpd (busybox-static, installed by packaging/setup.sh)")?;
    let files = StaticFiles { child, host };
    wait_listening(&files.host, "busybox httpd")?;
    Ok(files)
}

/// A CA and a certificate it signs for `127.0.0.1` and `localhost`, as PEM files.
pub struct TlsFiles {
    /// The CA's certificate: what a client is told to trust.
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// Makes a [`TlsFiles`] set under `dir` (`ca.pem`, `server.pem`, `server.key`).
pub fn tls_files(dir: &Path) -> anyhow::Result<TlsFiles> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "lazy-erofs test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
    let key = rcgen::KeyPair::generate()?;
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
    let certificate = params.signed_by(&key, &ca)?;
    let files = TlsFiles {
        ca: dir.join("ca.pem"),
        certificate: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    fs::write(&files.ca, ca.pem())?;
    fs::write(&files.certificate, certificate.pem())?;
    fs::write(&files.key, key.serialize_pem())?;
    Ok(files)
}

/// The path of one of the workspace's binaries, e.g. `bin_exe!("lazy-erofs")`. Read at run
/// time first: nextest sets `NEXTEST_BIN_EXE_<name>` to the copy it runs tests from (an
/// unpacked archive in the VM), while the compiled-in path is the shared target dir,
/// which a build beside the run can replace under it.
#[macro_export]
macro_rules! bin_exe {
    ($name:literal) => {
        std::env::var_os(concat!("NEXTEST_BIN_EXE_", $name))
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(env!(concat!("CARGO_BIN_EXE_", $name))))
    };
}

/// The checkout the running test belongs to. Read at run time: cargo and nextest set
/// `CARGO_MANIFEST_DIR` for the test's own crate (nextest remaps it for an archive run
/// in the VM), while the compile-time value can name another checkout whose build the
/// shared target dir reused.
pub fn checkout() -> PathBuf {
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    // Every crate sits one level below the workspace root.
    crate_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(crate_dir)
}

/// The directory holding real Debian layer tars (`base.tar`: debootstrap minbase;
/// `packages.tar`: python3-minimal, sqlite3, curl on top; `python.tar`: the full python3
/// on top of both), built once and cached outside the
/// checkout by packaging/testdata/debian-layers.sh (root and deb.debian.org the first
/// time; a cache hit afterwards, also in the test VM).
pub fn debian_layers() -> anyhow::Result<PathBuf> {
    use anyhow::Context;
    let script = checkout().join("packaging/testdata/debian-layers.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .context("run debian-layers.sh")?;
    anyhow::ensure!(
        out.status.success(),
        "debian-layers.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn add_tar_bytes<W: Write>(
    archive: &mut tar::Builder<W>,
    name: &str,
    bytes: &[u8],
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    archive.append_data(&mut h, name, bytes)
}

fn file_digest(path: &Path) -> std::io::Result<(String, u64)> {
    let mut hash = sha2::Sha256::new();
    let size = std::io::copy(&mut fs::File::open(path)?, &mut hash)?;
    let hex: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((format!("sha256:{hex}"), size))
}

/// Writes an OCI image archive (what `ctr image import` reads) whose layers are the
/// given uncompressed tar files, in order, tagged `ref_name`, running `cmd`.
pub fn write_oci_archive(
    out: &Path,
    layers: &[PathBuf],
    cmd: &[&str],
    ref_name: &str,
) -> anyhow::Result<()> {
    let mut archive = tar::Builder::new(std::io::BufWriter::new(fs::File::create(out)?));
    let mut add_bytes = |name: &str, bytes: &[u8]| add_tar_bytes(&mut archive, name, bytes);
    add_bytes("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        let (digest, size) = file_digest(layer)?;
        descriptors.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": digest, "size": size
        }));
        diff_ids.push(digest);
    }
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {"Cmd": cmd, "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]}
    }))?;
    let config_digest = sha256_digest(&config);
    add_bytes(&format!("blobs/sha256/{}", &config_digest[7..]), &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descriptors,
    }))?;
    let manifest_digest = sha256_digest(&manifest);
    add_bytes(
        &format!("blobs/sha256/{}", &manifest_digest[7..]),
        &manifest,
    )?;
    add_bytes(
        "index.json",
        &serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest.len(),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": ref_name}
            }]
        }))?,
    )?;
    for (layer, digest) in layers.iter().zip(&diff_ids) {
        archive.append_path_with_name(layer, format!("blobs/sha256/{}", &digest[7..]))?;
    }
    archive.into_inner()?.flush()?;
    Ok(())
}
