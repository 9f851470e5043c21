//! Lazy layers straight from a registry through the real kernel: a converted image is
//! pushed to `docker-registry` on the guest's loopback, `lazy-erofs serve --image`
//! registers each layer's metadata image and data space, the kernel mounts them by
//! fsid and every file reads back identical — also across a fetcher kill. Through a
//! fault proxy, a flipped bit is retried away, and a registry that keeps sending corrupt
//! bytes gets the reader EIO, never the corrupt bytes.

mod common;

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use common::{Serve, ServeOptions};
use lazy_erofs_image::registry::{Registry, RegistryOptions};
use lazy_erofs_test_support::fault_proxy::{Fault, FaultProxy};

/// A converted test image pushed to a fresh registry; returns the registry.
fn pushed_image(work: &Path) -> Result<lazy_erofs_test_support::DockerRegistry> {
    let registry_dir = work.join("registry");
    fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    let (src, dst) = (work.join("src"), work.join("dst"));
    lazy_erofs_test_support::make_oci_layout(&src)?;
    let image = format!("{}/{IMAGE_PATH}", registry.host);
    common::convert(&src, &dst, &image)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(
            Registry::new(&RegistryOptions::insecure(&registry.host)).push_layout(&dst, &image),
        )?;
    Ok(registry)
}

const IMAGE_PATH: &str = "lazy/vm:1";

/// `serve --image` of the image at `host`; returns it and the layers' fsids.
fn serve_image(work: &Path, host: &str) -> Result<(Serve, Vec<String>)> {
    let serve_dir = work.join("serve");
    fs::create_dir_all(&serve_dir)?;
    let serve = Serve::start(
        &serve_dir,
        ServeOptions {
            blobs: Vec::new(),
            extra_args: vec![
                "--image".into(),
                format!("{host}/{IMAGE_PATH}"),
                "--insecure".into(),
                host.to_owned(),
            ],
            ..ServeOptions::blob("unused", work)
        },
    )?;
    // "layer N: fsid=… data-tag=… (digest)"
    let fsids: Vec<String> = serve
        .preamble
        .iter()
        .filter_map(|line| line.split("fsid=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    ensure!(fsids.len() == 2, "layers announced: {:?}", serve.preamble);
    Ok((serve, fsids))
}

fn big_file() -> Vec<u8> {
    (0..3_000_000u32).map(|i| (i % 251) as u8).collect()
}

#[test]
fn privileged_vm_lazy_layers_from_a_registry_read_back_identical() -> Result<()> {
    let work = common::scratch()?;
    let registry = pushed_image(work.path())?;
    let (serve, fsids) = serve_image(work.path(), &registry.host)?;

    let (mnt1, mnt2) = (work.path().join("layer1"), work.path().join("layer2"));
    common::mount_ok(&fsids[0], &mnt1).with_context(|| serve.log())?;
    common::mount_ok(&fsids[1], &mnt2).with_context(|| serve.log())?;
    assert_eq!(fs::read(mnt1.join("etc/hostname"))?, b"lazy\n");
    assert_eq!(fs::read(mnt2.join("etc/motd"))?, b"hello\n");
    // The big file's bytes come from the data space, by range, after a fetcher kill.
    serve.kill_fetcher()?;
    let big = fs::read(mnt1.join("usr/bin/big"))?;
    ensure!(
        big == big_file(),
        "usr/bin/big differs ({} bytes read)",
        big.len()
    );
    common::umount(&mnt1)?;
    common::umount(&mnt2)?;
    Ok(())
}

#[test]
fn privileged_vm_corrupt_registry_bytes_never_reach_the_reader() -> Result<()> {
    let work = common::scratch()?;
    let registry = pushed_image(work.path())?;
    let proxy = FaultProxy::start(registry.host.clone())?;
    let (serve, fsids) = serve_image(work.path(), &proxy.addr)?;
    let mnt = work.path().join("layer1");
    common::mount_ok(&fsids[0], &mnt).with_context(|| serve.log())?;
    let big = mnt.join("usr/bin/big");

    // A registry that keeps flipping a bit: the read fails with EIO, bounded in time.
    proxy.set_standing(Some(Fault::FlipBit));
    let started = std::time::Instant::now();
    let err = fs::read(&big).expect_err("corrupt bytes were returned as data");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EIO), "{err}");
    println!(
        "standing corruption: EIO after {:.1} s, {} corrupt replies",
        started.elapsed().as_secs_f64(),
        proxy.injected().len()
    );
    ensure!(
        serve.log().contains("digest") || serve.log().contains("sha256"),
        "the log does not say why: {}",
        serve.log()
    );

    // One flipped reply: retried away, the bytes are right.
    proxy.set_standing(None);
    let before = proxy.injected().len();
    proxy.queue(&[Fault::FlipBit]);
    ensure!(
        fs::read(&big)? == big_file(),
        "usr/bin/big differs after a retried flip"
    );
    assert_eq!(proxy.injected().len(), before + 1);
    common::umount(&mnt)?;
    Ok(())
}

/// `--mount-dir` on the cachefiles backend: each layer mounted at MNT/<index> before
/// `ready`, readable, and unmounted by SIGTERM. The cache directory did not exist: serve
/// created it.
#[test]
fn privileged_vm_serve_mount_dir_mounts_every_layer() -> Result<()> {
    let work = common::scratch()?;
    let registry = pushed_image(work.path())?;
    let serve_dir = work.path().join("serve");
    fs::create_dir_all(&serve_dir)?;
    let mnt = work.path().join("mnt");
    let serve = Serve::start(
        &serve_dir,
        ServeOptions {
            blobs: Vec::new(),
            extra_args: vec![
                "--image".into(),
                format!("{}/{IMAGE_PATH}", registry.host),
                "--insecure".into(),
                registry.host.clone(),
                "--mount-dir".into(),
                mnt.display().to_string(),
            ],
            ..ServeOptions::blob("unused", work.path())
        },
    )?;
    ensure!(
        serve_dir.join("cache").is_dir(),
        "cache directory not created"
    );
    assert_eq!(fs::read(mnt.join("0/etc/hostname"))?, b"lazy\n");
    ensure!(
        lazy_erofs_snapshotter::lazy::layers::is_mountpoint(&mnt.join("1")),
        "layer 2 not mounted"
    );
    serve.stop()?;
    for layer in ["0", "1"] {
        ensure!(
            !lazy_erofs_snapshotter::lazy::layers::is_mountpoint(&mnt.join(layer)),
            "layer {layer} still mounted after SIGTERM"
        );
    }
    Ok(())
}
