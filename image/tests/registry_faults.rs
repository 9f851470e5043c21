//! Range reads through a fault-injecting proxy in front of a real docker-registry:
//! 500s, 429 with Retry-After, connection resets and truncated bodies are retried;
//! a flipped bit is never returned as data; a registry that stays down fails in bounded
//! time with a clear error.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lazy_erofs_image::blob::{BlobError, BlobReader};
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::{Registry, RegistryBlob, RegistryOptions, RetryPolicy};
use lazy_erofs_test_support::fault_proxy::{Fault, FaultProxy};

struct Setup {
    _registry: lazy_erofs_test_support::DockerRegistry,
    proxy: FaultProxy,
    layer: LazyLayer,
    local: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn setup() -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let registry = lazy_erofs_test_support::start_docker_registry(dir.path(), None)?;
    let addr = registry.host.clone();
    let dst = common::converted_layout(dir.path())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let direct = Registry::new(&RegistryOptions {
        insecure_hosts: vec![addr.clone()],
        ..RegistryOptions::default()
    });
    runtime.block_on(direct.push_layout(&dst, &format!("{addr}/lazy/faults:1")))?;
    let (manifest, _) = runtime.block_on(direct.pull_manifest(&format!("{addr}/lazy/faults:1")))?;
    // The first layer holds a 3 MB file: several chunks.
    let layer = LazyLayer::from_descriptor(&manifest.layers()[0])?.context("not lazy")?;
    let local = fs::read(dst.join("blobs/sha256").join(&layer.digest[7..]))?;
    Ok(Setup {
        _registry: registry,
        proxy: FaultProxy::start(addr)?,
        layer,
        local,
        _dir: dir,
    })
}

fn remote(s: &Setup, policy: RetryPolicy) -> Result<RegistryBlob> {
    let options = RegistryOptions {
        insecure_hosts: vec![s.proxy.addr.clone()],
        retry: policy,
        ..RegistryOptions::default()
    };
    let image = format!("{}/lazy/faults:1", s.proxy.addr);
    common::registry_blob(&options, image, &s.layer.digest)
}

#[test]
fn transient_faults_are_retried_and_retry_after_is_honoured() -> Result<()> {
    let s = setup()?;
    s.proxy.queue(&[
        Fault::Status500,
        Fault::TooManyRequests,
        Fault::ResetMidBody,
        Fault::TruncatedBody,
    ]);
    let started = Instant::now();
    let reader = BlobReader::open(
        remote(&s, RetryPolicy::default())?,
        &s.layer.verified_digest,
    )?;
    let local = BlobReader::open(&s.local[..], &s.layer.verified_digest)?;
    assert_eq!(s.proxy.injected().len(), 4, "every fault was served");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After: 1 was not honoured ({:?})",
        started.elapsed()
    );
    let size = reader.header().data_space_size;
    assert_eq!(reader.read_data(0, size)?, local.read_data(0, size)?);
    Ok(())
}

#[test]
fn a_flipped_bit_is_never_returned_as_data() -> Result<()> {
    let s = setup()?;
    let reader = BlobReader::open(
        remote(&s, RetryPolicy::default())?,
        &s.layer.verified_digest,
    )?;
    s.proxy.queue(&[Fault::FlipBit]);
    let err = reader.chunk(1).expect_err("corrupted chunk returned");
    assert!(
        matches!(
            err,
            BlobError::ChunkDigest { index: 1 } | BlobError::Chunk { index: 1, .. }
        ),
        "{err}"
    );
    // The next fetch is clean and verifies.
    let local = BlobReader::open(&s.local[..], &s.layer.verified_digest)?;
    assert_eq!(reader.chunk(1)?, local.chunk(1)?);
    Ok(())
}

#[test]
fn a_registry_that_stays_down_fails_in_bounded_time() -> Result<()> {
    let s = setup()?;
    s.proxy.queue(&[Fault::Status500; 20]);
    let policy = RetryPolicy {
        max_attempts: 4,
        budget: Duration::from_secs(3),
        ..RetryPolicy::default()
    };
    let started = Instant::now();
    let err = BlobReader::open(remote(&s, policy)?, &s.layer.verified_digest)
        .err()
        .context("read succeeded")?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.to_string().contains("500"), "{err}");
    assert_eq!(s.proxy.injected().len(), 4, "attempts");
    Ok(())
}
