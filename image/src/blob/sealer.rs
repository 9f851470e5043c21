//! Sealing data chunks (sha256, then zstd) on several threads while the layer's tar
//! still streams in on the caller's: chunks come back in the order they went in, so
//! the blob is the same byte for byte whatever the thread count.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

use super::{BlobError, Compression};

/// Bytes of chunks in flight at most (they are whole chunks in memory).
const MAX_INFLIGHT_BYTES: usize = 256 << 20;
/// Threads at most, whatever the machine has.
const MAX_THREADS: usize = 8;

/// One chunk, ready to be stored.
#[derive(Debug)]
pub(super) struct Sealed {
    /// The stored bytes: compressed if that made them smaller, else the chunk.
    pub bytes: Vec<u8>,
    pub compressed: bool,
    pub sha256: [u8; 32],
}

/// One thread's sealing state: its zstd context is made once and reused for every
/// chunk (a fresh context per chunk set up and cleared its tables each time).
struct ChunkSealer {
    compression: Compression,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl ChunkSealer {
    fn new(compression: Compression) -> Self {
        Self {
            compression,
            zstd: None,
        }
    }

    fn seal(&mut self, chunk: Vec<u8>) -> Result<Sealed, std::io::Error> {
        let compressed = match self.compression {
            Compression::Zstd { level } => {
                let zstd = match &mut self.zstd {
                    Some(zstd) => zstd,
                    none => none.insert(zstd::bulk::Compressor::new(level)?),
                };
                Some(zstd.compress(&chunk)?)
            }
            Compression::None => None,
        };
        Ok(sealed(chunk, compressed))
    }
}

fn sealed(chunk: Vec<u8>, compressed: Option<Vec<u8>>) -> Sealed {
    let sha256: [u8; 32] = Sha256::digest(&chunk).into();
    match compressed {
        Some(bytes) if bytes.len() < chunk.len() => Sealed {
            bytes,
            compressed: true,
            sha256,
        },
        _ => Sealed {
            bytes: chunk,
            compressed: false,
            sha256,
        },
    }
}

/// The threads `0` means: this machine's cores, at most [`MAX_THREADS`].
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_THREADS)
}

type Done = (u64, Result<Sealed, std::io::Error>);
/// The workers' shared end of the queue of numbered chunks.
type Queue = Arc<Mutex<Receiver<(u64, Vec<u8>)>>>;

/// Seals chunks on worker threads (inline with one thread) and hands them back in order.
pub(super) struct Sealer {
    /// Seals inline when there are no workers.
    inline: ChunkSealer,
    jobs: Option<SyncSender<(u64, Vec<u8>)>>,
    done: Option<Receiver<Done>>,
    workers: Vec<JoinHandle<()>>,
    ready: BTreeMap<u64, Result<Sealed, std::io::Error>>,
    submitted: u64,
    handed: u64,
    max_inflight: u64,
}

impl Sealer {
    /// `threads` workers (0: [`default_threads`]) for chunks of `chunk_size` bytes.
    pub fn new(compression: Compression, threads: usize, chunk_size: usize) -> Self {
        let threads = match threads {
            0 => default_threads(),
            n => n.min(MAX_THREADS),
        };
        let max_inflight = (2 * threads)
            .min(MAX_INFLIGHT_BYTES / chunk_size.max(1))
            .max(1);
        let mut sealer = Self {
            inline: ChunkSealer::new(compression),
            jobs: None,
            done: None,
            workers: Vec::new(),
            ready: BTreeMap::new(),
            submitted: 0,
            handed: 0,
            max_inflight: max_inflight as u64,
        };
        if threads > 1 {
            let (jobs, queue) = mpsc::sync_channel(max_inflight);
            let (done_tx, done) = mpsc::channel();
            let queue = Arc::new(Mutex::new(queue));
            sealer.workers = (0..threads)
                .filter_map(|i| spawn_worker(i, &queue, &done_tx, compression))
                .collect();
            if !sealer.workers.is_empty() {
                sealer.jobs = Some(jobs);
                sealer.done = Some(done);
            }
        }
        sealer
    }

    /// Takes `chunk`; returns the chunks sealed since, in order (maybe none yet).
    pub fn submit(&mut self, chunk: Vec<u8>) -> Result<Vec<Sealed>, BlobError> {
        let Some(jobs) = &self.jobs else {
            return Ok(vec![self.inline.seal(chunk)?]);
        };
        jobs.send((self.submitted, chunk))
            .map_err(|_| workers_gone())?;
        self.submitted += 1;
        let mut out = Vec::new();
        if let Some(done) = &self.done {
            while let Ok((seq, sealed)) = done.try_recv() {
                self.ready.insert(seq, sealed);
            }
        }
        self.hand(&mut out)?;
        while self.submitted - self.handed > self.max_inflight {
            self.wait(&mut out)?;
        }
        Ok(out)
    }

