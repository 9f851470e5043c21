//! Talking to a running daemon as an operator does: `lazy-erofs status|gc --json` and a
//! scrape of its metrics endpoint, parsed by a Prometheus parser.

// Shared by several test binaries; each uses a part.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

/// `lazy-erofs ARGS --address SOCKET --json`, parsed.
pub fn cli_json(socket: &Path, args: &[&str]) -> Result<Value> {
    let out = crate::common::run(
        std::process::Command::new(lazy_erofs_test_support::bin_exe!("lazy-erofs"))
            .args(args)
            .arg("--address")
            .arg(socket)
            .arg("--json"),
    )?;
    serde_json::from_str(&out).with_context(|| format!("lazy-erofs {args:?} printed {out}"))
}

/// `GET /metrics`, parsed by prometheus-parse; panics on text it cannot parse.
pub fn scrape(address: &str) -> Result<prometheus_parse::Scrape> {
    let mut stream = std::net::TcpStream::connect(address)?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    let (head, body) = reply.split_once("\r\n\r\n").context("no HTTP body")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(prometheus_parse::Scrape::parse(
        body.lines().map(|l| Ok(l.to_owned())),
    )?)
}

/// The sum of `name`'s samples (those with `label`, if given).
pub fn sample(scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>) -> f64 {
    use prometheus_parse::Value as V;
    let mut found = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match &s.value {
            V::Counter(v) | V::Gauge(v) | V::Untyped(v) => *v,
            V::Histogram(b) => b.last().map_or(0.0, |b| b.count),
            _ => f64::NAN,
        })
        .peekable();
    if found.peek().is_none() {
        return f64::NAN;
    }
    found.sum()
}

/// The layer `digest` of a status report.
pub fn layer<'a>(status: &'a Value, digest: &str) -> Result<&'a Value> {
    status["layers"]
        .as_array()
        .context("layers")?
        .iter()
        .find(|l| l["digest"] == digest)
        .with_context(|| format!("no layer {digest} in {status:#}"))
}

/// The cache entry `key` of a status report.
pub fn entry<'a>(status: &'a Value, key: &str) -> Result<&'a Value> {
    status["cache"]["entries"]
        .as_array()
        .context("entries")?
        .iter()
        .find(|e| e["key"] == key)
        .with_context(|| format!("no cache entry {key} in {status:#}"))
}

pub fn evicted_keys(report: &Value) -> Vec<String> {
    report["evicted"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["key"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}
