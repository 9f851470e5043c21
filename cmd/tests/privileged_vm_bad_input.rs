//! Bad input to `lazy-erofs serve` on the real kernel: clear errors, nothing hangs, the
//! daemon keeps serving.

mod common;

use std::fs;
use std::io::ErrorKind;

use anyhow::Result;
use common::{Serve, ServeOptions};

#[test]
fn privileged_vm_unknown_blob_fails_the_mount_with_a_clear_error() -> Result<()> {
    let work = common::scratch()?;
    let src = work.path().join("src");
    fs::create_dir_all(&src)?;
    fs::write(src.join("a"), "a")?;
    let image = work.path().join("known.erofs");
    common::mkfs_erofs(&image, &src)?;
    let serve = Serve::start(work.path(), ServeOptions::blob("known", &image))?;
    let out = common::mount_fsid("not-registered", &work.path().join("mnt"))?;
    assert!(!out.status.success(), "mount of an unknown blob succeeded");
    assert_ne!(out.status.code(), Some(124), "mount hung");
    let log = serve.log();
    assert!(
        log.contains("not-registered") && log.contains("no such blob registered"),
        "{log}"
    );
    // Still serving the known blob.
    let mnt = work.path().join("mnt2");
    common::mount_ok("known", &mnt)?;
    assert_eq!(fs::read(mnt.join("a"))?, b"a");
    common::umount(&mnt)?;
    let stats = serve.stop()?;
    assert_eq!(stats["opens_refused"], 1);
    Ok(())
}

#[test]
fn privileged_vm_truncated_source_fails_the_read_with_eio_and_serving_goes_on() -> Result<()> {
    let work = common::scratch()?;
    let src = work.path().join("src");
    fs::create_dir_all(&src)?;
    fs::write(src.join("early.txt"), "small and inline\n")?;
    fs::write(src.join("big.bin"), common::pseudo_random(8 << 20, 9))?;
    let image = work.path().join("image.erofs");
    common::mkfs_erofs(&image, &src)?;
    let serve = Serve::start(work.path(), ServeOptions::blob("trunc", &image))?;
    let mnt = work.path().join("mnt");
    common::mount_ok("trunc", &mnt)?;
    // The registry-side blob shrinks under us: the tail of big.bin is gone.
    let size = fs::metadata(&image)?.len();
    fs::OpenOptions::new()
        .write(true)
        .open(&image)?
        .set_len(size - (2 << 20))?;
    let err = fs::read(mnt.join("big.bin")).expect_err("reading past the truncation succeeded");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EIO), "{err}");
    assert_ne!(err.kind(), ErrorKind::NotFound);
    assert_eq!(
        fs::read_to_string(mnt.join("early.txt"))?,
        "small and inline\n"
    );
    common::umount(&mnt)?;
    let log = serve.log();
    let stats = serve.stop()?;
    assert!(
        log.contains("failed after retries, the reader sees EIO") && log.contains("truncated"),
        "{log}"
    );
    assert!(stats["reads_failed"].as_u64() >= Some(1), "{stats}");
    assert!(stats["fetch_retries"].as_u64() >= Some(4), "{stats}");
    Ok(())
}
