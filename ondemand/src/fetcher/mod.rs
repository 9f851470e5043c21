//! The fetcher: serves the kernel's OPEN / READ / CLOSE requests concurrently.
//!
//! A blocking thread reads requests from the device; OPENs are answered in order (the
//! kernel sends no READ for an object before its `copen`); each READ runs as its own
//! task. Fetching is per chunk and single-flight: overlapping READs share one fetch and
//! one write of the whole chunk into the cache file, then each completes its READ.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use nix::errno::Errno;
use tokio::sync::mpsc;
use tracing::Instrument;

use self::ahead::ReadAhead;
use self::memo::FailureMemo;
use crate::cachefiles::device::DeviceError;
use crate::cachefiles::msg::{Open, Read};
use crate::fault::{FaultPoint, FaultTrigger};
use crate::kernel::{CacheObject, Kernel, Request};
use crate::source::{BlobSource, BlobSpec, SourceFactory};
use crate::stats::{Counter, Stats, monotonic_ns};
use crate::sys::PAGE_SIZE;

/// Answers "which blob is this cookie?" — the supervisor's table, asked over the socket.
#[async_trait]
pub trait Resolver: Send + Sync {
    /// The blob description for `cookie` in EROFS domain `domain`, `None` if unknown.
    async fn resolve(&self, domain: Option<&str>, cookie: &str)
    -> Result<Option<BlobSpec>, String>;
}

#[derive(Debug, Clone, Copy)]
pub struct FetcherConfig {
    /// Fetch and write granularity (a multiple of 4 KiB); for a source stored in larger
    /// pieces, the smallest multiple of its piece at least this large (see
    /// [`fetch_unit`]).
    pub chunk_size: u64,
    /// Extra attempts after a failed fetch before the READ is failed.
    pub retries: u32,
    /// First retry delay; doubles per attempt, with jitter.
    pub retry_base: Duration,
    /// Longest a chunk fetch may take, retries included: the reader gets its bytes or
    /// EIO within this (plus the write). A registry source retries inside it too.
    pub deadline: Duration,
    /// How long a chunk whose fetch ran out of time fails again at once. After a failed
    /// readahead the kernel asks at once (within milliseconds) for a page of the same
    /// range; without this a stalled registry would make the reader wait a second
    /// deadline for its EIO. Fast failures (corrupt bytes, 5xx) are not remembered: their
    /// retry costs little, and the next read after a recovery must work.
    pub failure_memo: Duration,
    /// Bytes fetched ahead of a reader walking forward, at most (0: off). Readahead
    /// fetches are verified like any other and only ever written whole.
    pub readahead: u64,
    /// Two READs of an object at most this many bytes apart start the fetch of the
    /// units between them (0: off; off as well when `readahead` is 0). See [`ahead`].
    pub readahead_gap: u64,
    /// Bytes in flight ahead of READs over all objects at once, at most: many readers
    /// walking forward together must not hold unbounded buffers. A readahead past it is
    /// not started (the READ that comes for those bytes fetches them).
    pub readahead_budget: u64,
    /// Whether start-up runs wait while READs of objects without a start-up region are
    /// in flight ([`startup`]); false starts them as each object opens.
    pub startup_yields: bool,
}

impl FetcherConfig {
    /// The default budget for a readahead window: two windows in flight.
    pub fn budget_for(readahead: u64) -> u64 {
        readahead.saturating_mul(2)
    }
}

