//! Against a real `docker-registry` (distribution 2.8) on loopback: push a converted
//! image, pull its manifest back, and read lazy layers by range through the verifying
//! reader — the same bytes as the local blob, and a wrong trust anchor is refused.

mod common;

use std::fs;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use lazy_erofs_image::blob::{BlobError, BlobReader};
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::{
    HostOptions, Registry, RegistryBlob, RegistryOptions, parse_reference,
};

use lazy_erofs_test_support::{start_docker_registry, start_docker_registry_with_password};

fn start_registry(dir: &Path) -> Result<lazy_erofs_test_support::DockerRegistry> {
    start_docker_registry(dir, None)
}

#[test]
fn push_pull_and_range_read_verified_chunks() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let registry_proc = start_registry(dir.path())?;
    let dst = common::converted_layout(dir.path())?;

    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    );
    let options = RegistryOptions {
        insecure_hosts: vec![registry_proc.host.clone()],
        ..RegistryOptions::default()
    };
    let registry = Arc::new(Registry::new(&options));
    let image = format!("{}/lazy/test:1", registry_proc.host);
    let pushed = runtime.block_on(registry.push_layout(&dst, &image))?;
    let (manifest, digest) = runtime.block_on(registry.pull_manifest(&image))?;
    assert_eq!(digest, pushed, "manifest digest changed in the round trip");

    for layer in manifest.layers() {
        let lazy = LazyLayer::from_descriptor(layer)?.context("layer not lazy")?;
        let local = fs::read(dst.join("blobs/sha256").join(&lazy.digest[7..]))?;
        let local_reader = BlobReader::open(&local[..], &lazy.verified_digest)?;
        let remote = RegistryBlob {
            runtime: runtime.clone(),
            registry: registry.clone(),
            image: image.clone(),
            digest: lazy.digest.clone(),
        };
        let reader = BlobReader::open(remote, &lazy.verified_digest)?;
        assert_eq!(reader.metadata(), local_reader.metadata());
        let size = reader.header().data_space_size;
        // A range inside one chunk and one across chunks, read by range requests.
        for (offset, len) in [
            (0, size.min(4096)),
            (size / 3, (size / 2).max(1).min(size - size / 3)),
        ] {
            assert_eq!(
                reader.read_data(offset, len)?,
                local_reader.read_data(offset, len)?,
                "range {offset}+{len}"
            );
        }
        // A wrong trust anchor: nothing is returned.
        let wrong = RegistryBlob {
            runtime: runtime.clone(),
            registry: registry.clone(),
            image: image.clone(),
            digest: lazy.digest.clone(),
        };
        let other = format!("sha256:{}", "1".repeat(64));
        assert!(matches!(
            BlobReader::open(wrong, &other),
            Err(BlobError::RegionDigest { .. })
        ));
    }
    Ok(())
}

#[test]
fn unknown_image_is_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let registry_proc = start_registry(dir.path())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let registry = Registry::new(&RegistryOptions {
        insecure_hosts: vec![registry_proc.host.clone()],
        ..RegistryOptions::default()
    });
    let err = runtime
        .block_on(registry.pull_manifest(&format!("{}/no/such:image", registry_proc.host)))
        .expect_err("pulled a missing image");
    let message = err.to_string().to_lowercase();
    assert!(
        message.contains("manifest unknown") && message.contains("no/such"),
        "{message}"
    );
    Ok(())
}

#[test]
fn basic_auth_push_works_and_anonymous_push_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let registry_proc = start_docker_registry_with_password(dir.path(), "tester", "s3cret")?;
    let dst = common::converted_layout(dir.path())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let image = format!("{}/lazy/auth:1", registry_proc.host);
    let insecure = vec![registry_proc.host.clone()];

    let anonymous = Registry::new(&RegistryOptions {
        insecure_hosts: insecure.clone(),
        ..RegistryOptions::default()
    });
    let err = runtime
        .block_on(anonymous.push_layout(&dst, &image))
        .expect_err("anonymous push accepted");
    assert!(
        err.to_string().to_lowercase().contains("unauthorized"),
        "{err}"
    );

    let mut options = RegistryOptions {
        insecure_hosts: insecure,
        ..RegistryOptions::default()
    };
    options.hosts.insert(
        registry_proc.host.clone(),
        HostOptions::basic("tester", "s3cret"),
    );
    let registry = Registry::new(&options);
    let pushed = runtime.block_on(registry.push_layout(&dst, &image))?;
    let (_, digest) = runtime.block_on(registry.pull_manifest(&image))?;
    assert_eq!(digest, pushed);
    Ok(())
}

