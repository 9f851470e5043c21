//! The fanotify backend's failover promise on this host's kernel (6.18: pre-content
//! events, file-backed EROFS): a ≥ 256 MiB image served by `lazy-erofs serve --backend
//! fanotify` from a real registry, 8 concurrent readers (whole files and random ranges),
//! the fetcher SIGKILLed 50 times at random 50–500 ms intervals while the machine's CPUs
//! are taken by busy loops and fetches are slowed (so kills land mid-fetch): every byte
//! identical, no read error, one restart per kill. The control turns re-sending off and
//! shows a reader of in-flight data then hangs.

mod common;
mod fanotify;

use std::fs::File;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

const FILES: usize = 8;
const FILE_SIZE: usize = 32 << 20;
const KILLS: usize = 50;

/// xorshift: reproducible pseudo-random choices.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Busy loops on every CPU, killed on drop.
struct CpuHogs(Vec<Child>);

impl CpuHogs {
    fn start() -> Result<Self> {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hogs = (0..cpus)
            .map(|_| {
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self(hogs))
    }
}

impl Drop for CpuHogs {
    fn drop(&mut self) {
        for hog in &mut self.0 {
            let _ = hog.kill();
            let _ = hog.wait();
        }
    }
}

#[derive(Default)]
struct Tally {
    whole_reads: AtomicU64,
    range_reads: AtomicU64,
    bytes: AtomicU64,
}

/// Reader `id`: reads its own file whole, then random ranges of any file, until `stop`
/// (and at least one whole pass); the first error or wrong byte ends it.
fn reader(
    id: usize,
    work: &std::path::Path,
    files: &[(String, Vec<u8>)],
    stop: &AtomicBool,
    tally: &Tally,
) -> Result<()> {
    let mut rng = Rng(0x9e37_79b9 + id as u64);
    let open: Vec<File> = files
        .iter()
        .map(|(p, _)| File::open(fanotify::path(work, p)))
        .collect::<std::io::Result<_>>()?;
    let mut passes = 0;
    while passes == 0 || !stop.load(Ordering::SeqCst) {
        let (name, expected) = &files[id];
        let got = std::fs::read(fanotify::path(work, name))
            .with_context(|| format!("reader {id}: whole read of {name}"))?;
        ensure!(got == *expected, "reader {id}: {name} differs (whole read)");
        tally.whole_reads.fetch_add(1, Ordering::Relaxed);
        tally.bytes.fetch_add(got.len() as u64, Ordering::Relaxed);
        passes += 1;
        for _ in 0..16 {
            let f = rng.below(FILES as u64) as usize;
            let len = 1 + rng.below(512 << 10) as usize;
            let offset = rng.below((FILE_SIZE - len) as u64);
            let got = fanotify::read_range(&open[f], offset, len)
                .with_context(|| format!("reader {id}: {len} bytes at {offset} of file{f}"))?;
            let want = &files[f].1[offset as usize..offset as usize + len];
            ensure!(
                got == want,
                "reader {id}: file{f} differs at {offset}+{len}"
            );
            tally.range_reads.fetch_add(1, Ordering::Relaxed);
        }
        // Page cache dropped between passes, so later passes read the data file again.
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "1");
    }
    Ok(())
}

#[test]
fn privileged_host_fanotify_fetcher_killed_50_times_readers_see_every_byte() -> Result<()> {
    let work = fanotify::work_dir()?;
    let _mounts = fanotify::MountGuard(work.path());
    let image = fanotify::pushed_image(work.path(), FILES, FILE_SIZE)?;
    let serve = fanotify::serve(work.path(), &image, Some("latency=5ms,rate=24MiB"), true)?;
    let hogs = CpuHogs::start()?;
    let stop = AtomicBool::new(false);
    let tally = Tally::default();
    let started = Instant::now();
    let mut rng = Rng(42);
    let kills = std::thread::scope(|scope| -> Result<usize> {
        let readers: Vec<_> = (0..FILES)
            .map(|id| {
                let (work, files, stop, tally) = (work.path(), &image.files, &stop, &tally);
                scope.spawn(move || reader(id, work, files, stop, tally))
            })
            .collect();
        let mut kills = 0;
        while kills < KILLS {
            std::thread::sleep(Duration::from_millis(50 + rng.below(451)));
            if readers.iter().any(|r| r.is_finished()) {
                break; // a reader failed: stop killing, report it below
            }
            serve.kill_fetcher()?;
            kills += 1;
        }
        stop.store(true, Ordering::SeqCst);
        for (id, r) in readers.into_iter().enumerate() {
            r.join()
                .map_err(|_| anyhow::anyhow!("reader {id} panicked"))?
                .with_context(|| format!("serve log:\n{}", serve.log()))?;
        }
        Ok(kills)
    })?;
    drop(hogs);
    let elapsed = started.elapsed();
    let stats = serve.stop()?;
    let restarts = stats["supervisor"]["restarts"]
        .as_u64()
        .context("restarts")?;
    let broker = &stats["broker"];
    println!(
        "fanotify failover: {kills} kills in {elapsed:.1?}, {} whole reads, {} range reads, \
         {} MiB read; supervisor {} broker {}",
        tally.whole_reads.load(Ordering::Relaxed),
        tally.range_reads.load(Ordering::Relaxed),
        tally.bytes.load(Ordering::Relaxed) >> 20,
        stats["supervisor"],
        broker
    );
    ensure!(kills == KILLS, "only {kills} kills");
    // One restart per kill, plus the stop (counted as the last child's end).
    ensure!(
        restarts == KILLS as u64,
        "restarts {restarts} != kills {KILLS}: {stats}"
    );
    ensure!(broker["denied"] == 0, "the broker denied reads: {broker}");
    let resent = broker["resent"].as_u64().unwrap_or(0);
    ensure!(
        resent > 0,
        "no kill landed while the fetcher held an event: the test did not test failover"
    );
    fanotify::keeper_gone(work.path())?;
    Ok(())
}

/// The control: with re-sending off, a read in flight when the fetcher dies never
/// completes — the failover above is what keeps readers going.
#[test]
fn privileged_host_fanotify_without_resend_a_reader_hangs() -> Result<()> {
    let work = fanotify::work_dir()?;
    let _mounts = fanotify::MountGuard(work.path());
    let image = fanotify::pushed_image(work.path(), 1, 4 << 20)?;
    let serve = fanotify::serve(work.path(), &image, Some("latency=1s"), false)?;
    let path = fanotify::path(work.path(), &image.files[0].0);
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            let result = std::fs::read(&path);
            done.store(true, Ordering::SeqCst);
            result
        })
    };
    // The read is waiting on a fetch that takes a second; kill the fetcher within it.
    std::thread::sleep(Duration::from_millis(300));
    serve.kill_fetcher()?;
    std::thread::sleep(Duration::from_secs(5));
    let hung = !done.load(Ordering::SeqCst);
    // SIGTERM: the broker denies what is pending, so the reader returns (EIO).
    let stats = serve.stop()?;
    let result = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))?;
    ensure!(
        hung,
        "without re-sending the reader still completed ({:?}): the control has no teeth",
        result.as_ref().map(Vec::len)
    );
    ensure!(
        result.is_err(),
        "the reader got bytes after a planned stop with its range unfetched"
    );
    println!("control: reader hung 5 s after the kill, then {result:?} at stop; {stats}");
    fanotify::keeper_gone(work.path())?;
    Ok(())
}
