//! Benchmark of lazy reads through `lazy-erofs serve` on the real kernel (run it in the
//! test VM: `bash packaging/bench.sh`). Prints figures; asserts nothing about speed.
//!
//! Same image, same VM run: cold sequential read through the lazy mount vs the same
//! image mounted file-backed (the limit); warm re-read after drop_caches vs the limit;
//! READ round trip p50/p99; fetcher kill → first completed READ p50/p99; fetcher RSS.
//! Then the same file as a lazy layer converted with 1 MiB, 4 KiB and 4 MiB chunks, read
//! cold from a `docker-registry` in the VM (every byte verified), traced.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/fanotify/mod.rs"]
mod fanotify;
#[path = "util/mod.rs"]
mod util;

use std::fs;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use common::{Serve, ServeOptions};
use util::{mb_per_s, read_all};

const IMAGE_MIB: usize = 256;

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // cargo bench --list
    }
    let work = common::scratch()?;
    let src = work.path().join("src");
    fs::create_dir_all(&src)?;
    fs::write(
        src.join("big.bin"),
        common::pseudo_random(IMAGE_MIB << 20, 42),
    )?;
    let image = work.path().join("bench.erofs");
    common::mkfs_erofs(&image, &src)?;
    let file = Path::new("big.bin");

    // The limit: the same image mounted file-backed (all bytes already local).
    let limit_mnt = work.path().join("limit");
    fs::create_dir_all(&limit_mnt)?;
    nix::mount::mount(
        Some(&image),
        &limit_mnt,
        Some("erofs"),
        nix::mount::MsFlags::MS_RDONLY,
        None::<&str>,
    )
    .context("file-backed erofs mount")?;
    common::drop_caches()?;
    let (bytes, limit_first) = read_all(&limit_mnt.join(file))?;
    common::drop_caches()?;
    let (_, limit_warm) = read_all(&limit_mnt.join(file))?;

    // Lazy: every byte arrives through OPEN/READ from the fetcher (local source).
    let serve = Serve::start(work.path(), ServeOptions::blob("bench", &image))?;
    let mnt = work.path().join("lazy");
    common::mount_ok("bench", &mnt)?;
    common::drop_caches()?;
    let (lazy_bytes, lazy_cold) = read_all(&mnt.join(file))?;
    ensure!(
        lazy_bytes == bytes,
        "lazy read {lazy_bytes} bytes, expected {bytes}"
    );
    common::drop_caches()?;
    let (_, lazy_warm) = read_all(&mnt.join(file))?;
    common::umount(&mnt)?;
    let stats = serve.stop()?;

    // The same cold read with readahead off (the fetcher before it read ahead) and with
    // the earlier default window of 4 MiB.
    let mut others = Vec::new();
    for (readahead, bytes_ahead) in [("off", 0u64), ("4096k", 4 << 20)] {
        let dir = work.path().join(format!("readahead-{readahead}"));
        fs::create_dir_all(&dir)?;
        let config = dir.join("config.toml");
        fs::write(&config, format!("[fetch]\nreadahead = {bytes_ahead}\n"))?;
        let serve = Serve::start(
            &dir,
            ServeOptions {
                extra_args: vec!["--config".into(), config.display().to_string()],
                ..ServeOptions::blob("bench", &image)
            },
        )?;
        let mnt = dir.join("lazy");
        common::mount_ok("bench", &mnt)?;
        common::drop_caches()?;
        let (got, took) = read_all(&mnt.join(file))?;
        ensure!(got == bytes, "readahead {readahead}: read {got} bytes");
        common::umount(&mnt)?;
        serve.stop()?;
        others.push((readahead, took));
    }

    // Failover: a fresh cache, a reader, the fetcher killed every 300 ms.
    let failover_dir = work.path().join("failover");
    fs::create_dir_all(&failover_dir)?;
    let serve = Serve::start(
        &failover_dir,
        ServeOptions {
            throttle: Some("latency=5ms,rate=64MiB"),
            ..ServeOptions::blob("bench", &image)
        },
    )?;
    let mnt = failover_dir.join("mnt");
    common::mount_ok("bench", &mnt)?;
    let (failover_took, kills) =
        util::read_under_kills(mnt.join(file), bytes, || serve.kill_fetcher())?;
    common::umount(&mnt)?;
    let failover = serve.stop()?;

    // The limit read again after the lazy runs; the faster of the two counts (the VM's
    // disk speed drifts within a run: the ratio must not flatter the lazy read).
    common::drop_caches()?;
    let (_, limit_last) = read_all(&limit_mnt.join(file))?;
    common::umount(&limit_mnt)?;
    let limit_cold = limit_first.min(limit_last);

    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    println!("lazy-erofs ondemand benchmark ({IMAGE_MIB} MiB file, release build, test VM)");
    println!(
        "cold sequential read   lazy {:7.1} MB/s   file-backed limit {:7.1} MB/s \
         (first {:.1}, last {:.1})",
        mb_per_s(bytes, lazy_cold),
        mb_per_s(bytes, limit_cold),
        mb_per_s(bytes, limit_first),
        mb_per_s(bytes, limit_last)
    );
    println!(
        "warm re-read (dropped) lazy {:7.1} MB/s   file-backed limit {:7.1} MB/s",
        mb_per_s(bytes, lazy_warm),
        mb_per_s(bytes, limit_warm)
    );
    println!(
        "READ round trip        p50 {:.2} ms   p99 {:.2} ms   ({} READs, 1 MiB fetch chunks)",
        f(&stats, "read_p50_ms"),
        f(&stats, "read_p99_ms"),
        stats["reads_served"]
    );
    println!(
        "fetcher kill -> first completed READ   p50 {:.1} ms   p99 {:.1} ms   ({} kills, {} gaps measured, 5 ms + 64 MiB/s source; reader took {:.1} s)",
        f(&failover, "failover_p50_ms"),
        f(&failover, "failover_p99_ms"),
        kills,
        failover["failover_gaps"],
        failover_took.as_secs_f64()
    );
    println!(
        "fetcher peak RSS       {} KiB (unthrottled run)   {} KiB (kill run)",
        stats["fetcher_peak_rss_kib"], failover["fetcher_peak_rss_kib"]
    );
    let limit = mb_per_s(bytes, limit_cold);
    for (readahead, took) in others.into_iter().chain([("on", lazy_cold)]) {
        let lazy = mb_per_s(bytes, took);
        println!(
            "cold_read backend=cachefiles chunk_kib=1024 readahead={readahead} \
             lazy_mb_s={lazy:.1} limit_mb_s={limit:.1} ratio={:.2}",
            lazy / limit
        );
    }
    registry_rows(work.path(), limit)
}

