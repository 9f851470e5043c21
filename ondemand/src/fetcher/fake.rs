//! Fakes for the fetcher's tests. The kernel fake is a fault-injection fake: the real
//! kernel cannot be made to fail a `copen`, or to send a READ after its CLOSE, on cue
//! (the VM tests drive the real device). It replays scripted requests and records every
//! answer the fetcher gives.

use std::collections::HashMap;
use std::collections::HashSet;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use nix::errno::Errno;

use super::Resolver;
use crate::cachefiles::device::DeviceError;
use crate::cachefiles::msg::{Close, Open, Read};
use crate::kernel::{CacheObject, Kernel, Request};
use crate::source::{BlobSource, BlobSpec, LocalBlob, SourceError, SourceFactory};
use crate::sys::AlignedBuf;

/// What the fetcher told the fake kernel, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Copen {
        msg_id: u32,
        size: Result<u64, Errno>,
    },
    Write {
        object: u32,
        offset: u64,
        len: usize,
    },
    Complete {
        object: u32,
        msg_id: u32,
    },
}

#[derive(Default)]
pub struct Recorder {
    answers: Mutex<Vec<Answer>>,
}

impl Recorder {
    fn push(&self, answer: Answer) {
        self.answers.lock().unwrap().push(answer);
    }

    pub fn answers(&self) -> Vec<Answer> {
        self.answers.lock().unwrap().clone()
    }

    /// Waits (up to 10 s) until `done` holds for the answers so far, and returns them.
    pub async fn wait_until(&self, done: impl Fn(&[Answer]) -> bool) -> Vec<Answer> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let answers = self.answers();
            if done(&answers) {
                return answers;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting; answers so far: {answers:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub fn completes(&self) -> Vec<u32> {
        completes(&self.answers())
    }
}

pub fn completes(answers: &[Answer]) -> Vec<u32> {
    answers
        .iter()
        .filter_map(|a| match a {
            Answer::Complete { msg_id, .. } => Some(*msg_id),
            _ => None,
        })
        .collect()
}

pub fn writes(answers: &[Answer]) -> Vec<(u64, usize)> {
    answers
        .iter()
        .filter_map(|a| match a {
            Answer::Write { offset, len, .. } => Some((*offset, *len)),
            _ => None,
        })
        .collect()
}

/// One cache object: a growable in-memory cache file.
pub struct FakeObject {
    id: u32,
    pub file: Arc<Mutex<Vec<u8>>>,
    recorder: Arc<Recorder>,
}

impl CacheObject for FakeObject {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut file = self.file.lock().unwrap();
        let (start, end) = (offset as usize, offset as usize + buf.len());
        if file.len() < end {
            file.resize(end, 0);
        }
        file[start..end].copy_from_slice(buf);
        self.recorder.push(Answer::Write {
            object: self.id,
            offset,
            len: buf.len(),
        });
        Ok(())
    }

    fn complete(&self, msg_id: u32) -> io::Result<()> {
        self.recorder.push(Answer::Complete {
            object: self.id,
            msg_id,
        });
        Ok(())
    }
}

/// The kernel side: requests come from a [`Script`]; dropping it closes the "device".
pub struct FakeKernel {
    requests: Mutex<mpsc::Receiver<Request<FakeObject>>>,
    recorder: Arc<Recorder>,
    /// OPEN message ids whose `copen` fails (as when the kernel gave up on the object).
    failing_copens: HashSet<u32>,
}

impl Kernel for FakeKernel {
    type Object = FakeObject;

    fn next_request(
        &self,
        _buf: &mut Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<Request<FakeObject>>, DeviceError> {
        match self.requests.lock().unwrap().recv_timeout(timeout) {
            Ok(request) => Ok(Some(request)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(DeviceError::Read(io::Error::other("fake kernel closed")))
            }
        }
    }

    fn copen(&self, msg_id: u32, size: Result<u64, Errno>) -> Result<(), DeviceError> {
        self.recorder.push(Answer::Copen { msg_id, size });
        if self.failing_copens.contains(&msg_id) {
            return Err(DeviceError::Command {
                command: format!("copen {msg_id}"),
                source: Errno::EINVAL.into(),
            });
        }
        Ok(())
    }
}

/// Sends requests to a [`FakeKernel`].
pub struct Script {
    tx: mpsc::Sender<Request<FakeObject>>,
    recorder: Arc<Recorder>,
    files: Mutex<HashMap<u32, Arc<Mutex<Vec<u8>>>>>,
}

impl Script {
    /// A kernel and its script; `failing_copens` lists OPENs whose `copen` fails.
    pub fn new(failing_copens: &[u32]) -> (Self, FakeKernel) {
        let (tx, rx) = mpsc::channel();
        let recorder = Arc::new(Recorder::default());
        let kernel = FakeKernel {
            requests: Mutex::new(rx),
            recorder: recorder.clone(),
            failing_copens: failing_copens.iter().copied().collect(),
        };
        let script = Self {
            tx,
            recorder,
            files: Mutex::default(),
        };
        (script, kernel)
    }

    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    pub fn open(&self, msg_id: u32, object_id: u32, domain: &str, cookie: &str) {
        let object = FakeObject {
            id: object_id,
            file: Arc::default(),
            recorder: self.recorder.clone(),
        };
        self.files
            .lock()
            .unwrap()
            .insert(object_id, object.file.clone());
        let open = Open {
            msg_id,
            object_id,
            volume_key: format!("erofs,{domain}\0").into_bytes(),
            cookie_key: cookie.as_bytes().to_vec(),
            flags: 0,
        };
        self.send(Request::Open { open, anon: object });
    }

