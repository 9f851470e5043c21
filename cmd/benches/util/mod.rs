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
