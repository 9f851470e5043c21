//! Shared by the lazy-read benchmarks.
#![allow(dead_code)] // each benchmark uses a different subset

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;

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
    for kind in ["read", "unit", "data"] {
        out += &format!(" {kind}s={}", count.get(kind).copied().unwrap_or(0));
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
    ] {
        let ms = sum_us.get(stage).copied().unwrap_or(0) as f64 / 1000.0;
        out += &format!(" {stage}_ms={ms:.1}");
    }
    out
}
