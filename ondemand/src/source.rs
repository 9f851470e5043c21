//! Where blob bytes come from. The fetcher asks a [`BlobSource`] for byte ranges; this
//! crate has a local-file source (tests, benchmarks, `lazy-erofs serve`) and a throttle
//! wrapper; the registry-backed source lives where `image` and `ondemand` meet.

use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::sys::AlignedBuf;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot open blob {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {len} bytes at {offset}: {source}")]
    Read {
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("blob truncated: wanted {len} bytes at {offset}, only {got} there")]
    Truncated { offset: u64, len: usize, got: usize },
    #[error("bad blob description for {name}: {reason}")]
    BadSpec { name: String, reason: String },
    #[error("blob {name}: {reason}")]
    Unavailable { name: String, reason: String },
    /// The bytes fetched failed their digest check: never served.
    #[error("blob {name}: {reason}")]
    Unverified { name: String, reason: String },
}

/// Ranged, verified access to one blob.
#[async_trait]
pub trait BlobSource: Send + Sync + fmt::Debug {
    /// The blob's size: what the kernel is told in `copen`.
    fn size(&self) -> u64;
    /// Where the bytes come from, for log lines (e.g. the registry and blob).
    fn origin(&self) -> String;
    /// `len` bytes at `offset`, in a page-aligned buffer (ready for the anon fd). Must
    /// return exactly what the blob holds there, or an error: never partial bytes.
    async fn read_at(&self, offset: u64, len: usize) -> Result<AlignedBuf, SourceError>;
    /// The size of the pieces the blob is stored and verified in, if it has them: a
    /// fetch of part of one costs the whole piece, so the fetcher fetches whole ones.
    fn piece_size(&self) -> Option<u64> {
        None
    }
    /// Bytes at the start that the blob's image reads as it starts: fetched as soon as
    /// the object is opened, before anyone asks (0: none).
    fn startup_len(&self) -> u64 {
        0
    }
}

/// A blob in a local file.
#[derive(Debug)]
pub struct FileSource {
    file: Arc<File>,
    path: PathBuf,
    size: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let open_err = |source| SourceError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        Ok(Self {
            file: Arc::new(file),
            path: path.to_owned(),
            size,
        })
    }
}

#[async_trait]
impl BlobSource for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn origin(&self) -> String {
        format!("file {}", self.path.display())
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<AlignedBuf, SourceError> {
        let file = self.file.clone();
        let read = move || {
            let mut buf = AlignedBuf::new(len);
            let mut got = 0;
            while got < len {
                match file.read_at(&mut buf[got..len], offset + got as u64) {
                    Ok(0) => return Err(SourceError::Truncated { offset, len, got }),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(source) => {
                        return Err(SourceError::Read {
                            offset,
                            len,
                            source,
                        });
                    }
                }
            }
            Ok(buf)
        };
        tokio::task::spawn_blocking(read)
            .await
            .map_err(|e| SourceError::Read {
                offset,
                len,
                source: std::io::Error::other(e),
            })?
    }
}

/// Added latency per fetch and a bandwidth cap, to model a slow registry in tests and
/// benchmarks (and to make failover kills land mid-READ).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttle {
    #[serde(with = "humantime_serde_compat")]
    pub latency: Duration,
    pub bytes_per_sec: Option<u64>,
}

impl Throttle {
    /// Parses `latency=20ms,rate=8MiB` (either part optional; rate is per second).
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut throttle = Throttle::default();
        for part in text.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}': expected key=value (latency=20ms, rate=8MiB)"))?;
            match key {
                "latency" => {
                    throttle.latency = humantime::parse_duration(value)
                        .map_err(|e| format!("latency '{value}': {e}"))?;
                }
                "rate" => throttle.bytes_per_sec = Some(parse_size(value)?),
                other => return Err(format!("unknown throttle key '{other}' (latency, rate)")),
            }
        }
        Ok(throttle)
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    let digits = text.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &text[digits.len()..];
    let scale: u64 = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "size '{text}': unknown unit '{other}' (KiB, MiB, GiB)"
            ));
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size '{text}': not a number"))?;
    n.checked_mul(scale)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("size '{text}' out of range"))
}

mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_micros() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_micros(u64::deserialize(d)?))
    }
}

