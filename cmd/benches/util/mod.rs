//! Shared by the lazy-read benchmarks.
#![allow(dead_code)] // each benchmark uses a different subset

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Reads `path` to the end in 1 MiB reads: (bytes, time taken).
pub fn read_all(path: &Path) -> Result<(u64, Duration)> {
    let start = Instant::now();
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok((total, start.elapsed()))
}

/// Reads `path` to the end (as [`read_all`]) on a thread while `kill` SIGKILLs the
/// fetcher every 300 ms, at most 30 times; checks the bytes read are `bytes`. Returns
/// the read's time and the kills.
pub fn read_under_kills(
    path: std::path::PathBuf,
    bytes: u64,
    mut kill: impl FnMut() -> Result<()>,
) -> Result<(Duration, u32)> {
    let reader = std::thread::spawn(move || read_all(&path));
    let mut kills = 0;
    while !reader.is_finished() && kills < 30 {
        std::thread::sleep(Duration::from_millis(300));
        if !reader.is_finished() {
            kill()?;
            kills += 1;
        }
    }
    let (read, took) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    anyhow::ensure!(read == bytes, "reader under kills got {read} bytes");
    Ok((took, kills))
}

pub fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

/// The per-READ trace of a log (`RUST_LOG=…,read_trace=debug`) summed into one line a
/// script can read: READs, fetched units and data reads, and the milliseconds each stage
/// took in all (stages of concurrent READs overlap, so sums exceed the wall time).
pub fn trace_breakdown(log: &str, what: &str) -> String {
    use std::collections::BTreeMap;
    let mut count: BTreeMap<&str, u64> = BTreeMap::new();
    let mut sum_us: BTreeMap<&str, u64> = BTreeMap::new();
    for line in log.lines() {
        let Some((_, rest)) = line.split_once("read_trace: ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(kind) = words.next() else { continue };
        *count.entry(kind).or_default() += 1;
        for (key, value) in words.filter_map(|w| w.split_once('=')) {
            if let (Some(stage), Ok(us)) = (key.strip_suffix("_us"), value.parse::<u64>()) {
                *sum_us.entry(stage).or_default() += us;
            }
        }
    }
    let mut out = format!("read_trace {what}");
    for (kind, name) in [
        ("read", "reads"),
        ("unit", "units"),
        ("data", "datas"),
        ("range_body", "requests"),
    ] {
        out += &format!(" {name}={}", count.get(kind).copied().unwrap_or(0));
    }
    for stage in [
        "total",
        "queue",
        "wait",
        "complete",
        "source",
        "write",
        "range",
        "decompress",
        "verify",
        // Of the range requests: until the registry's headers, and the whole body.
        "headers",
        "body",
    ] {
        let ms = sum_us.get(stage).copied().unwrap_or(0) as f64 / 1000.0;
        out += &format!(" {stage}_ms={ms:.1}");
    }
    out
}

/// The largest file under `dir` (the registry's copy of the layer blob) and its size.
pub fn largest_file(dir: &Path) -> Result<(std::path::PathBuf, u64)> {
    let mut best = (dir.to_path_buf(), 0);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let found = if entry.file_type()?.is_dir() {
            largest_file(&entry.path())?
        } else {
            (entry.path(), entry.metadata()?.len())
        };
        if found.1 > best.1 {
            best = found;
        }
    }
    Ok(best)
}

/// What the registry alone delivers here: one GET of the whole layer blob with the page
/// cache dropped (MB/s), by curl.
pub fn registry_get_mb_s(work: &Path, image: &crate::fanotify::Image) -> Result<f64> {
    let (data, size) = largest_file(&work.join("registry"))?;
    let digest = data
        .parent()
        .and_then(Path::file_name)
        .and_then(|d| d.to_str())
        .context("blob path")?;
    let repo = image
        .reference
        .strip_prefix(&format!("{}/", image.registry.host))
        .and_then(|r| r.split(':').next())
        .context("repository")?;
    let url = format!(
        "http://{}/v2/{repo}/blobs/sha256:{digest}",
        image.registry.host
    );
    crate::common::drop_caches()?;
    let start = Instant::now();
    let out = std::process::Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "-w", "%{size_download}", &url])
        .output()?;
    let took = start.elapsed();
    let got: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    anyhow::ensure!(got == size, "curl {url}: {got} of {size} bytes");
    Ok(mb_per_s(size, took))
}
