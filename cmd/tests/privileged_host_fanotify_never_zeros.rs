//! The fanotify backend's hazard: a pre-content group lets every read through once its
//! last fd closes, and unfetched ranges of the sparse data file read as zeros. Here the
//! supervisor (which owns the group) is SIGKILLed, and in a second test SIGTERMed, while
//! a reader holds a layer file open with a read of unfetched data in flight; every read
//! before, during and after gets the right bytes or an error, never zeros; the keeper
//! that holds the group exits only once no layer file is in use, and hands the group to
//! a restarted serve, under which the old reader's refused range reads right.

mod common;
mod fanotify;

use std::fs::File;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

const SIZE: usize = 8 << 20;
const MIB: u64 = 1 << 20;

/// Reads 64 KiB at `offset` with the page cache dropped (so the read reaches the data
/// file); the bytes must be the image's, or the read must fail.
fn read_checked(file: &File, offset: u64, want: &[u8]) -> Result<Option<std::io::Error>> {
    common::drop_caches()?;
    let len = 64 << 10;
    match fanotify::read_range(file, offset, len) {
        Ok(got) => {
            let expected = &want[offset as usize..offset as usize + len];
            ensure!(
                got == expected,
                "WRONG BYTES at {offset} ({}zeros)",
                if got.iter().all(|&b| b == 0) {
                    ""
                } else {
                    "not "
                }
            );
            Ok(None)
        }
        Err(err) => Ok(Some(err)),
    }
}

/// Starts a read of unfetched data that waits on a 1 s fetch; returns its thread.
fn read_in_flight(
    file: &File,
    offset: u64,
    want: &[u8],
) -> Result<std::thread::JoinHandle<Result<Option<std::io::Error>>>> {
    let file = file.try_clone()?;
    let want = want.to_vec();
    let reader = std::thread::spawn(move || read_checked(&file, offset, &want));
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        !reader.is_finished(),
        "the read at {offset} was not in flight"
    );
    Ok(reader)
}

fn join(
    reader: std::thread::JoinHandle<Result<Option<std::io::Error>>>,
) -> Result<Option<std::io::Error>> {
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?
}

#[test]
fn privileged_host_fanotify_supervisor_sigkill_never_lets_zeros_through() -> Result<()> {
    let work = fanotify::work_dir()?;
    let _mounts = fanotify::MountGuard(work.path());
    let image = fanotify::pushed_image(work.path(), 1, SIZE)?;
    let mut serve = fanotify::serve(work.path(), &image, Some("latency=1s"), true)?;
    let want = &image.files[0].1;
    let file = File::open(fanotify::path(work.path(), &image.files[0].0))?;
    ensure!(read_checked(&file, 0, want)?.is_none(), "first read failed");

    let in_flight = read_in_flight(&file, 4 * MIB, want)?;
    serve.kill_supervisor()?;
    let during = join(in_flight)?;
    ensure!(
        fanotify::keepers(work.path()).len() == 1,
        "no keeper holds the group after the supervisor died"
    );
    let after = read_checked(&file, 6 * MIB, want)?;
    let earlier = read_checked(&file, 0, want)?;
    println!(
        "SIGKILL: in-flight read {during:?}, unfetched read after {after:?}, \
         fetched range after {earlier:?}"
    );
    ensure!(
        during.is_some() && after.is_some(),
        "an unfetched range was read with no fetcher alive"
    );
    // Still mounted (nobody unmounted after the SIGKILL): the keeper stays for it.
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        !fanotify::keepers(work.path()).is_empty(),
        "the keeper left while the layer was still mounted"
    );
    // A restarted serve adopts the group from the keeper: the reader that held its file
    // open across the crash now gets the range it was refused, fetched and right.
    let serve = fanotify::serve(work.path(), &image, None, true)?;
    ensure!(
        serve.log().contains("adopted the fanotify group"),
        "the restart did not adopt the group:\n{}",
        serve.log()
    );
    let recovered = read_checked(&file, 6 * MIB, want)?;
    ensure!(
        recovered.is_none(),
        "after the restart the old reader still fails: {recovered:?}"
    );
    drop(file);
    serve.stop()?;
    fanotify::keeper_gone(work.path())
}

#[test]
fn privileged_host_fanotify_supervisor_sigterm_finishes_reads_then_never_lets_zeros_through()
-> Result<()> {
    let work = fanotify::work_dir()?;
    let _mounts = fanotify::MountGuard(work.path());
    let image = fanotify::pushed_image(work.path(), 1, SIZE)?;
    let serve = fanotify::serve(work.path(), &image, Some("latency=1s"), true)?;
    let want = &image.files[0].1;
    let file = File::open(fanotify::path(work.path(), &image.files[0].0))?;

    let in_flight = read_in_flight(&file, 4 * MIB, want)?;
    // A planned stop: the layer is detached (the file is open), the in-flight read is
    // finished, then the keeper takes the group over.
    let stats = serve.stop().context("serve did not stop cleanly")?;
    let during = join(in_flight)?;
    ensure!(
        during.is_none(),
        "a planned stop failed a read in flight: {during:?}"
    );
    ensure!(
        !work.path().join("mnt/0").join(&image.files[0].0).exists(),
        "the layer is still attached after SIGTERM"
    );
    let fetched = read_checked(&file, 4 * MIB, want)?;
    let unfetched = read_checked(&file, 6 * MIB, want)?;
    println!(
        "SIGTERM: in-flight read completed; fetched range after {fetched:?}, \
         unfetched {unfetched:?}; {stats}"
    );
    ensure!(
        fetched.is_none(),
        "a range fetched before the stop failed after it"
    );
    ensure!(
        unfetched.is_some(),
        "an unfetched range was read with no fetcher alive"
    );
    ensure!(
        !fanotify::keepers(work.path()).is_empty(),
        "no keeper holds the group while the detached layer is read"
    );
    drop(file);
    fanotify::keeper_gone(work.path())
}
