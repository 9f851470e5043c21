//! `lazy-erofs serve` starts and stops like a daemon should: SIGTERM leaves no fetcher
//! and releases /dev/cachefiles; a SIGKILLed supervisor takes its fetcher with it.

mod common;

use std::fs;
use std::time::Duration;

use anyhow::Result;
use common::{Serve, ServeOptions};

fn tiny_image(work: &std::path::Path) -> Result<std::path::PathBuf> {
    let src = work.join("src");
    fs::create_dir_all(&src)?;
    fs::write(src.join("f"), "x")?;
    let image = work.join("tiny.erofs");
    common::mkfs_erofs(&image, &src)?;
    Ok(image)
}

#[test]
fn privileged_vm_sigterm_stops_the_fetcher_and_releases_the_device() -> Result<()> {
    let work = common::scratch()?;
    let image = tiny_image(work.path())?;
    let serve = Serve::start(work.path(), ServeOptions::blob("t", &image))?;
    let fetcher = serve.fetcher_pid()?;
    let pid_file = serve.run_dir.join("fetcher.pid");
    let stats = serve.stop()?;
    assert!(
        !common::process_alive(fetcher),
        "fetcher {fetcher} outlived serve"
    );
    assert!(!pid_file.exists(), "stale pid file");
    assert_eq!(stats["restarts"], 0, "{stats}");
    // One opener per host: opening again proves serve closed its fd.
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/cachefiles")?;
    Ok(())
}

#[test]
fn privileged_vm_fetcher_dies_with_a_killed_supervisor() -> Result<()> {
    let work = common::scratch()?;
    let image = tiny_image(work.path())?;
    let mut serve = Serve::start(work.path(), ServeOptions::blob("t", &image))?;
    let fetcher = serve.fetcher_pid()?;
    serve.kill_supervisor()?;
    common::wait_until(
        "the fetcher to die with its parent",
        Duration::from_secs(5),
        || !common::process_alive(fetcher),
    )?;
    common::wait_until(
        "/dev/cachefiles to be released",
        Duration::from_secs(5),
        || {
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/cachefiles")
                .is_ok()
        },
    )
}
