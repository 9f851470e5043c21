//! Benchmark of lazy reads through `lazy-erofs serve --backend fanotify` on this host's
//! kernel (6.14+, as root; `bash packaging/bench.sh`), from a real registry on loopback.
//! Prints figures; asserts nothing about speed.
//!
//! Same run: cold sequential read through the lazy mount vs the same file in a local
//! image mounted file-backed (the limit); re-read after the page cache is dropped (every
//! range present: answered by the broker at once); 4 KiB read latency of present ranges
//! vs the limit; fetcher kill → first completed read p50/p99; peak RSS of the broker
//! (serve) and the fetcher.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/fanotify/mod.rs"]
mod fanotify;
#[path = "util/mod.rs"]
mod util;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use util::{mb_per_s, read_all, registry_get_mb_s};

const IMAGE_MIB: usize = 256;

/// p50 and p99 of 4 KiB reads at spread offsets, each after the page cache is dropped
/// (so every read reaches the backing file), in microseconds.
fn page_read_latency(path: &Path) -> Result<(f64, f64)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut buf = vec![0u8; 4096];
    let mut took = Vec::new();
    for i in 0..100u64 {
        let offset = (i * 7919 * 4096) % (size - 4096);
        common::drop_caches()?;
        let start = Instant::now();
        file.read_exact_at(&mut buf, offset)?;
        took.push(start.elapsed());
    }
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    Ok((at(0.5), at(0.99)))
}