/// A source slowed by a [`Throttle`]. The bandwidth cap is shared by all reads of this
/// source: each read reserves its transfer time after the previous reservations.
#[derive(Debug)]
pub struct Throttled<S> {
    inner: S,
    throttle: Throttle,
    next_free: tokio::sync::Mutex<Instant>,
}

impl<S> Throttled<S> {
    pub fn new(inner: S, throttle: Throttle) -> Self {
        Self {
            inner,
            throttle,
            next_free: tokio::sync::Mutex::new(Instant::now()),
        }
    }
}

#[async_trait]
impl<S: BlobSource> BlobSource for Throttled<S> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn origin(&self) -> String {
        format!("{} (throttled)", self.inner.origin())
    }

    fn piece_size(&self) -> Option<u64> {
        self.inner.piece_size()
    }

    fn startup_len(&self) -> u64 {
        self.inner.startup_len()
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<AlignedBuf, SourceError> {
        let mut done_at = Instant::now() + self.throttle.latency;
        if let Some(rate) = self.throttle.bytes_per_sec {
            let transfer = Duration::from_secs_f64(len as f64 / rate as f64);
            let mut next_free = self.next_free.lock().await;
            let start = (*next_free).max(Instant::now());
            *next_free = start + transfer;
            done_at = done_at.max(*next_free);
        }
        tokio::time::sleep_until(done_at.into()).await;
        self.inner.read_at(offset, len).await
    }
}

/// How the supervisor's table describes a blob to the fetcher (it crosses the hand-over
/// socket as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobSpec {
    /// A local file (tests, benchmarks, `lazy-erofs serve --blob`).
    Local(LocalBlob),
    /// One view of a lazy layer blob in a registry.
    Registry(LazyLayerSpec),
}

/// Which view of a lazy layer blob an fscache object is (DESIGN.md: a layer is two
/// objects, the EROFS metadata image and the data space, both views of one blob).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    Metadata,
    Data,
}

/// A lazy layer view in a registry. Holds no credentials: the fetcher's registry client
/// has its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LazyLayerSpec {
    /// Image reference the blob belongs to (repository and registry to read from).
    pub image: String,
    /// The lazy layer blob's digest.
    pub digest: String,
    /// The manifest's `dev.lazy-erofs.layer.verified-digest`: the trust anchor.
    pub verified_digest: String,
    /// Length of the verified region (0: unknown, found from the header).
    #[serde(default)]
    pub region_len: u64,
    /// Size of this view in bytes (0: unknown, read from the blob at OPEN).
    #[serde(default)]
    pub size: u64,
    pub view: View,
    /// The manifest's chunk size, the data view's piece (0: unknown). Only a fetch
    /// granularity hint: every chunk is still checked against the verified table.
    #[serde(default)]
    pub chunk_size: u64,
    /// The manifest's start-up size: data-view bytes fetched at OPEN (0: none). A hint
    /// like `chunk_size`.
    #[serde(default)]
    pub startup_size: u64,
    /// Slow its fetches down (tests and benchmarks model a remote registry with it).
    #[serde(default)]
    pub throttle: Option<Throttle>,
    /// Where this node keeps the blob's verified region, if it does: read from there
    /// instead of the registry, and checked against `verified_digest` all the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_region: Option<KeptRegionFiles>,
}

/// A verified region kept on the node in two files (the fanotify backend's layer
/// files): the metadata image, and the rest (header, then chunk table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeptRegionFiles {
    pub rest: std::path::PathBuf,
    pub metadata: std::path::PathBuf,
}

/// Credentials a client gave for pulls from one registry (a kubelet's pull secret, via
/// the CRI image proxy). They live in the supervisor's memory (and a root-only file the
/// proxy keeps for restarts) and reach the fetcher with the blobs of that registry;
/// never logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryCredentials {
    /// The registry host as written in image references (`docker.io` for Docker Hub).
    pub registry: String,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The registry host of an image reference, as written: its first component when that
/// names a host (has a `.` or `:`, or is `localhost`), else Docker Hub.
pub fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => first,
        _ => "docker.io",
    }
}

/// A local file blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalBlob {
    pub path: PathBuf,
    #[serde(default)]
    pub throttle: Option<Throttle>,
}

/// Turns a blob description into a source (runs in the fetcher child, on OPEN).
#[async_trait]
pub trait SourceFactory: Send + Sync {
    /// Opens the source `spec` describes; may fetch and verify (a registry source reads
    /// the layer's verified region here).
    async fn open(&self, name: &str, spec: &BlobSpec) -> Result<Arc<dyn BlobSource>, SourceError>;

