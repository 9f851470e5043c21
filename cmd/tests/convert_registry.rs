//! `lazy-erofs convert` with registry references, against a real `docker-registry` on
//! loopback with htpasswd auth: credentials from docker's config.json and from the
//! configuration file, registry → registry, registry → layout, and clear errors.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, ensure};
use base64::prelude::{BASE64_STANDARD, Engine as _};
use lazy_erofs_image::blob::BlobReader;
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::{HostOptions, Registry, RegistryBlob, RegistryOptions};
use lazy_erofs_test_support::{
    DockerRegistry, make_oci_layout, start_docker_registry_with_password,
};

const USER: &str = "tester";
const PASSWORD: &str = "s3cret-Pa55";

struct Setup {
    dir: tempfile::TempDir,
    registry: DockerRegistry,
    /// A docker config dir with no credentials.
    empty_docker_config: std::path::PathBuf,
}

fn setup() -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let registry = start_docker_registry_with_password(dir.path(), USER, PASSWORD)?;
    let empty_docker_config = dir.path().join("no-docker-config");
    fs::create_dir(&empty_docker_config)?;
    Ok(Setup {
        dir,
        registry,
        empty_docker_config,
    })
}

fn authorized_options(host: &str) -> RegistryOptions {
    let mut options = RegistryOptions::insecure(host);
    options
        .hosts
        .insert(host.to_owned(), HostOptions::basic(USER, PASSWORD));
    options
}

fn convert(args: &[&str], docker_config: &Path) -> Result<(Option<i32>, String, String)> {
    let out = Command::new(lazy_erofs_test_support::bin_exe!("lazy-erofs"))
        .arg("convert")
        .args(args)
        .env("DOCKER_CONFIG", docker_config)
        .output()?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        !stdout.contains(PASSWORD) && !stderr.contains(PASSWORD),
        "the password was printed:\n{stdout}\n{stderr}"
    );
    Ok((out.status.code(), stdout, stderr))
}

/// Every layer of the image is lazy and its verified region reads back by range.
fn assert_lazy_image(host: &str, image: &str) -> Result<()> {
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    );
    let registry = Arc::new(Registry::new(&authorized_options(host)));
    let (manifest, _) = runtime.block_on(registry.pull_manifest(image))?;
    ensure!(!manifest.layers().is_empty(), "no layers");
    for layer in manifest.layers() {
        let lazy = LazyLayer::from_descriptor(layer)?.context("layer not lazy")?;
        let reader = BlobReader::open(
            RegistryBlob {
                runtime: runtime.clone(),
                registry: registry.clone(),
                image: image.to_owned(),
                digest: lazy.digest.clone(),
            },
            &lazy.verified_digest,
        )?;
        ensure!(!reader.metadata().is_empty(), "empty metadata");
    }
    Ok(())
}

#[test]
fn registry_to_registry_with_docker_config_credentials() -> Result<()> {
    let s = setup()?;
    let host = s.registry.host.clone();
    let source = s.dir.path().join("source");
    make_oci_layout(&source)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let plain = format!("{host}/plain/app:1");
    runtime.block_on(Registry::new(&authorized_options(&host)).push_layout(&source, &plain))?;

    let docker_config = s.dir.path().join("docker-config");
    fs::create_dir(&docker_config)?;
    let auth = BASE64_STANDARD.encode(format!("{USER}:{PASSWORD}"));
    fs::write(
        docker_config.join("config.json"),
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )?;
    let lazy = format!("{host}/lazy/app:1");

    // Without credentials the registry refuses, and the error says so.
    let (code, _, stderr) = convert(
        &["--insecure", &host, &plain, &lazy],
        &s.empty_docker_config,
    )?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("pulling {plain}")) && stderr.contains("not authorized"),
        "{stderr}"
    );

    let (code, stdout, stderr) = convert(&["--insecure", &host, &plain, &lazy], &docker_config)?;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains(&format!("pushed {lazy}@sha256:")),
        "{stdout}"
    );
    assert_lazy_image(&host, &lazy)?;

    // Registry → layout: lazy layers are copied through, not converted again.
    let out = s.dir.path().join("out");
    let (code, stdout, stderr) = convert(
        &["--insecure", &host, &lazy, out.to_str().context("path")?],
        &docker_config,
    )?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.matches("(already lazy)").count(), 2, "{stdout}");
    Ok(())
}

#[test]
fn config_file_credentials_and_a_world_readable_password_refused() -> Result<()> {
    let s = setup()?;
    let host = s.registry.host.clone();
    let source = s.dir.path().join("source");
    make_oci_layout(&source)?;
    let config = s.dir.path().join("config.toml");
    fs::write(
        &config,
        format!(
            "[registry]\ninsecure_hosts = [\"{host}\"]\n\
             [registry.hosts.\"{host}\"]\nusername = \"{USER}\"\npassword = \"{PASSWORD}\"\n"
        ),
    )?;
    let target = format!("{host}/lazy/fromfile:1");
    let args = [
        "--config",
        config.to_str().context("path")?,
        source.to_str().context("path")?,
        &target,
    ];

    fs::set_permissions(&config, fs::Permissions::from_mode(0o644))?;
    let (code, _, stderr) = convert(&args, &s.empty_docker_config)?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("readable by everyone"), "{stderr}");

    fs::set_permissions(&config, fs::Permissions::from_mode(0o600))?;
    let (code, stdout, stderr) = convert(&args, &s.empty_docker_config)?;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("pushed"), "{stdout}");
    assert_lazy_image(&host, &target)
}

#[test]
fn an_unreachable_registry_fails_within_the_retry_budget() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("source");
    make_oci_layout(&source)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let host = format!("127.0.0.1:{port}");
    let config = dir.path().join("config.toml");
    fs::write(
        &config,
        format!("[registry]\ninsecure_hosts = [\"{host}\"]\nretry = {{ budget = \"2s\" }}\n"),
    )?;
    let started = std::time::Instant::now();
    let (code, _, stderr) = convert(
        &[
            "--config",
            config.to_str().context("path")?,
            source.to_str().context("path")?,
            &format!("{host}/x/y:1"),
        ],
        dir.path(),
    )?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("pushing {host}/x/y:1")) && stderr.contains("onnect"),
        "{stderr}"
    );
    // Conversion itself takes well under a second here; the rest is the retry budget.
    assert!(started.elapsed().as_secs() < 20, "{:?}", started.elapsed());
    Ok(())
}