fn peak_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // cargo bench --list
    }
    let work = fanotify::work_dir()?;
    let _mounts = fanotify::MountGuard(work.path());
    let image = fanotify::pushed_image(work.path(), 1, IMAGE_MIB << 20)?;
    let name = &image.files[0].0;

    // The limit: the same bytes in a local image mounted file-backed.
    let local = work.path().join("local");
    fs::create_dir_all(local.join("src/data"))?;
    fs::write(local.join("src").join(name), &image.files[0].1)?;
    common::mkfs_erofs(&local.join("image.erofs"), &local.join("src"))?;
    let limit_mnt = local.join("mnt");
    fs::create_dir_all(&limit_mnt)?;
    nix::mount::mount(
        Some(&local.join("image.erofs")),
        &limit_mnt,
        Some("erofs"),
        nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .context("file-backed erofs mount")?;
    common::drop_caches()?;
    let (bytes, limit_first) = read_all(&limit_mnt.join(name))?;
    let (limit_p50, limit_p99) = page_read_latency(&limit_mnt.join(name))?;

    // Lazy: every data byte fetched from the registry on the reader's demand.
    let lazy_dir = work.path().join("lazy");
    fs::create_dir_all(&lazy_dir)?;
    let serve = fanotify::serve(&lazy_dir, &image, None, true)?;
    let path = fanotify::path(&lazy_dir, name);
    common::drop_caches()?;
    let (lazy_bytes, lazy_cold) = read_all(&path)?;
    ensure!(
        lazy_bytes == bytes,
        "lazy read {lazy_bytes} bytes, expected {bytes}"
    );
    common::drop_caches()?;
    let (_, reread) = read_all(&path)?;
    let (present_p50, present_p99) = page_read_latency(&path)?;
    let broker_rss = peak_rss_kib(serve.pid());
    let stats = serve.stop()?;
    fanotify::keeper_gone(&lazy_dir)?;

    // Failover: a fresh cache, a reader, the fetcher killed every 300 ms.
    let kill_dir = work.path().join("kills");
    fs::create_dir_all(&kill_dir)?;
    let serve = fanotify::serve(&kill_dir, &image, Some("latency=5ms,rate=64MiB"), true)?;
    let (kill_took, kills) =
        util::read_under_kills(fanotify::path(&kill_dir, name), bytes, || {
            serve.kill_fetcher()
        })?;
    let failover = serve.stop()?;
    fanotify::keeper_gone(&kill_dir)?;

    // The limit read again; the faster of the two counts (the disk's speed drifts within
    // a run: the ratio must not flatter the lazy read).
    common::drop_caches()?;
    let (_, limit_last) = read_all(&limit_mnt.join(name))?;
    common::umount(&limit_mnt)?;
    let limit_cold = limit_first.min(limit_last);
    let registry_alone = registry_get_mb_s(work.path(), &image)?;

    let f = |v: &serde_json::Value, k: &str| v["supervisor"][k].as_f64().unwrap_or(f64::NAN);
    let (lazy, limit) = (mb_per_s(bytes, lazy_cold), mb_per_s(bytes, limit_cold));
    println!(
        "lazy-erofs fanotify benchmark ({IMAGE_MIB} MiB file, docker-registry on loopback, \
         release build, host kernel)"
    );
    println!(
        "cold sequential read   lazy {lazy:7.1} MB/s   file-backed limit {limit:7.1} MB/s \
         (first {:.1}, last {:.1})",
        mb_per_s(bytes, limit_first),
        mb_per_s(bytes, limit_last)
    );
    println!(
        "the registry alone     {registry_alone:7.1} MB/s (one GET of the whole blob, \
         page cache dropped)"
    );
    println!(
        "re-read (page cache dropped, all present) {:7.1} MB/s",
        mb_per_s(bytes, reread)
    );
    println!(
        "4 KiB read, present range   p50 {present_p50:.0} us   p99 {present_p99:.0} us   \
         (limit p50 {limit_p50:.0} us   p99 {limit_p99:.0} us)"
    );
    println!(
        "fetcher kill -> first completed read   p50 {:.1} ms   p99 {:.1} ms   ({kills} kills, \
         {} gaps measured, 5 ms + 64 MiB/s source; reader took {:.1} s)",
        f(&failover, "failover_p50_ms"),
        f(&failover, "failover_p99_ms"),
        failover["supervisor"]["failover_gaps"],
        kill_took.as_secs_f64()
    );
    println!(
        "peak RSS   broker (serve) {broker_rss} KiB   fetcher {} KiB",
        stats["supervisor"]["fetcher_peak_rss_kib"]
    );
    // Cold reads again, each on a fresh cache, traced: the blob converted with the
    // default, the smallest and a large chunk size; readahead off (the fetcher before it
    // read ahead), the earlier default window of 4 MiB and on (the default), same run.
    let off = work.path().join("readahead-off.toml");
    fs::write(&off, "[fetch]\nreadahead = 0\n")?;
    let small = work.path().join("readahead-4096k.toml");
    fs::write(&small, format!("[fetch]\nreadahead = {}\n", 4 << 20))?;
    for chunk_kib in [1024u32, 4, 4096] {
        let dir = work.path().join(format!("chunks-{chunk_kib}"));
        fs::create_dir_all(&dir)?;
        let chunked;
        let image = if chunk_kib == 1024 {
            &image
        } else {
            chunked = fanotify::pushed_image_chunked(&dir, 1, IMAGE_MIB << 20, chunk_kib << 10)?;
            &chunked
        };
        for (readahead, args) in [
            (
                "off",
                vec!["--config".to_owned(), off.display().to_string()],
            ),
            (
                "4096k",
                vec!["--config".to_owned(), small.display().to_string()],
            ),
            ("on", Vec::new()),
        ] {
            let serve_dir = dir.join(format!("lazy-{readahead}"));
            fs::create_dir_all(&serve_dir)?;
            let log = Some("info,read_trace=debug");
            let serve = fanotify::serve_on("fanotify", &serve_dir, image, None, true, &args, log)?;
            common::drop_caches()?;
            let (lazy_bytes, took) = read_all(&fanotify::path(&serve_dir, name))?;
            ensure!(
                lazy_bytes == bytes,
                "{chunk_kib} KiB chunks: read {lazy_bytes} bytes"
            );
            let trace = serve.log();
            serve.stop()?;
            fanotify::keeper_gone(&serve_dir)?;
            let what = format!("backend=fanotify chunk_kib={chunk_kib} readahead={readahead}");
            let lazy = mb_per_s(bytes, took);
            println!(
                "cold_read {what} lazy_mb_s={lazy:.1} limit_mb_s={limit:.1} ratio={:.2} \
                 registry_mb_s={registry_alone:.1}",
                lazy / limit
            );
            println!("{}", util::trace_breakdown(&trace, &what));
        }
    }
    Ok(())
}
