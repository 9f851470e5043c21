//! Lazy layers straight from a registry through the real kernel: a converted image is
//! pushed to `docker-registry` on the guest's loopback, `lazy-erofs serve --image`
//! registers each layer's metadata image and data space, the kernel mounts them by
//! fsid and every file reads back identical — also across a fetcher kill.

mod common;

use std::fs;

use anyhow::{Context, Result, ensure};
use common::{Serve, ServeOptions};
use lazy_erofs_image::convert::{ConvertOptions, convert_layout};
use lazy_erofs_image::registry::{Registry, RegistryOptions};

#[test]
fn privileged_vm_lazy_layers_from_a_registry_read_back_identical() -> Result<()> {
    let work = common::scratch()?;
    let registry_dir = work.path().join("registry");
    fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    lazy_erofs_test_support::make_oci_layout(&src)?;
    convert_layout(
        &src,
        &dst,
        "linux/amd64",
        &ConvertOptions::default(),
        &mut |_, _, reader| reader,
    )?;
    let image = format!("{}/lazy/vm:1", registry.host);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(
            Registry::new(&RegistryOptions::insecure(&registry.host)).push_layout(&dst, &image),
        )?;

    let serve_dir = work.path().join("serve");
    fs::create_dir_all(&serve_dir)?;
    let serve = Serve::start(
        &serve_dir,
        ServeOptions {
            blobs: Vec::new(),
            extra_args: vec![
                "--image".into(),
                image.clone(),
                "--insecure".into(),
                registry.host.clone(),
            ],
            ..ServeOptions::blob("unused", &dst)
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

    let (mnt1, mnt2) = (work.path().join("layer1"), work.path().join("layer2"));
    common::mount_ok(&fsids[0], &mnt1).with_context(|| serve.log())?;
    common::mount_ok(&fsids[1], &mnt2).with_context(|| serve.log())?;
    assert_eq!(fs::read(mnt1.join("etc/hostname"))?, b"lazy\n");
    assert_eq!(fs::read(mnt2.join("etc/motd"))?, b"hello\n");
    // The big file's bytes come from the data space, by range, after a fetcher kill.
    serve.kill_fetcher()?;
    let big = fs::read(mnt1.join("usr/bin/big"))?;
    let want: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    ensure!(
        big == want,
        "usr/bin/big differs ({} bytes read)",
        big.len()
    );
    common::umount(&mnt1)?;
    common::umount(&mnt2)?;
    Ok(())
}
