//! Proves the test VM's kernel and this crate's device layer end to end: bind an
//! ondemand cache, serve a small EROFS image (made by mkfs.erofs) through OPEN / READ /
//! CLOSE with a minimal in-test server, and read every file back through the mount.
//! Needs root and a kernel with CACHEFILES_ONDEMAND: run inside packaging/testvm.

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lazy_erofs_ondemand::{AlignedBuf, AnonFd, Device, Request};
use lazy_erofs_test_support::pseudo_random;
use nix::errno::Errno;

#[derive(Default)]
struct Counters {
    opens: AtomicU64,
    refused: AtomicU64,
    reads: AtomicU64,
    closes: AtomicU64,
}

/// A minimal ondemand server: one thread, one request at a time, blobs from local files.
struct MiniServer {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: Option<thread::JoinHandle<Result<()>>>,
}

impl MiniServer {
    fn start(cache: &Path, blobs: HashMap<Vec<u8>, PathBuf>) -> Result<Self> {
        let device = Device::bind(cache, "lazy-erofs-test").context("bind ondemand cache")?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let thread = {
            let (stop, counters) = (stop.clone(), counters.clone());
            thread::spawn(move || serve(&device, &blobs, &stop, &counters))
        };
        Ok(Self {
            stop,
            counters,
            thread: Some(thread),
        })
    }

    fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => bail!("server thread panicked"),
            None => Ok(()),
        }
    }
}