/// Cold reads of the file as a converted lazy layer served from a registry in the VM, at
/// the default chunk size, the smallest and a large one, each on a fresh cache, traced.
/// Under emulation the registry itself is slow: its own speed is printed beside.
fn registry_rows(work: &Path, limit: f64) -> Result<()> {
    for chunk_kib in [1024u32, 4, 4096] {
        let dir = work.join(format!("registry-{chunk_kib}k"));
        fs::create_dir_all(&dir)?;
        let image = fanotify::pushed_image_chunked(&dir, 1, IMAGE_MIB << 20, chunk_kib << 10)?;
        let name = &image.files[0].0;
        let serve_dir = dir.join("lazy");
        fs::create_dir_all(&serve_dir)?;
        let log = Some("info,read_trace=debug");
        let serve = fanotify::serve_on("cachefiles", &serve_dir, &image, None, true, &[], log)?;
        common::drop_caches()?;
        let (got, took) = read_all(&fanotify::path(&serve_dir, name))?;
        ensure!(
            got == image.files[0].1.len() as u64,
            "{chunk_kib} KiB chunks: read {got} bytes"
        );
        let trace = serve.log();
        serve.stop()?;
        let registry_alone = util::registry_get_mb_s(&dir, &image)?;
        let what = format!("backend=cachefiles source=registry chunk_kib={chunk_kib} readahead=on");
        let lazy = mb_per_s(got, took);
        println!(
            "cold_read {what} lazy_mb_s={lazy:.1} limit_mb_s={limit:.1} ratio={:.2} \
             registry_mb_s={registry_alone:.1}",
            lazy / limit
        );
        println!("{}", util::trace_breakdown(&trace, &what));
    }
    Ok(())
}