/// What the CRI image proxy does with a pull secret: a registry with no configured
/// credentials, pulled through a mirror that wants a password, reads once they are
/// provided for the registry's name.
#[test]
fn provided_credentials_open_a_password_mirror() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let registry_proc = start_docker_registry_with_password(dir.path(), "puller", "s3cret")?;
    let dst = common::converted_layout(dir.path())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let host = registry_proc.host.clone();
    let mut push = RegistryOptions {
        insecure_hosts: vec![host.clone()],
        docker_config: false,
        ..RegistryOptions::default()
    };
    push.hosts
        .insert(host.clone(), HostOptions::basic("puller", "s3cret"));
    runtime.block_on(Registry::new(&push).push_layout(&dst, &format!("{host}/lazy/app:1")))?;
    let (manifest, _) =
        runtime.block_on(Registry::new(&push).pull_manifest(&format!("{host}/lazy/app:1")))?;
    let layer = manifest.layers()[0].digest().to_string();
    let local = fs::read(
        dst.join("blobs/sha256")
            .join(layer.trim_start_matches("sha256:")),
    )?;

    let mut options = RegistryOptions {
        insecure_hosts: vec![host.clone()],
        docker_config: false,
        ..RegistryOptions::default()
    };
    // The origin has no address: only the mirror can answer.
    options.hosts.insert(
        "registry.invalid".into(),
        HostOptions {
            mirrors: vec![host.clone()],
            ..HostOptions::default()
        },
    );
    options.retry.max_attempts = 1;
    let registry = Registry::new(&options);
    let image = "registry.invalid/lazy/app:1";
    let err = runtime
        .block_on(registry.read_range(image, &layer, 0, 4096))
        .expect_err("read without credentials");
    println!("without credentials: {err}");
    registry.provide_credentials(
        "registry.invalid",
        &lazy_erofs_image::registry::Credentials::Basic {
            username: "puller".into(),
            password: "s3cret".into(),
        },
    )?;
    let bytes = runtime.block_on(registry.read_range(image, &layer, 0, 4096))?;
    assert_eq!(bytes, local[..4096]);
    Ok(())
}

#[test]
fn large_blobs_are_pushed_in_chunks_and_read_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let registry_proc = start_registry(dir.path())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let registry = Registry::new(&RegistryOptions::insecure(&registry_proc.host));
    // Larger than two upload chunks (8 MiB), not a multiple of anything.
    let bytes = lazy_erofs_test_support::pseudo_random((20 << 20) + 12_345, 7);
    let digest = lazy_erofs_test_support::sha256_digest(&bytes);
    let path = dir.path().join("big");
    fs::write(&path, &bytes)?;
    let image = format!("{}/lazy/big:1", registry_proc.host);
    let reference = parse_reference(&image)?;
    runtime.block_on(registry.push_blob_file(&reference, &path, &digest))?;
    // Pushing again finds the blob there and sends nothing.
    runtime.block_on(registry.push_blob_file(&reference, &path, &digest))?;
    let len = bytes.len() as u64;
    for (offset, size) in [(0, 4096), ((8 << 20) - 100, 200), (len - 10, 10)] {
        let got = runtime.block_on(registry.read_range(&image, &digest, offset, size))?;
        assert_eq!(
            got,
            bytes[offset as usize..(offset + size) as usize],
            "range {offset}+{size}"
        );
    }
    Ok(())
}

