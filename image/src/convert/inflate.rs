//! The layer's tar stream, decompressed and hashed (its diff id) on a thread of its own,
//! so that inflating a gzip layer overlaps with parsing the tar and sealing chunks.
//! Blocks of the stream cross a bounded channel: at most [`BLOCKS_IN_FLIGHT`] blocks of
//! [`BLOCK`] bytes are in memory whatever the layer's size, and their buffers are reused.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::{Scope, ScopedJoinHandle};

use sha2::{Digest, Sha256};

const BLOCK: usize = 1 << 20;
const BLOCKS_IN_FLIGHT: usize = 4;

/// What the inflating thread saw once its input ended.
pub struct Inflated {
    /// sha256 of the whole (decompressed) tar stream.
    pub tar_sha256: [u8; 32],
    /// Bytes read from the possibly compressed input.
    pub source_size: u64,
}

/// The tar stream as the inflating thread hands it over, block by block.
pub struct TarStream {
    blocks: Receiver<io::Result<Vec<u8>>>,
    spent: SyncSender<Vec<u8>>,
    block: Vec<u8>,
    at: usize,
}

/// Starts inflating `input` (gzip, zstd or a plain tar, told by its first bytes) on a
/// thread in `scope`; the tar stream comes out of the returned reader. The thread ends
/// at the input's end or when the reader is dropped.
pub fn spawn<'scope, R: Read + Send + 'scope>(
    scope: &'scope Scope<'scope, '_>,
    input: R,
) -> (TarStream, ScopedJoinHandle<'scope, io::Result<Inflated>>) {
    let (blocks_tx, blocks) = sync_channel(BLOCKS_IN_FLIGHT);
    let (spent, spent_rx) = sync_channel(BLOCKS_IN_FLIGHT + 2);
    let thread = scope.spawn(move || inflate(input, &blocks_tx, &spent_rx));
    let stream = TarStream {
        blocks,
        spent,
        block: Vec::new(),
        at: 0,
    };
    (stream, thread)
}

fn inflate(
    input: impl Read,
    blocks: &SyncSender<io::Result<Vec<u8>>>,
    spent: &Receiver<Vec<u8>>,
) -> io::Result<Inflated> {
    let mut counted = CountingReader {
        inner: BufReader::with_capacity(BLOCK, input),
        count: 0,
    };
    let magic = counted
        .inner
        .fill_buf()?
        .get(..4)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let mut hash = Sha256::new();
    {
        let mut tar: Box<dyn Read + '_> = if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(&mut counted))
        } else if magic == [0x28, 0xb5, 0x2f, 0xfd] {
            Box::new(zstd::stream::read::Decoder::new(&mut counted)?)
        } else {
            Box::new(&mut counted)
        };
        loop {
            let mut block = spent.try_recv().unwrap_or_else(|_| vec![0; BLOCK]);
            block.resize(BLOCK, 0);
            let filled = match fill(&mut tar, &mut block) {
                Ok(filled) => filled,
                Err(e) => {
                    let _ = blocks.send(Err(io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
            };
            if filled == 0 {
                break;
            }
            block.truncate(filled);
            hash.update(&block);
            if blocks.send(Ok(block)).is_err() {
                // The reader is gone: the conversion failed or stopped early.
                return Err(io::Error::other("the tar stream's reader went away"));
            }
        }
    }
    Ok(Inflated {
        tar_sha256: hash.finalize().into(),
        source_size: counted.count,
    })
}

/// Reads until `block` is full or the input ends; the bytes read.
fn fill(input: &mut impl Read, block: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < block.len() {
        match input.read(&mut block[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

impl Read for TarStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.at == self.block.len() {
            let Ok(next) = self.blocks.recv() else {
                return Ok(0);
            };
            let spent = std::mem::replace(&mut self.block, next?);
            let _ = self.spent.try_send(spent);
            self.at = 0;
        }
        let n = buf.len().min(self.block.len() - self.at);
        buf[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// 3.5 MiB that compress a little: several blocks, the last one short.
    fn payload() -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..3 * BLOCK + BLOCK / 2)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 4096 < 2048 { x as u8 } else { 0 }
            })
            .collect()
    }

    fn through_thread(input: &[u8]) -> (Vec<u8>, Inflated) {
        std::thread::scope(|scope| {
            let (mut stream, thread) = spawn(scope, input);
            let mut out = Vec::new();
            stream.read_to_end(&mut out).expect("read");
            (out, thread.join().expect("join").expect("inflate"))
        })
    }

    #[test]
    fn plain_gzip_and_zstd_come_out_whole_with_their_sha256_and_source_size() {
        let tar = payload();
        let mut gzip = Vec::new();
        // Two gzip members, as `cat a.gz b.gz` makes: both are the layer.
        for half in [&tar[..BLOCK], &tar[BLOCK..]] {
            let mut member = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            member.write_all(half).expect("gzip");
            gzip.extend(member.finish().expect("gzip"));
        }
        let zstd = zstd::encode_all(&tar[..], 1).expect("zstd");
        let want: [u8; 32] = Sha256::digest(&tar).into();
        for (name, input) in [("plain", &tar), ("gzip", &gzip), ("zstd", &zstd)] {
            let (out, inflated) = through_thread(input);
            assert!(out == tar, "{name}: the stream differs");
            assert_eq!(inflated.tar_sha256, want, "{name}");
            assert_eq!(inflated.source_size, input.len() as u64, "{name}");
        }
    }

    #[test]
    fn dropping_the_stream_ends_the_thread() {
        let tar = [payload(), payload(), payload()].concat();
        let ended = std::thread::scope(|scope| {
            let (mut stream, thread) = spawn(scope, &tar[..]);
            let mut first = [0u8; 512];
            stream.read_exact(&mut first).expect("read");
            drop(stream);
            thread.join().expect("join")
        });
        assert!(ended.is_err(), "the thread read on to the end");
    }
}