fn serve(
    device: &Device,
    blobs: &HashMap<Vec<u8>, PathBuf>,
    stop: &AtomicBool,
    counters: &Counters,
) -> Result<()> {
    let mut objects: HashMap<u32, (AnonFd, File)> = HashMap::new();
    let mut buf = AlignedBuf::new(1 << 20);
    let mut msg = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match device.next_request(&mut msg, Duration::from_millis(50))? {
            None => {}
            Some(Request::Open { open, anon }) => match blobs.get(&open.cookie_key) {
                Some(path) => {
                    let file = File::open(path)?;
                    let size = file.metadata()?.len();
                    objects.insert(open.object_id, (anon, file));
                    device.copen(open.msg_id, Ok(size))?;
                    counters.opens.fetch_add(1, Ordering::SeqCst);
                }
                None => {
                    device.copen(open.msg_id, Err(Errno::ENOENT))?;
                    counters.refused.fetch_add(1, Ordering::SeqCst);
                }
            },
            Some(Request::Read(read)) => {
                let (anon, file) = objects
                    .get(&read.object_id)
                    .context("READ for an object never opened")?;
                let len = usize::try_from(read.len)?;
                if buf.len() < len {
                    buf = AlignedBuf::new(len);
                }
                let chunk = &mut buf[..len];
                let mut filled = 0;
                while filled < len {
                    let n = file.read_at(&mut chunk[filled..], read.offset + filled as u64)?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                chunk[filled..].fill(0);
                anon.write_all_at(chunk, read.offset)?;
                anon.complete(read.msg_id)?;
                counters.reads.fetch_add(1, Ordering::SeqCst);
            }
            Some(Request::Close(close)) => {
                objects.remove(&close.object_id);
                counters.closes.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    Ok(())
}

fn scratch_dir() -> Result<tempfile::TempDir> {
    let scratch = std::env::var_os("LAZY_EROFS_SCRATCH").context(
        "LAZY_EROFS_SCRATCH unset: this test runs in the test VM (packaging/testvm/run.sh)",
    )?;
    ensure!(
        Path::new("/dev/cachefiles").exists(),
        "/dev/cachefiles missing: this kernel lacks cachefiles ondemand mode"
    );
    Ok(tempfile::tempdir_in(scratch)?)
}

fn make_tree(src: &Path) -> Result<()> {
    fs::create_dir_all(src.join("dir/nested/deeper"))?;
    fs::write(
        src.join("big.bin"),
        pseudo_random(3 * 1024 * 1024 + 123, 0x5eed),
    )?;
    fs::write(src.join("dir/hello.txt"), "hello from the lazy layer\n")?;
    fs::write(
        src.join("dir/nested/deeper/page.bin"),
        pseudo_random(4096, 7),
    )?;
    fs::write(src.join("empty"), "")?;
    std::os::unix::fs::symlink("dir/hello.txt", src.join("link"))?;
    Ok(())
}

fn run(cmd: &mut Command) -> Result<std::process::Output> {
    let out = cmd.output().with_context(|| format!("spawn {cmd:?}"))?;
    Ok(out)
}

fn mkfs_erofs(image: &Path, src: &Path) -> Result<()> {
    lazy_erofs_test_support::mkfs_erofs(image, src).map_err(anyhow::Error::msg)
}

fn mount_fsid(fsid: &str, mnt: &Path) -> Result<std::process::Output> {
    fs::create_dir_all(mnt)?;
    run(Command::new("timeout")
        .args(["60", "mount", "-t", "erofs", "none", "-o"])
        .arg(format!("fsid={fsid}"))
        .arg(mnt))
}

fn umount(mnt: &Path) -> Result<()> {
    let out = run(Command::new("umount").arg(mnt))?;
    ensure!(
        out.status.success(),
        "umount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Compares every entry under `src` with the same path under `mnt`; returns files read.
fn compare_tree(src: &Path, mnt: &Path) -> Result<usize> {
    let mut compared = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (s, m) = (src.join(&rel), mnt.join(&rel));
        let meta = fs::symlink_metadata(&s)?;
        let mmeta = fs::symlink_metadata(&m).with_context(|| format!("{} missing", m.display()))?;
        ensure!(
            meta.file_type() == mmeta.file_type(),
            "{}: file type differs",
            rel.display()
        );
        if meta.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&s)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()?;
            let mut mnames: Vec<_> = fs::read_dir(&m)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()?;
            names.sort();
            mnames.sort();
            ensure!(
                names == mnames,
                "{}: entries differ: {names:?} vs {mnames:?}",
                rel.display()
            );
            stack.extend(names.into_iter().map(|n| rel.join(n)));
        } else if meta.is_symlink() {
            ensure!(
                fs::read_link(&s)? == fs::read_link(&m)?,
                "{}: link target differs",
                rel.display()
            );
        } else {
            let (a, b) = (
                fs::read(&s)?,
                fs::read(&m).with_context(|| format!("read {}", m.display()))?,
            );
            ensure!(
                a == b,
                "{}: {} source bytes vs {} read back, contents differ",
                rel.display(),
                a.len(),
                b.len()
            );
            compared += 1;
        }
    }
    Ok(compared)
}

fn wait_for(what: &str, timeout: Duration, cond: impl Fn() -> bool) -> Result<()> {
    let start = Instant::now();
    while !cond() {
        ensure!(start.elapsed() < timeout, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[test]
fn privileged_vm_erofs_over_fscache_reads_back_identical() -> Result<()> {
    let work = scratch_dir()?;
    let (src, image, cache, mnt) = (
        work.path().join("src"),
        work.path().join("tiny.erofs"),
        work.path().join("cache"),
        work.path().join("mnt"),
    );
    make_tree(&src)?;
    mkfs_erofs(&image, &src)?;
    fs::create_dir_all(&cache)?;
    let server = MiniServer::start(&cache, HashMap::from([(b"tiny".to_vec(), image.clone())]))?;

    let out = mount_fsid("tiny", &mnt)?;
    ensure!(
        out.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let files = compare_tree(&src, &mnt)?;
    assert_eq!(files, 4, "regular files compared");
    let c = &server.counters;
    assert_eq!(c.opens.load(Ordering::SeqCst), 1, "one OPEN for the image");
    let reads = c.reads.load(Ordering::SeqCst);
    assert!(reads > 0, "the kernel asked for data");

    // Once written, ranges are the cache's: after dropping the page cache a second pass
    // is served by the kernel without asking us again.
    fs::write("/proc/sys/vm/drop_caches", "3")?;
    compare_tree(&src, &mnt)?;
    assert_eq!(
        c.reads.load(Ordering::SeqCst),
        reads,
        "second pass sent READs"
    );

    umount(&mnt)?;
    wait_for("CLOSE after umount", Duration::from_secs(10), || {
        c.closes.load(Ordering::SeqCst) == 1
    })?;
    server.stop()
}

#[test]
fn privileged_vm_unknown_fsid_is_refused_and_the_mount_fails() -> Result<()> {
    let work = scratch_dir()?;
    let cache = work.path().join("cache");
    fs::create_dir_all(&cache)?;
    let server = MiniServer::start(&cache, HashMap::new())?;
    let out = mount_fsid("no-such-blob", &work.path().join("mnt"))?;
    assert!(!out.status.success(), "mount of an unknown blob succeeded");
    assert_ne!(
        out.status.code(),
        Some(124),
        "mount hung instead of failing"
    );
    assert_eq!(
        server.counters.refused.load(Ordering::SeqCst),
        1,
        "OPEN refused with copen -ENOENT"
    );
    server.stop()
}