impl Default for FetcherConfig {
    fn default() -> Self {
        Self {
            chunk_size: 1 << 20,
            retries: 4,
            retry_base: Duration::from_millis(50),
            deadline: Duration::from_secs(30),
            failure_memo: Duration::from_secs(1),
            readahead: 16 << 20,
            readahead_gap: 4 << 20,
            readahead_budget: Self::budget_for(16 << 20),
            startup_yields: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetcherError {
    #[error(transparent)]
    Device(#[from] DeviceError),
}

struct Object<O> {
    cookie: String,
    /// Where its bytes come from (the registry and blob), for log lines.
    origin: String,
    anon: O,
    source: Arc<dyn BlobSource>,
    /// This object's fetch and write unit.
    unit: u64,
    ahead: ReadAhead,
}

/// The bytes of one run of whole units fetched ahead of READs (start-up region,
/// readahead): one range request.
const RUN_BYTES: u64 = 4 << 20;

/// The largest fetch unit, whatever a source's pieces (a blob's chunks are bounded so).
pub const MAX_UNIT: u64 = 64 << 20;

/// The fetch unit for a source stored in `piece`-byte pieces: `configured` rounded up to
/// whole pieces (and pages), so no piece is fetched, decompressed and verified twice
/// for its neighbours; small pieces are merged into one request by the source.
pub fn fetch_unit(configured: u64, piece: Option<u64>) -> u64 {
    let page = PAGE_SIZE as u64;
    match piece {
        Some(piece) if piece > 0 => {
            let piece = piece.min(MAX_UNIT).div_ceil(page) * page;
            configured.div_ceil(piece).max(1) * piece
        }
        _ => configured,
    }
}

type ChunkFetch = Shared<BoxFuture<'static, Result<(), Arc<String>>>>;

/// What a fetcher works with; the child process assembles it from the hand-over.
pub struct FetcherParts<K> {
    pub device: Arc<K>,
    pub resolver: Arc<dyn Resolver>,
    pub factory: Arc<dyn SourceFactory>,
    pub stats: Arc<Stats>,
    pub faults: Arc<FaultTrigger>,
    pub config: FetcherConfig,
}

struct Fetcher<K: Kernel> {
    parts: FetcherParts<K>,
    objects: Mutex<HashMap<u32, Arc<Object<K::Object>>>>,
    inflight: Arc<Mutex<HashMap<(u32, u64), ChunkFetch>>>,
    failures: Arc<FailureMemo>,
    /// Pages in flight ahead of READs over all objects ([`FetcherConfig::readahead_budget`]).
    ahead_budget: Arc<tokio::sync::Semaphore>,
    ahead_budget_pages: usize,
    /// READs the start-up runs give way to ([`startup`]).
    foreground: Arc<startup::Foreground>,
}

/// Serves requests until the device fails (or is closed under us). Runs on the current
/// tokio runtime.
pub async fn serve<K: Kernel>(parts: FetcherParts<K>) -> Result<(), FetcherError> {
    let device = parts.device.clone();
    let failures = Arc::new(FailureMemo::new(parts.config.failure_memo));
    let budget_pages = usize::try_from(parts.config.readahead_budget / PAGE_SIZE as u64)
        .unwrap_or(usize::MAX)
        .min(tokio::sync::Semaphore::MAX_PERMITS)
        .min(u32::MAX as usize);
    let fetcher = Arc::new(Fetcher {
        parts,
        objects: Mutex::new(HashMap::new()),
        inflight: Arc::new(Mutex::new(HashMap::new())),
        failures,
        ahead_budget: Arc::new(tokio::sync::Semaphore::new(budget_pages)),
        ahead_budget_pages: budget_pages,
        foreground: Arc::new(startup::Foreground::new()),
    });
    let (tx, mut rx) = mpsc::channel::<Received<K::Object>>(1024);
    std::thread::Builder::new()
        .name("cachefiles-reader".into())
        .spawn(move || read_requests(&*device, &tx))
        .map_err(|e| FetcherError::Device(DeviceError::Read(e)))?;
    while let Some(next) = rx.recv().await {
        let (request, received) = next?;
        match request {
            // Concurrent: one layer's OPEN waiting on its source must not hold up
            // another's (the kernel sends no READ for an object before its copen).
            Request::Open { open, anon } => {
                let fetcher = fetcher.clone();
                tokio::spawn(async move { fetcher.open(open, anon).await });
            }
            Request::Read(read) => {
                let fetcher = fetcher.clone();
                tokio::spawn(async move { fetcher.read(read, received).await });
            }
            Request::Close(close) => {
                fetcher.lock_objects().remove(&close.object_id);
                fetcher.failures.forget_object(close.object_id);
                fetcher.parts.stats.add(Counter::Closes, 1);
            }
        }
    }
    Ok(())
}

type Received<O> = Result<(Request<O>, Instant), DeviceError>;

fn read_requests<K: Kernel>(device: &K, tx: &mpsc::Sender<Received<K::Object>>) {
    let mut buf = Vec::new();
    loop {
        match device.next_request(&mut buf, Duration::from_millis(500)) {
            Ok(None) => {
                if tx.is_closed() {
                    return;
                }
            }
            Ok(Some(request)) => {
                if tx.blocking_send(Ok((request, Instant::now()))).is_err() {
                    return;
                }
            }
            // Bad bytes from the kernel lose one request, never the fetcher.
            Err(DeviceError::Malformed(err)) => {
                tracing::error!(%err, "malformed cachefiles message skipped");
            }
            Err(err) => {
                let _ = tx.blocking_send(Err(err));
                return;
            }
        }
    }
}

impl<K: Kernel> Fetcher<K> {
    fn lock_objects(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Object<K::Object>>>> {
        self.objects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn open(&self, open: Open, anon: K::Object) {
        self.parts
            .faults
            .hit(FaultPoint::CrashInOpen, &self.parts.stats);
        let cookie = String::from_utf8_lossy(&open.cookie_key).into_owned();
        let refuse = |errno: Errno, why: String| {
            tracing::error!(%cookie, object = open.object_id, "OPEN refused ({errno}): {why}");
            self.parts.stats.add(Counter::OpensRefused, 1);
            if let Err(err) = self.parts.device.copen(open.msg_id, Err(errno)) {
                tracing::error!(%err, "copen refusal failed");
            }
        };
        let domain = erofs_domain(&open.volume_key);
        let spec = match self
            .parts
            .resolver
            .resolve(domain.as_deref(), &cookie)
            .await
        {
            Ok(Some(spec)) => spec,
            Ok(None) => return refuse(Errno::ENOENT, "no such blob registered".into()),
            Err(err) => return refuse(Errno::EIO, format!("cannot ask the supervisor: {err}")),
        };
        let source = match self.parts.factory.open(&cookie, &spec).await {
            Ok(source) => source,
            Err(err) => return refuse(Errno::ENOENT, err.to_string()),
        };
        let size = source.size();
        let unit = fetch_unit(self.parts.config.chunk_size, source.piece_size());
        let object = Arc::new(Object {
            cookie: cookie.clone(),
            origin: source.origin(),
            anon,
            source,
            unit,
            ahead: ReadAhead::default(),
        });
        self.lock_objects().insert(open.object_id, object.clone());
        // Its runs are in flight before the kernel can send a READ, which then joins one.
        let startup = self.fetch_startup(open.object_id, &object);
        match self.parts.device.copen(open.msg_id, Ok(size)) {
            Ok(()) => {
                self.parts.stats.add(Counter::Opens, 1);
                tracing::debug!(%cookie, object = open.object_id, size, unit, "OPEN");
                if let Some(startup) = startup {
                    tokio::spawn(startup);
                }
            }
            Err(err) => {
                tracing::error!(%cookie, %err, "copen failed");
                self.lock_objects().remove(&open.object_id);
                self.forget_fetches(open.object_id);
            }
        }
    }

    async fn read(self: Arc<Self>, read: Read, received: Instant) {
        let started = Instant::now();
        let Some(object) = self.lock_objects().get(&read.object_id).cloned() else {
            // Only after a CLOSE raced the READ: nobody waits for it any more.
            tracing::warn!(
                object = read.object_id,
                msg = read.msg_id,
                "READ for a closed object"
            );
            return;
        };
        let foreground = Self::is_foreground(&object).then(|| self.foreground.enter());
        let size = object.source.size();
        let end = read.offset.saturating_add(read.len).min(size);
        let chunk = object.unit;
        // A slow read is followed by its cookie and range through its chunks' fetches
        // down to the registry's range requests (the source's spans nest in this one).
        let span = tracing::info_span!(
            "read",
            cookie = %object.cookie,
            offset = read.offset,
            len = read.len
        );
        let (first, last) = (read.offset / chunk, end.div_ceil(chunk));
        let fetches: Vec<ChunkFetch> = span.in_scope(|| {
            let fetches = (first..last)
                .map(|index| self.chunk(read.object_id, &object, index))
                .collect();
            self.read_ahead(read.object_id, &object, first, last);
            fetches
        });
        let failures: Vec<Arc<String>> = futures::future::join_all(fetches)
            .instrument(span.clone())
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        let fetched = Instant::now();
        if failures.is_empty() {
            self.parts
                .faults
                .hit(FaultPoint::CrashAfterWrite, &self.parts.stats);
        }
        // Complete even on failure: the unwritten range reads as EIO instead of hanging.
        if let Err(err) = object.anon.complete(read.msg_id) {
            tracing::error!(cookie = %object.cookie, msg = read.msg_id, %err, "READ_COMPLETE failed");
        }
        drop(foreground);
        // The per-READ trace (`RUST_LOG=…,read_trace=debug`): queued behind other
        // requests, waiting on its units' fetches and writes, completing.
        let us = |d: Duration| d.as_micros() as u64;
        tracing::debug!(
            target: "read_trace",
            parent: &span,
            units = last - first,
            queue_us = us(started - received),
            wait_us = us(fetched - started),
            complete_us = us(fetched.elapsed()),
            total_us = us(received.elapsed()),
            "read"
        );
        if let Some(first) = failures.first() {
            self.parts.stats.add(Counter::ReadsFailed, 1);
            tracing::error!(
                cookie = %object.cookie, offset = read.offset, len = read.len,
                "READ of {} failed after retries, the reader sees EIO: {first}", object.origin
            );
        } else {
            self.parts.stats.add(Counter::ReadsServed, 1);
            self.parts.stats.record_read_latency(received.elapsed());
            self.parts.stats.first_read_done();
        }
    }

    /// Drops the fetches registered for an object that never opened (nobody polls them).
    fn forget_fetches(&self, object_id: u32) {
        self.inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|(object, _), _| *object != object_id);
    }

    /// The shared fetch-and-write of chunk `index`, started if nobody has started it.
    fn chunk(&self, object_id: u32, object: &Arc<Object<K::Object>>, index: u64) -> ChunkFetch {
        self.run(object_id, object, index, 1, None).fetch
    }

    /// The shared fetch-and-write of units `first..first + len` in one request, started
    /// unless `first` is in flight (whose fetch is returned); the run stops short of a
    /// unit in flight or written. A readahead's `budget` permit is held until its fetch
    /// is done (all of it, should the run stop short), or dropped at once if nothing new
    /// starts.
    fn run(
        &self,
        object_id: u32,
        object: &Arc<Object<K::Object>>,
        first: u64,
        len: u64,
        budget: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Run {
        let mut inflight = self
            .inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(fetch) = inflight.get(&(object_id, first)) {
            return Run::joined(fetch.clone());
        }
        // Verified and written (ahead of this READ, which raced the write): done.
        if object.ahead.is_written(first) {
            return Run::joined(futures::future::ready(Ok(())).boxed().shared());
        }
        if let Some(why) = self.failures.recent((object_id, first)) {
            return Run::joined(futures::future::ready(Err(Arc::new(why))).boxed().shared());
        }
        let free = |index: u64| {
            !inflight.contains_key(&(object_id, index)) && !object.ahead.is_written(index)
        };
        let len = (1..len).take_while(|&n| free(first + n)).count() as u64 + 1;
        let (object, stats, config, map, failures) = (
            object.clone(),
            self.parts.stats.clone(),
            self.parts.config,
            self.inflight.clone(),
            self.failures.clone(),
        );
        // A child of the READ that started it; later READs of the chunk share it.
        let span = tracing::info_span!("chunk", index = first, units = len);
        let fetch = async move {
            let result = fetch_and_write(&object, first, len, &stats, config).await;
            drop(budget);
            let mut map = map
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for index in first..first + len {
                if let Err(ChunkError::OutOfTime(why)) = &result {
                    failures.remember((object_id, index), why.clone());
                }
                map.remove(&(object_id, index));
            }
            result.map_err(|e| Arc::new(e.to_string()))
        }
        .instrument(span)
        .boxed()
        .shared();
        for index in first..first + len {
            inflight.insert((object_id, index), fetch.clone());
        }
        Run {
            fetch,
            covered: len,
            joined: false,
        }
    }
}

/// What [`Fetcher::run`] gave: the fetch that covers its first unit, how many units
/// from there that fetch covers, and whether it joined a fetch in flight (or found the
/// unit done or failed) instead of starting one.
struct Run {
    fetch: ChunkFetch,
    covered: u64,
    joined: bool,
}

impl Run {
    fn joined(fetch: ChunkFetch) -> Self {
        Self {
            fetch,
            covered: 1,
            joined: true,
        }
    }

    /// The units this call started fetching.
    fn started(&self) -> u64 {
        if self.joined { 0 } else { self.covered }
    }
}

/// Why a chunk was not fetched.
#[derive(Debug, thiserror::Error)]
enum ChunkError {
    /// The deadline passed: the source stalls.
    #[error("{0}")]
    OutOfTime(String),
    #[error("{0}")]
    Failed(String),
}

async fn fetch_and_write<O: CacheObject>(
    object: &Arc<Object<O>>,
    first: u64,
    units: u64,
    stats: &Stats,
    config: FetcherConfig,
) -> Result<(), ChunkError> {
    let size = object.source.size();
    let start = first * object.unit;
    let len = usize::try_from((units * object.unit).min(size.saturating_sub(start)))
        .map_err(|e| ChunkError::Failed(e.to_string()))?;
    let mut attempt = 0;
    let asked = Instant::now();
    let deadline = tokio::time::Instant::now() + config.deadline;
    let buf = loop {
        let read = tokio::time::timeout_at(deadline, object.source.read_at(start, len)).await;
        let Ok(read) = read else {
            return Err(ChunkError::OutOfTime(format!(
                "no bytes within the {:?} deadline ({attempt} retries)",
                config.deadline
            )));
        };
        if let Err(crate::SourceError::Unverified { .. }) = &read {
            stats.add(Counter::VerifyFailures, 1);
        }
        match read {
            Ok(buf) => break buf,
            Err(err)
                if attempt < config.retries
                    && tokio::time::Instant::now() + backoff(config.retry_base, attempt + 1)
                        < deadline =>
            {
                attempt += 1;
                stats.add(Counter::FetchRetries, 1);
                let delay = backoff(config.retry_base, attempt);
                tracing::warn!(cookie = %object.cookie, start, len, attempt, ?delay, "fetch failed, retrying: {err}");
                tokio::time::sleep(delay).await;
            }
            Err(err) => return Err(ChunkError::Failed(err.to_string())),
        }
    };
    stats.add(Counter::BytesFetched, len as u64);
    let fetched = Instant::now();
    tracing::debug!(start, len, attempt, "chunk fetched and verified");
    // Whole pages: the anon fd is direct I/O. The buffer is zero past `len`.
    let write_len = len.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let writer = object.clone();
    tokio::task::spawn_blocking(move || writer.anon.write_all_at(&buf[..write_len], start))
        .await
        .map_err(|e| ChunkError::Failed(e.to_string()))?
        .map_err(|e| {
            ChunkError::Failed(format!(
                "writing {write_len} bytes at {start} into the cache file: {e}"
            ))
        })?;
    stats.add(Counter::BytesWritten, write_len as u64);
    tracing::debug!(
        target: "read_trace",
        index = first,
        len,
        source_us = (fetched - asked).as_micros() as u64,
        write_us = fetched.elapsed().as_micros() as u64,
        "unit"
    );
    for index in first..first + units {
        object.ahead.written(index);
    }
    Ok(())
}

/// The EROFS domain an OPEN's volume key names (`erofs,<domain>` and a NUL; without a
/// `domain_id` the kernel uses the fsid there).
fn erofs_domain(volume_key: &[u8]) -> Option<String> {
    let key = volume_key.strip_suffix(b"\0").unwrap_or(volume_key);
    key.strip_prefix(b"erofs,")
        .and_then(|d| std::str::from_utf8(d).ok())
        .map(str::to_owned)
}

/// `base * 2^(attempt-1)`, plus up to 50 % jitter so retries of many READs spread out.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1 << attempt.saturating_sub(1).min(10));
    let jitter_frac = (monotonic_ns() % 1000) as f64 / 2000.0;
    exp + exp.mul_f64(jitter_frac)
}

mod ahead;
mod memo;
mod startup;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;
