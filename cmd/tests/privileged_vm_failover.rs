//! Failover on the real kernel: reads through an EROFS-over-fscache mount stay correct
//! and error-free while `lazy-erofs serve`'s fetcher is killed again and again.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::{Serve, ServeOptions};

const MIB: usize = 1 << 20;

/// One large file and many small ones.
struct Tree {
    src: PathBuf,
    files: Vec<PathBuf>,
    big: PathBuf,
}

fn make_tree(root: &Path, big_mib: usize, small_files: usize) -> Result<Tree> {
    let src = root.join("src");
    let mut files = Vec::new();
    fs::create_dir_all(&src)?;
    let big = PathBuf::from("big.bin");
    fs::write(
        src.join(&big),
        common::pseudo_random(big_mib * MIB + 4321, 1),
    )?;
    files.push(big.clone());
    for i in 0..small_files {
        let rel = PathBuf::from(format!("small/d{:02}/f{i:05}", i % 30));
        fs::create_dir_all(src.join(&rel).parent().context("parent")?)?;
        let len = 1024 + (i * 7919) % (40 * 1024);
        fs::write(src.join(&rel), common::pseudo_random(len, i as u64 + 2))?;
        files.push(rel);
    }
    Ok(Tree { src, files, big })
}

fn build_image(work: &Path, big_mib: usize, small_files: usize) -> Result<(Tree, PathBuf)> {
    let tree = make_tree(work, big_mib, small_files)?;
    let image = work.join("image.erofs");
    common::mkfs_erofs(&image, &tree.src)?;
    Ok((tree, image))
}

/// Reads every byte of `rel` through the mount in 1 MiB steps and compares.
fn verify_file(src: &Path, mnt: &Path, rel: &Path) -> Result<()> {
    let (a, b) = (File::open(src.join(rel))?, File::open(mnt.join(rel))?);
    let (mut want, mut got) = (vec![0u8; MIB], vec![0u8; MIB]);
    let mut offset = 0u64;
    loop {
        let n = a.read_at(&mut want, offset)?;
        let mut m = 0;
        while m < n {
            let k = b
                .read_at(&mut got[m..n], offset + m as u64)
                .with_context(|| format!("{}: read at {}", rel.display(), offset + m as u64))?;
            ensure!(
                k > 0,
                "{}: short file at {}",
                rel.display(),
                offset + m as u64
            );
            m += k;
        }
        ensure!(
            want[..n] == got[..n],
            "{}: bytes differ in the MiB at {offset}",
            rel.display()
        );
        if n == 0 {
            // The source ended: the mounted file must end here too.
            let extra = b
                .read_at(&mut got[..1], offset)
                .with_context(|| format!("{}: read at EOF {offset}", rel.display()))?;
            ensure!(
                extra == 0,
                "{}: the mounted file runs past the source's end at {offset}",
                rel.display()
            );
            return Ok(());
        }
        offset += n as u64;
    }
}

/// xorshift for reader offsets and kill intervals.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Workload {
    errors: Arc<Mutex<Vec<String>>>,
    done: Arc<AtomicBool>,
    sequential_left: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// `sequential` readers verify whole files (split between them); `random` readers
/// compare random ranges of the big file until the sequential ones finish.
fn start_readers(tree: &Tree, mnt: &Path, sequential: usize, random: usize) -> Workload {
    let errors = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let sequential_left = Arc::new(AtomicUsize::new(sequential));
    let mut threads = Vec::new();
    for r in 0..sequential {
        let files: Vec<PathBuf> = tree
            .files
            .iter()
            .skip(r)
            .step_by(sequential)
            .cloned()
            .collect();
        let (src, mnt, errors, left, done) = (
            tree.src.clone(),
            mnt.to_path_buf(),
            errors.clone(),
            sequential_left.clone(),
            done.clone(),
        );
        threads.push(thread::spawn(move || {
            for rel in files {
                if let Err(err) = verify_file(&src, &mnt, &rel) {
                    errors.lock().expect("lock").push(format!("{err:#}"));
                }
            }
            if left.fetch_sub(1, Ordering::SeqCst) == 1 {
                done.store(true, Ordering::SeqCst);
            }
        }));
    }
    for r in 0..random {
        let (src, mnt, errors, done) = (
            tree.src.join(&tree.big),
            mnt.join(&tree.big),
            errors.clone(),
            done.clone(),
        );
        threads.push(thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (r as u64 + 1));
            let mut run = || -> Result<()> {
                let (a, b) = (File::open(&src)?, File::open(&mnt)?);
                let size = a.metadata()?.len();
                let (mut want, mut got) = (vec![0u8; 256 << 10], vec![0u8; 256 << 10]);
                while !done.load(Ordering::SeqCst) {
                    let len = 1 + rng.below(want.len() as u64) as usize;
                    let offset = rng.below(size - len as u64);
                    a.read_exact_at(&mut want[..len], offset)?;
                    b.read_exact_at(&mut got[..len], offset)
                        .with_context(|| format!("random read {len} at {offset}"))?;
                    ensure!(
                        want[..len] == got[..len],
                        "random read {len} at {offset}: bytes differ"
                    );
                }
                Ok(())
            };
            if let Err(err) = run() {
                errors.lock().expect("lock").push(format!("{err:#}"));
            }
        }));
    }
    Workload {
        errors,
        done,
        sequential_left,
        threads,
    }
}