#[test]
fn mirrors_are_tried_in_order_then_the_origin() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (origin_dir, mirror_dir) = (dir.path().join("origin"), dir.path().join("mirror"));
    fs::create_dir(&origin_dir)?;
    fs::create_dir(&mirror_dir)?;
    let origin = start_registry(&origin_dir)?;
    let mirror = start_registry(&mirror_dir)?;
    let dst = common::converted_layout(dir.path())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let origin_host = origin.host.clone();
    let dead = {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        format!("127.0.0.1:{port}")
    };
    // The same image on the origin and on the mirror.
    let path = "lazy/mirrored:1";
    for host in [&origin.host, &mirror.host] {
        let registry = Registry::new(&RegistryOptions::insecure(host));
        runtime.block_on(registry.push_layout(&dst, &format!("{host}/{path}")))?;
    }
    let with_mirrors = |mirrors: &[&String]| {
        let mut options = RegistryOptions {
            insecure_hosts: vec![origin_host.clone(), mirror.host.clone(), dead.clone()],
            retry: lazy_erofs_image::registry::RetryPolicy {
                budget: std::time::Duration::from_secs(2),
                ..Default::default()
            },
            ..RegistryOptions::default()
        };
        options.hosts.insert(
            origin_host.clone(),
            HostOptions {
                mirrors: mirrors.iter().map(|m| (*m).clone()).collect(),
                ..HostOptions::default()
            },
        );
        Registry::new(&options)
    };
    let image = format!("{origin_host}/{path}");
    let read_first_layer = |registry: &Registry| -> Result<Vec<u8>> {
        let (manifest, _) = runtime.block_on(registry.pull_manifest(&image))?;
        let layer = LazyLayer::from_descriptor(&manifest.layers()[0])?.context("not lazy")?;
        Ok(runtime.block_on(registry.read_range(&image, &layer.digest, 0, 4096))?)
    };

    // A dead mirror falls back to the origin.
    let expected = read_first_layer(&with_mirrors(&[&dead]))?;
    // With the origin gone, the second mirror serves everything.
    drop(origin);
    assert_eq!(
        read_first_layer(&with_mirrors(&[&dead, &mirror.host]))?,
        expected
    );
    // Nothing left: the error names the origin, the last endpoint tried.
    let err = read_first_layer(&with_mirrors(&[&dead])).expect_err("nothing is up");
    assert!(format!("{err:#}").contains(&origin_host), "{err:#}");
    Ok(())
}

#[test]
fn bearer_token_registry_push_pull_and_range_reads_reuse_one_token() -> Result<()> {
    use lazy_erofs_test_support::token::TokenAuthority;
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir()?;
    let cert = dir.path().join("token-cert.pem");
    let authority = TokenAuthority::start(&cert, "tester", "t0ken-pass")?;
    let registry_proc = lazy_erofs_test_support::start_docker_registry_with_config(
        dir.path(),
        &authority.registry_auth_config(&cert),
    )?;
    let host = registry_proc.host.clone();
    let dst = common::converted_layout(dir.path())?;
    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    );
    let image = format!("{host}/lazy/token:1");

    let anonymous = Registry::new(&RegistryOptions {
        docker_config: false,
        ..RegistryOptions::insecure(&host)
    });
    let err = runtime
        .block_on(anonymous.push_layout(&dst, &image))
        .expect_err("anonymous push accepted");
    assert!(format!("{err:#}").contains("bad credentials"), "{err:#}");

    let mut options = RegistryOptions::insecure(&host);
    options
        .hosts
        .insert(host.clone(), HostOptions::basic("tester", "t0ken-pass"));
    let registry = Arc::new(Registry::new(&options));
    let pushed = runtime.block_on(registry.push_layout(&dst, &image))?;
    let (manifest, digest) = runtime.block_on(registry.pull_manifest(&image))?;
    assert_eq!(digest, pushed);
    let before_reads = authority.issued.load(Ordering::SeqCst);
    assert!(before_reads >= 1, "the registry never asked for a token");
    for layer in manifest.layers() {
        let lazy = LazyLayer::from_descriptor(layer)?.context("layer not lazy")?;
        let local = fs::read(dst.join("blobs/sha256").join(&lazy.digest[7..]))?;
        let local_reader = BlobReader::open(&local[..], &lazy.verified_digest)?;
        let reader = BlobReader::open(
            RegistryBlob {
                runtime: runtime.clone(),
                registry: registry.clone(),
                image: image.clone(),
                digest: lazy.digest.clone(),
            },
            &lazy.verified_digest,
        )?;
        let size = reader.header().data_space_size;
        for offset in (0..size).step_by(64 << 10).take(10) {
            let len = (size - offset).min(4096);
            assert_eq!(
                reader.read_data(offset, len)?,
                local_reader.read_data(offset, len)?
            );
        }
    }
    // Many range reads, one pull token: tokens are cached, not fetched per read.
    let for_reads = authority.issued.load(Ordering::SeqCst) - before_reads;
    assert!(for_reads <= 1, "{for_reads} tokens fetched for range reads");
    Ok(())
}