    pub fn read(&self, msg_id: u32, object_id: u32, offset: u64, len: u64) {
        self.send(Request::Read(Read {
            msg_id,
            object_id,
            offset,
            len,
        }));
    }

    pub fn close(&self, msg_id: u32, object_id: u32) {
        self.send(Request::Close(Close { msg_id, object_id }));
    }

    /// The bytes written into object `object_id`'s cache file so far.
    pub fn file(&self, object_id: u32) -> Vec<u8> {
        self.files.lock().unwrap()[&object_id]
            .lock()
            .unwrap()
            .clone()
    }

    fn send(&self, request: Request<FakeObject>) {
        self.tx.send(request).expect("fetcher gone");
    }
}

/// A blob in memory that counts its reads, hangs (a minute) in the first `hangs` of
/// them, fails the next `failures`, and takes `delay` per read at or past `slow_from`.
#[derive(Debug)]
pub struct FakeSource {
    pub data: Vec<u8>,
    pub reads: AtomicUsize,
    pub hangs: AtomicU32,
    pub failures: AtomicU32,
    pub delay: Duration,
    pub slow_from: u64,
    /// What it says its pieces are ([`BlobSource::piece_size`]).
    pub piece: Option<u64>,
    /// What it says its image reads as it starts ([`BlobSource::startup_len`]).
    pub startup: u64,
    /// Every `(offset, len)` read, in order.
    pub calls: std::sync::Mutex<Vec<(u64, usize)>>,
}

impl FakeSource {
    pub fn new(data: Vec<u8>) -> Self {
        Self {
            data,
            reads: AtomicUsize::new(0),
            hangs: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            delay: Duration::ZERO,
            slow_from: 0,
            piece: None,
            startup: 0,
            calls: std::sync::Mutex::default(),
        }
    }

    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    /// Every `(offset, len)` read, in offset order (reads run concurrently).
    pub fn sorted_calls(&self) -> Vec<(u64, usize)> {
        let mut calls = self
            .calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        calls.sort_unstable();
        calls
    }
}

#[async_trait]
impl BlobSource for FakeSource {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn origin(&self) -> String {
        "fake source".into()
    }

    fn piece_size(&self) -> Option<u64> {
        self.piece
    }

    fn startup_len(&self) -> u64 {
        self.startup
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<AlignedBuf, SourceError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((offset, len));
        let hang = self
            .hangs
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if hang.is_ok() {
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        if offset >= self.slow_from {
            tokio::time::sleep(self.delay).await;
        }
        let failed = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failed.is_ok() {
            return Err(SourceError::Unavailable {
                name: "fake".into(),
                reason: "injected failure".into(),
            });
        }
        let mut buf = AlignedBuf::new(len);
        buf[..len].copy_from_slice(&self.data[offset as usize..offset as usize + len]);
        Ok(buf)
    }
}

/// The supervisor's table and the source factory in one: cookie (in any domain) →
/// source. A cookie named `resolver-fails` makes the resolver fail.
#[derive(Default)]
pub struct FakeBlobs {
    pub sources: HashMap<String, Arc<FakeSource>>,
}

fn spec_for(cookie: &str) -> BlobSpec {
    BlobSpec::Local(LocalBlob {
        path: cookie.into(),
        throttle: None,
    })
}

#[async_trait]
impl Resolver for FakeBlobs {
    async fn resolve(
        &self,
        _domain: Option<&str>,
        cookie: &str,
    ) -> Result<Option<BlobSpec>, String> {
        if cookie == "resolver-fails" {
            return Err("supervisor socket closed".into());
        }
        // `factory-fails` resolves, then cannot be opened.
        let known = self.sources.contains_key(cookie) || cookie == "factory-fails";
        Ok(known.then(|| spec_for(cookie)))
    }
}

#[async_trait]
impl SourceFactory for FakeBlobs {
    async fn open(&self, name: &str, _spec: &BlobSpec) -> Result<Arc<dyn BlobSource>, SourceError> {
        match self.sources.get(name) {
            Some(source) => Ok(source.clone()),
            None => Err(SourceError::Unavailable {
                name: name.into(),
                reason: "registry says 404".into(),
            }),
        }
    }

    fn provide_credentials(&self, _credentials: &crate::source::RegistryCredentials) {}
}