#[test]
fn privileged_vm_readers_survive_50_fetcher_kills_byte_identical() -> Result<()> {
    let work = common::scratch()?;
    let started = Instant::now();
    let (tree, image) = build_image(work.path(), 200, 3000)?;
    let image_mib = fs::metadata(&image)?.len() >> 20;
    println!(
        "image: {image_mib} MiB, {} files, built in {:?}",
        tree.files.len(),
        started.elapsed()
    );
    ensure!(image_mib >= 256, "image too small: {image_mib} MiB");
    let dmesg_before = common::dmesg_lines()?.len();
    // Slow enough that kills land mid-READ: every fetch waits 20 ms and the bandwidth cap
    // (16 MiB/s) keeps the readers busy for well over 50 kill intervals.
    let serve = Serve::start(
        work.path(),
        ServeOptions {
            throttle: Some("latency=20ms,rate=16MiB"),
            ..ServeOptions::blob("seed", &image)
        },
    )?;
    let mnt = work.path().join("mnt");
    common::mount_ok("seed", &mnt)?;

    let workload = start_readers(&tree, &mnt, 4, 4);
    let mut rng = Rng(0xfeed_beef);
    let mut kills = 0;
    while !workload.done.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(50 + rng.below(451)));
        if workload.done.load(Ordering::SeqCst) {
            break;
        }
        serve.kill_fetcher()?;
        kills += 1;
    }
    for t in workload.threads {
        t.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
    }
    let errors = workload.errors.lock().expect("lock").clone();
    println!("kills: {kills}, readers done in {:?}", started.elapsed());
    common::umount(&mnt)?;
    let stats = serve.stop()?;
    println!("stats: {stats}");
    assert!(
        errors.is_empty(),
        "{} read errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(workload.sequential_left.load(Ordering::SeqCst), 0);
    assert!(
        kills >= 50,
        "only {kills} kills landed before the readers finished"
    );
    assert_eq!(stats["restores"], kills, "one restore per kill");
    assert_eq!(stats["reads_failed"], 0);
    let trouble = common::kernel_trouble_since(dmesg_before)?;
    assert!(trouble.is_empty(), "kernel log: {trouble:#?}");
    Ok(())
}

/// The same kills without `restore`: a reader whose READ was in flight must hang (or
/// fail). If this passes as if nothing were wrong, the test above proves nothing.
#[test]
fn privileged_vm_control_without_restore_readers_hang_or_fail() -> Result<()> {
    let work = common::scratch()?;
    let (tree, image) = build_image(work.path(), 32, 0)?;
    let serve = Serve::start(
        work.path(),
        ServeOptions {
            throttle: Some("latency=300ms,rate=8MiB"),
            no_restore: true,
            ..ServeOptions::blob("ctl", &image)
        },
    )?;
    let mnt = work.path().join("mnt");
    common::mount_ok("ctl", &mnt)?;
    let workload = start_readers(&tree, &mnt, 1, 0);
    let mut rng = Rng(0xc0ff_ee11);
    for _ in 0..5 {
        thread::sleep(Duration::from_millis(400 + rng.below(300)));
        if workload.done.load(Ordering::SeqCst) {
            break;
        }
        serve.kill_fetcher()?;
    }
    // With restore the rest takes about 5 s; give it 15 s (below the 30 s hung-task limit).
    let deadline = Instant::now() + Duration::from_secs(15);
    while !workload.done.load(Ordering::SeqCst) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let hung = !workload.done.load(Ordering::SeqCst);
    // Closing the device fails the stuck READs, which frees the reader.
    let _ = serve.stop();
    for t in workload.threads {
        let _ = t.join();
    }
    let errors = workload.errors.lock().expect("lock").clone();
    let _ = std::process::Command::new("umount")
        .arg("-l")
        .arg(&mnt)
        .status();
    println!("hung: {hung}, errors: {errors:?}");
    assert!(
        hung || !errors.is_empty(),
        "without restore the readers finished cleanly: the kill test has no teeth"
    );
    Ok(())
}

fn fault_run(fault: &str) -> Result<()> {
    let work = common::scratch()?;
    let (tree, image) = build_image(work.path(), 8, 50)?;
    let serve = Serve::start(
        work.path(),
        ServeOptions {
            fault: Some(fault),
            ..ServeOptions::blob("fault", &image)
        },
    )?;
    let mnt = work.path().join("mnt");
    let out = common::mount_fsid("fault", &mnt)?;
    ensure!(
        out.status.success(),
        "mount with {fault}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        serve.log()
    );
    for rel in &tree.files {
        verify_file(&tree.src, &mnt, rel)?;
    }
    common::umount(&mnt)?;
    let log = serve.log();
    let stats = serve.stop()?;
    assert!(
        log.contains("injected fault"),
        "the fault never fired:\n{log}"
    );
    assert_eq!(stats["restores"], 1, "{stats}");
    assert_eq!(stats["reads_failed"], 0, "{stats}");
    Ok(())
}

#[test]
fn privileged_vm_crash_during_open_mount_still_succeeds() -> Result<()> {
    fault_run("crash-in-open:1")
}

#[test]
fn privileged_vm_crash_between_write_and_read_complete_bytes_identical() -> Result<()> {
    fault_run("crash-after-write:3")
}