    /// Credentials the supervisor sent with a blob of their registry, for the sources
    /// opened from now on (and refetched regions). Sources without a registry ignore them.
    /// No default: a wrapping factory that forgot to pass them on dropped a pull
    /// secret silently, and every lazy read of that registry failed with 401.
    fn provide_credentials(&self, credentials: &RegistryCredentials);
}

/// The refusal of a factory handed a kind of blob it does not serve.
pub fn wrong_kind(name: &str, spec: &BlobSpec) -> SourceError {
    let kind = match spec {
        BlobSpec::Local(_) => "a local file",
        BlobSpec::Registry(_) => "a registry layer",
    };
    SourceError::BadSpec {
        name: name.to_owned(),
        reason: format!("this fetcher does not serve {kind}"),
    }
}

/// Opens [`LocalBlob`] descriptions.
#[derive(Debug, Default)]
pub struct LocalSourceFactory;

#[async_trait]
impl SourceFactory for LocalSourceFactory {
    async fn open(&self, name: &str, spec: &BlobSpec) -> Result<Arc<dyn BlobSource>, SourceError> {
        let BlobSpec::Local(blob) = spec else {
            return Err(wrong_kind(name, spec));
        };
        let file = FileSource::open(&blob.path)?;
        Ok(match blob.throttle {
            Some(throttle) => Arc::new(Throttled::new(file, throttle)),
            None => Arc::new(file),
        })
    }

    /// Local files need none.
    fn provide_credentials(&self, _credentials: &RegistryCredentials) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_of_a_reference_is_its_host_or_docker_hub() {
        for (image, registry) in [
            ("registry.example/app:1", "registry.example"),
            ("127.0.0.1:5000/lazy/python:1", "127.0.0.1:5000"),
            ("localhost/app", "localhost"),
            ("library/python:3", "docker.io"),
            ("python", "docker.io"),
        ] {
            assert_eq!(registry_of(image), registry, "{image}");
        }
    }

    #[test]
    fn throttle_parsing() {
        assert_eq!(
            Throttle::parse("latency=20ms,rate=8MiB"),
            Ok(Throttle {
                latency: Duration::from_millis(20),
                bytes_per_sec: Some(8 << 20)
            })
        );
        assert_eq!(
            Throttle::parse("rate=100MB").map(|t| t.bytes_per_sec),
            Ok(Some(100_000_000))
        );
        assert!(Throttle::parse("latency").is_err());
        assert!(
            Throttle::parse("speed=1")
                .unwrap_err()
                .contains("unknown throttle key")
        );
        assert!(Throttle::parse("rate=0").is_err());
        assert!(Throttle::parse("rate=5XB").is_err());
    }

    #[tokio::test]
    async fn file_source_reads_exact_ranges_and_reports_truncation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).expect("write");
        let source = FileSource::open(&path).expect("open");
        assert_eq!(source.size(), 10_000);
        let buf = source.read_at(4096, 4096).await.expect("read");
        assert_eq!(&buf[..4096], &data[4096..8192]);
        match source.read_at(8192, 4096).await {
            Err(SourceError::Truncated { got, .. }) => assert_eq!(got, 10_000 - 8192),
            other => panic!("expected truncation, got {other:?}"),
        }
        assert!(matches!(
            FileSource::open(&dir.path().join("nope")),
            Err(SourceError::Open { .. })
        ));
    }

    #[tokio::test]
    async fn throttle_adds_latency_and_caps_bandwidth() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("blob");
        std::fs::write(&path, vec![1u8; 1 << 20]).expect("write");
        let throttle = Throttle {
            latency: Duration::from_millis(30),
            bytes_per_sec: Some(4 << 20),
        };
        let source = Arc::new(Throttled::new(
            FileSource::open(&path).expect("open"),
            throttle,
        ));
        let start = Instant::now();
        // Four 256 KiB reads at 4 MiB/s share the cap: about 250 ms in all.
        let reads = (0..4).map(|i| {
            let source = source.clone();
            tokio::spawn(async move { source.read_at(i * (256 << 10), 256 << 10).await })
        });
        for read in reads {
            read.await.expect("join").expect("read");
        }
        assert!(
            start.elapsed() >= Duration::from_millis(240),
            "{:?}",
            start.elapsed()
        );
    }
}