    /// Every chunk still in flight, in order.
    pub fn finish(&mut self) -> Result<Vec<Sealed>, BlobError> {
        let mut out = Vec::new();
        self.hand(&mut out)?;
        while self.handed < self.submitted {
            self.wait(&mut out)?;
        }
        Ok(out)
    }

    fn wait(&mut self, out: &mut Vec<Sealed>) -> Result<(), BlobError> {
        let done = self.done.as_ref().ok_or_else(workers_gone)?;
        let (seq, sealed) = done.recv().map_err(|_| workers_gone())?;
        self.ready.insert(seq, sealed);
        self.hand(out)
    }

    /// Moves the sealed chunks that are next in order to `out`.
    fn hand(&mut self, out: &mut Vec<Sealed>) -> Result<(), BlobError> {
        while let Some(sealed) = self.ready.remove(&self.handed) {
            out.push(sealed?);
            self.handed += 1;
        }
        Ok(())
    }
}

impl Drop for Sealer {
    fn drop(&mut self) {
        // Closing the queue ends every worker once it finishes its chunk.
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn spawn_worker(
    i: usize,
    queue: &Queue,
    done: &Sender<Done>,
    compression: Compression,
) -> Option<JoinHandle<()>> {
    let (queue, done) = (queue.clone(), done.clone());
    std::thread::Builder::new()
        .name(format!("seal-{i}"))
        .spawn(move || {
            let mut sealer = ChunkSealer::new(compression);
            loop {
                let job = queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .recv();
                let Ok((seq, chunk)) = job else { return };
                // A panic must still answer its chunk: the writer waits for every one.
                let sealed =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sealer.seal(chunk)))
                        .unwrap_or_else(|_| Err(std::io::Error::other("sealing a chunk panicked")));
                if done.send((seq, sealed)).is_err() {
                    return;
                }
            }
        })
        .ok()
}

fn workers_gone() -> BlobError {
    BlobError::Io(std::io::Error::other("the chunk sealing threads ended"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks() -> Vec<Vec<u8>> {
        // Compressible and incompressible chunks of varying sizes, as a layer has.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..40u32)
            .map(|i| {
                let len = 4096 + (i as usize * 977) % 8192;
                (0..len)
                    .map(|j| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        if i % 3 == 0 { x as u8 } else { (j / 64) as u8 }
                    })
                    .collect()
            })
            .collect()
    }

    fn sealed_with(threads: usize) -> Vec<(Vec<u8>, bool, [u8; 32])> {
        let mut sealer = Sealer::new(Compression::Zstd { level: 3 }, threads, 4096);
        let mut out = Vec::new();
        for chunk in chunks() {
            out.extend(sealer.submit(chunk).expect("submit"));
        }
        out.extend(sealer.finish().expect("finish"));
        out.into_iter()
            .map(|s| (s.bytes, s.compressed, s.sha256))
            .collect()
    }

    #[test]
    fn every_thread_count_seals_the_same_chunks_in_the_same_order() {
        let one = sealed_with(1);
        assert_eq!(one.len(), 40);
        assert!(one.iter().any(|c| c.1) && one.iter().any(|c| !c.1));
        for (i, chunk) in chunks().iter().enumerate() {
            let digest: [u8; 32] = Sha256::digest(chunk).into();
            assert_eq!(one[i].2, digest, "chunk {i} out of order");
        }
        for threads in [2, 3, 8] {
            assert!(sealed_with(threads) == one, "{threads} threads differ");
        }
    }

    /// The reused zstd context writes what a fresh one per chunk wrote: converting an
    /// image again gives the blobs it gave before the context was kept.
    #[test]
    fn a_reused_context_compresses_each_chunk_as_a_fresh_one() {
        let mut sealer = ChunkSealer::new(Compression::Zstd { level: 3 });
        for (i, chunk) in chunks().into_iter().enumerate() {
            let fresh = zstd::bulk::compress(&chunk, 3).expect("zstd");
            let sealed = sealer.seal(chunk.clone()).expect("seal");
            let want = if fresh.len() < chunk.len() {
                fresh
            } else {
                chunk
            };
            assert_eq!(sealed.bytes, want, "chunk {i}");
        }
    }
}
