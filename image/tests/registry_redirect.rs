//! Range reads from a registry that redirects blob reads to its storage, as hosted
//! registries do (S3, a CDN): a real docker-registry with its `redirect` storage
//! middleware, its storage served by busybox `httpd` behind the fault-injecting proxy.
//! The registry is asked once per blob; later ranges go to the storage URL it gave; a
//! storage URL that fails or stalls is forgotten and the registry asked again; every
//! byte read matches the local blob.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lazy_erofs_image::blob::BlobReader;
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::{Registry, RegistryBlob, RegistryOptions, RetryPolicy};
use lazy_erofs_test_support::fault_proxy::{Fault, FaultProxy};
use lazy_erofs_test_support::{DockerRegistry, StaticFiles};

struct Setup {
    registry: DockerRegistry,
    /// In front of the storage: the registry redirects to it.
    proxy: FaultProxy,
    _storage: StaticFiles,
    layer: LazyLayer,
    local: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn setup() -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let storage =
        lazy_erofs_test_support::serve_static_files(&dir.path().join("registry-storage"))?;
    let proxy = FaultProxy::start(storage.host.clone())?;
    let redirect = format!(
        "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: http://{}\n",
        proxy.addr
    );
    let registry =
        lazy_erofs_test_support::start_docker_registry_with_config(dir.path(), &redirect)?;
    let image = format!("{}/lazy/redirect:1", registry.host);
    let dst = common::converted_layout(dir.path())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = Registry::new(&RegistryOptions::insecure(&registry.host));
    runtime.block_on(client.push_layout(&dst, &image))?;
    let (manifest, _) = runtime.block_on(client.pull_manifest(&image))?;
    // The first layer holds a 3 MB file: several chunks.
    let layer = LazyLayer::from_descriptor(&manifest.layers()[0])?.context("not lazy")?;
    let local = fs::read(dst.join("blobs/sha256").join(&layer.digest[7..]))?;
    Ok(Setup {
        registry,
        proxy,
        _storage: storage,
        layer,
        local,
        _dir: dir,
    })
}

fn remote(s: &Setup) -> Result<RegistryBlob> {
    remote_with(s, RetryPolicy::default())
}

fn remote_with(s: &Setup, retry: RetryPolicy) -> Result<RegistryBlob> {
    let options = RegistryOptions {
        retry,
        ..RegistryOptions::insecure(&s.registry.host)
    };
    let image = format!("{}/lazy/redirect:1", s.registry.host);
    common::registry_blob(&options, image, &s.layer.digest)
}

/// The status of each GET of the layer's blob the registry answered.
fn registry_blob_statuses(s: &Setup) -> Result<Vec<String>> {
    let log = fs::read_to_string(&s.registry.access_log)?;
    let needle = format!("/blobs/{} ", s.layer.digest);
    Ok(log
        .lines()
        .filter(|line| line.contains("\"GET ") && line.contains(&needle))
        .filter_map(|line| line.split('"').nth(2)?.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Reads the whole data space chunk by chunk (one range request each), comparing each
/// with the local blob; returns how many reads it made.
fn read_all_chunks(reader: &BlobReader<RegistryBlob>, local: &BlobReader<&[u8]>) -> Result<u64> {
    let size = reader.header().data_space_size;
    let chunk = u64::from(reader.header().chunk_size);
    let mut reads = 0;
    for offset in (0..size).step_by(chunk as usize) {
        let len = chunk.min(size - offset);
        assert_eq!(
            reader.read_data(offset, len)?,
            local.read_data(offset, len)?,
            "bytes at {offset}"
        );
        reads += 1;
    }
    Ok(reads)
}

#[test]
fn a_redirecting_registry_is_asked_once_then_its_storage() -> Result<()> {
    let s = setup()?;
    let reader = BlobReader::open(remote(&s)?, &s.layer.verified_digest)?;
    let local = BlobReader::open(&s.local[..], &s.layer.verified_digest)?;
    let reads = read_all_chunks(&reader, &local)?;
    assert!(
        reads >= 3,
        "{reads} chunks: the layer is too small to show anything"
    );
    // The verified region's read learned the storage URL; no chunk read asked the
    // registry.
    assert_eq!(
        registry_blob_statuses(&s)?,
        ["307"],
        "blob GETs the registry answered"
    );
    Ok(())
}

#[test]
fn a_failing_storage_url_is_forgotten_and_the_registry_asked_again() -> Result<()> {
    let s = setup()?;
    let reader = BlobReader::open(remote(&s)?, &s.layer.verified_digest)?;
    let local = BlobReader::open(&s.local[..], &s.layer.verified_digest)?;
    assert_eq!(registry_blob_statuses(&s)?.len(), 1);
    // The storage fails the next read (as an expired signature would).
    s.proxy.queue(&[Fault::Status500]);
    read_all_chunks(&reader, &local)?;
    assert_eq!(s.proxy.injected(), [Fault::Status500]);
    assert_eq!(
        registry_blob_statuses(&s)?,
        ["307", "307"],
        "the registry asked again once, then its new storage URL used"
    );
    Ok(())
}

#[test]
fn a_stalling_storage_url_is_given_up_in_bounded_time() -> Result<()> {
    let s = setup()?;
    let budget = Duration::from_secs(2);
    let policy = RetryPolicy {
        budget,
        ..RetryPolicy::default()
    };
    let reader = BlobReader::open(remote_with(&s, policy)?, &s.layer.verified_digest)?;
    let local = BlobReader::open(&s.local[..], &s.layer.verified_digest)?;
    // The storage sends its headers, then a byte every 2 s (never closing).
    s.proxy.queue(&[Fault::Trickle]);
    let chunk = u64::from(reader.header().chunk_size);
    let started = Instant::now();
    assert_eq!(reader.read_data(0, chunk)?, local.read_data(0, chunk)?);
    let took = started.elapsed();
    assert_eq!(s.proxy.injected(), [Fault::Trickle]);
    // The budget plus a second per MiB asked, then the registry's answer.
    assert!(
        took >= budget && took < budget + Duration::from_secs(4),
        "the stalled storage held the read {took:?}"
    );
    assert_eq!(registry_blob_statuses(&s)?, ["307", "307"]);
    Ok(())
}
