//! A private registry over TLS: a real docker-registry serving a certificate a test CA
//! signs. With the CA as the host's `ca_file`, an image is pushed, its manifest pulled
//! and its layer read by ranges over HTTP/2 (which the registry offers), the bytes
//! those of the local blob; without it, the certificate is refused with an error that
//! says so; a CA file holding no certificate is refused by name.

mod common;

use std::fs;
use std::sync::Arc;

use anyhow::{Context, Result};
use lazy_erofs_image::blob::BlobReader;
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::{HostOptions, Registry, RegistryBlob, RegistryOptions};

fn options(host: &str, ca_file: Option<std::path::PathBuf>) -> RegistryOptions {
    let mut options = RegistryOptions {
        docker_config: false,
        ..RegistryOptions::default()
    };
    options.hosts.insert(
        host.to_owned(),
        HostOptions {
            ca_file,
            ..HostOptions::default()
        },
    );
    options
}

/// docker-registry serving a certificate a fresh test CA signs, and the CA's files.
fn tls_registry(
    dir: &std::path::Path,
) -> Result<(
    lazy_erofs_test_support::DockerRegistry,
    lazy_erofs_test_support::TlsFiles,
)> {
    let tls = lazy_erofs_test_support::tls_files(dir)?;
    let serve_tls = format!(
        "  tls:\n    certificate: {}\n    key: {}\n",
        tls.certificate.display(),
        tls.key.display()
    );
    let registry = lazy_erofs_test_support::start_docker_registry_with_config(dir, &serve_tls)?;
    Ok((registry, tls))
}

fn runtime() -> Result<Arc<tokio::runtime::Runtime>> {
    Ok(Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    ))
}

#[test]
fn a_private_ca_is_trusted_for_its_host_and_ranges_go_over_http2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (registry, tls) = tls_registry(dir.path())?;
    let image = format!("{}/lazy/tls:1", registry.host);
    let dst = common::converted_layout(dir.path())?;
    let client = Arc::new(Registry::new(&options(&registry.host, Some(tls.ca))));
    let runtime = runtime()?;
    runtime.block_on(client.push_layout(&dst, &image))?;
    let (manifest, _) = runtime.block_on(client.pull_manifest(&image))?;
    let layer = LazyLayer::from_descriptor(&manifest.layers()[0])?.context("not lazy")?;
    let local = fs::read(dst.join("blobs/sha256").join(&layer.digest[7..]))?;
    let local = BlobReader::open(&local[..], &layer.verified_digest)?;
    let remote = BlobReader::open(
        RegistryBlob {
            runtime,
            registry: client,
            image,
            digest: layer.digest.clone(),
        },
        &layer.verified_digest,
    )?;
    let size = remote.header().data_space_size;
    assert_eq!(remote.read_data(0, size)?, local.read_data(0, size)?);

    let log = fs::read_to_string(&registry.access_log)?;
    let blob_gets: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"GET ") && l.contains(&format!("/blobs/{}", layer.digest)))
        .collect();
    assert!(!blob_gets.is_empty(), "no range request logged:\n{log}");
    for line in &blob_gets {
        assert!(line.contains(" HTTP/2.0\""), "not over HTTP/2: {line}");
    }
    Ok(())
}

#[test]
fn without_the_ca_the_certificate_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (registry, _tls) = tls_registry(dir.path())?;
    let client = Registry::new(&options(&registry.host, None));
    let err = runtime()?
        .block_on(client.pull_manifest(&format!("{}/lazy/tls:1", registry.host)))
        .err()
        .context("an unknown CA was trusted")?;
    assert!(err.to_string().contains("certificate"), "{err}");
    Ok(())
}

#[test]
fn a_ca_file_without_certificates_is_refused_by_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("ca.pem");
    fs::write(&file, "not a certificate\n")?;
    let err = lazy_erofs_image::registry::tls::ca_certificates("r.test", &file)
        .err()
        .context("accepted")?;
    let text = err.to_string();
    assert!(text.contains("r.test") && text.contains("ca.pem"), "{text}");
    Ok(())
}
