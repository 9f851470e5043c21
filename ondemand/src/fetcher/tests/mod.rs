//! The fetcher against a recording fake kernel: single-flight, retries, deadlines, and
//! the OPEN / READ / CLOSE orders the real kernel produces only by chance.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::fake::{Answer, FakeBlobs, FakeSource, Script, completes, writes};
use super::*;
use crate::fault::FaultTrigger;
use crate::stats::{Counter, Stats};

const MIB: u64 = 1 << 20;

fn data(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4093) as u8).collect()
}

struct Run {
    script: Script,
    stats: Arc<Stats>,
    served: tokio::task::JoinHandle<Result<(), FetcherError>>,
}

/// A fetcher serving `sources` (cookie → source) over a fake kernel.
fn start(
    sources: &[(&str, Arc<FakeSource>)],
    failing_copens: &[u32],
    config: FetcherConfig,
) -> Run {
    let (script, kernel) = Script::new(failing_copens);
    let blobs = Arc::new(FakeBlobs {
        sources: sources
            .iter()
            .map(|(name, source)| ((*name).to_owned(), source.clone()))
            .collect(),
    });
    let stats = Arc::new(Stats::create().expect("stats"));
    let served = tokio::spawn(serve(FetcherParts {
        device: Arc::new(kernel),
        resolver: blobs.clone(),
        factory: blobs,
        stats: stats.clone(),
        faults: Arc::new(FaultTrigger::new(None)),
        config,
    }));
    Run {
        script,
        stats,
        served,
    }
}

impl Run {
    /// Sends READ `msg_id` of `len` bytes at `offset` and waits until `completed` READs
    /// have been completed in all.
    async fn read_and_wait(
        &self,
        msg_id: u32,
        object_id: u32,
        offset: u64,
        len: u64,
        completed: usize,
    ) {
        self.script.read(msg_id, object_id, offset, len);
        self.script
            .recorder()
            .wait_until(|a| completes(a).len() == completed)
            .await;
    }
}

fn fast_retries() -> FetcherConfig {
    FetcherConfig {
        retry_base: Duration::from_millis(1),
        ..FetcherConfig::default()
    }
}

impl Run {
    /// OPENs `cookie` as object `object` (message id 1000 + object) and waits for its copen.
    async fn open(&self, object: u32, cookie: &str) -> Result<u64, Errno> {
        let msg_id = 1000 + object;
        self.script.open(msg_id, object, "dom", cookie);
        let answers = self
            .script
            .recorder()
            .wait_until(|a| {
                a.iter()
                    .any(|a| matches!(a, Answer::Copen { msg_id: m, .. } if *m == msg_id))
            })
            .await;
        answers
            .into_iter()
            .find_map(|a| match a {
                Answer::Copen { msg_id: m, size } if m == msg_id => Some(size),
                _ => None,
            })
            .expect("copen")
    }

    /// Closes the fake device and returns what the fetcher said when it stopped.
    async fn finish(self) -> Result<(), FetcherError> {
        drop(self.script);
        self.served.await.expect("fetcher task")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_reads_share_one_fetch_and_one_write_per_chunk() {
    let mut source = FakeSource::new(data(3 * MIB as usize));
    source.delay = Duration::from_millis(100);
    let source = Arc::new(source);
    let config = FetcherConfig {
        readahead: 0, // counts what READs alone fetch
        ..FetcherConfig::default()
    };
    let run = start(&[("layer", source.clone())], &[], config);
    assert_eq!(run.open(1, "layer").await, Ok(3 * MIB));
    // Two READs inside chunk 0 and one spanning chunks 0 and 1, all before any fetch ends.
    run.script.read(10, 1, 0, 128 << 10);
    run.script.read(11, 1, 512 << 10, 128 << 10);
    run.script.read(12, 1, MIB - 4096, 8192);
    let answers = run
        .script
        .recorder()
        .wait_until(|a| completes(a).len() == 3)
        .await;
    assert_eq!(source.reads(), 2, "chunks 0 and 1 fetched once each");
    let mut written = writes(&answers);
    written.sort_unstable();
    assert_eq!(written, vec![(0, MIB as usize), (MIB, MIB as usize)]);
    // Every completion comes after the writes that filled its range.
    let at = |wanted: &Answer| answers.iter().position(|a| a == wanted).expect("answered");
    let write = |offset| {
        at(&Answer::Write {
            object: 1,
            offset,
            len: MIB as usize,
        })
    };
    let complete = |msg_id| at(&Answer::Complete { object: 1, msg_id });
    assert!(complete(10) > write(0) && complete(11) > write(0));
    assert!(complete(12) > write(0) && complete(12) > write(MIB));
    assert_eq!(
        run.script.file(1)[..2 * MIB as usize],
        source.data[..2 * MIB as usize]
    );
    assert_eq!(run.stats.get(Counter::ReadsServed), 3);
    assert_eq!(run.stats.get(Counter::BytesFetched), 2 * MIB);
    assert!(
        run.finish().await.is_err(),
        "a closed device ends the fetcher with an error"
    );
}

/// A blob stored in 4 MiB pieces is fetched in whole pieces: READs in its first and
/// third MiB cost one fetch of 4 MiB, not one (of the same piece) per MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_in_large_pieces_is_fetched_a_whole_piece_at_a_time() {
    let mut source = FakeSource::new(data(6 * MIB as usize));
    source.piece = Some(4 * MIB);
    let source = Arc::new(source);
    let run = start(&[("layer", source.clone())], &[], FetcherConfig::default());
    assert_eq!(run.open(1, "layer").await, Ok(6 * MIB));
    run.script.read(10, 1, 0, 128 << 10);
    run.script.read(11, 1, 2 * MIB, 128 << 10);
    run.read_and_wait(12, 1, 5 * MIB, 128 << 10, 3).await;
    let calls = source.sorted_calls();
    assert_eq!(
        calls,
        vec![(0, 4 * MIB as usize), (4 * MIB, 2 * MIB as usize)],
        "whole pieces, once each"
    );
    assert_eq!(run.script.file(1)[..], source.data[..]);
    let _ = run.finish().await;
}

#[test]
fn fetch_units_are_whole_pieces_and_pages() {
    use crate::fetcher::fetch_unit;
    assert_eq!(fetch_unit(MIB, None), MIB);
    assert_eq!(fetch_unit(MIB, Some(4096)), MIB);
    assert_eq!(fetch_unit(MIB, Some(4 * MIB)), 4 * MIB);
    assert_eq!(fetch_unit(MIB, Some(3 * MIB)), 3 * MIB);
    assert_eq!(fetch_unit(MIB, Some(768 << 10)), 1536 << 10);
    assert_eq!(fetch_unit(MIB, Some(100)), MIB);
    assert_eq!(fetch_unit(MIB, Some(1 << 40)), 64 * MIB, "bounded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_fetches_are_retried_then_served() {
    let source = Arc::new(FakeSource::new(data(MIB as usize)));
    source.failures.store(2, Ordering::SeqCst);
    let run = start(&[("layer", source.clone())], &[], fast_retries());
    run.open(1, "layer").await.expect("opened");
    run.script.read(10, 1, 4096, 4096);
    let answers = run
        .script
        .recorder()
        .wait_until(|a| completes(a) == [10])
        .await;
    assert_eq!(source.reads(), 3);
    assert_eq!(writes(&answers), vec![(0, MIB as usize)]);
    assert_eq!(run.script.file(1), source.data);
    assert_eq!(run.stats.get(Counter::FetchRetries), 2);
    assert_eq!(run.stats.get(Counter::ReadsServed), 1);
    assert_eq!(run.stats.get(Counter::ReadsFailed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_retries_run_out_is_completed_unwritten() {
    let source = Arc::new(FakeSource::new(data(MIB as usize)));
    source.failures.store(u32::MAX, Ordering::SeqCst);
    let config = FetcherConfig {
        retries: 2,
        ..fast_retries()
    };
    let run = start(&[("layer", source.clone())], &[], config);
    run.open(1, "layer").await.expect("opened");
    run.script.read(10, 1, 0, 4096);
    let answers = run
        .script
        .recorder()
        .wait_until(|a| completes(a) == [10])
        .await;
    // Completed without a write: the kernel gives the reader EIO, never zeros.
    assert!(writes(&answers).is_empty(), "{answers:?}");
    assert_eq!(source.reads(), 3, "one try and two retries");
    assert_eq!(run.stats.get(Counter::ReadsFailed), 1);
    assert_eq!(run.stats.get(Counter::ReadsServed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_just_ran_out_of_time_fails_again_at_once_then_is_fetched_anew() {
    let source = Arc::new(FakeSource::new(data(MIB as usize)));
    source.hangs.store(1, Ordering::SeqCst);
    let config = FetcherConfig {
        deadline: Duration::from_millis(200),
        failure_memo: Duration::from_millis(500),
        ..fast_retries()
    };
    let run = start(&[("layer", source.clone())], &[], config);
    run.open(1, "layer").await.expect("opened");
    // A readahead that runs out of time, then the kernel's immediate retry of one page.
    run.script.read(10, 1, 0, 128 << 10);
    run.script
        .recorder()
        .wait_until(|a| completes(a) == [10])
        .await;
    let retried = Instant::now();
    run.script.read(11, 1, 0, 4096);
    run.script
        .recorder()
        .wait_until(|a| completes(a) == [10, 11])
        .await;
    assert!(
        retried.elapsed() < Duration::from_millis(150),
        "{:?}",
        retried.elapsed()
    );
    assert_eq!(source.reads(), 1, "the retry waited for a second fetch");
    assert_eq!(run.stats.get(Counter::ReadsFailed), 2);
    // Once the memo has passed, the chunk is fetched again (and now succeeds).
    tokio::time::sleep(Duration::from_millis(600)).await;
    run.script.read(12, 1, 0, 4096);
    let answers = run
        .script
        .recorder()
        .wait_until(|a| completes(a) == [10, 11, 12])
        .await;
    assert_eq!(source.reads(), 2);
    assert_eq!(writes(&answers), vec![(0, MIB as usize)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_failure_is_not_remembered_the_next_read_fetches_again() {
    let source = Arc::new(FakeSource::new(data(MIB as usize)));
    source.failures.store(1, Ordering::SeqCst);
    let config = FetcherConfig {
        retries: 0,
        ..fast_retries()
    };
    let run = start(&[("layer", source.clone())], &[], config);
    run.open(1, "layer").await.expect("opened");
    run.script.read(10, 1, 0, 4096);
    run.script
        .recorder()
        .wait_until(|a| completes(a) == [10])
        .await;
    // The registry recovered (one corrupt reply, say): the very next read works.
    run.script.read(11, 1, 0, 4096);
    let answers = run
        .script
        .recorder()
        .wait_until(|a| completes(a) == [10, 11])
        .await;
    assert_eq!(source.reads(), 2);
    assert_eq!(writes(&answers), vec![(0, MIB as usize)]);
    assert_eq!(run.stats.get(Counter::ReadsFailed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_bounds_a_hanging_source() {
    let mut source = FakeSource::new(data(MIB as usize));
    source.delay = Duration::from_secs(60);
    let source = Arc::new(source);
    let config = FetcherConfig {
        deadline: Duration::from_millis(300),
        ..FetcherConfig::default()
    };
    let run = start(&[("layer", source.clone())], &[], config);
    run.open(1, "layer").await.expect("opened");
    let asked = Instant::now();
    run.script.read(10, 1, 0, 4096);
    let answers = run
        .script
        .recorder()
        .wait_until(|a| completes(a) == [10])
        .await;
    let waited = asked.elapsed();
    assert!(writes(&answers).is_empty());
    assert!(
        waited < Duration::from_secs(5),
        "completed after {waited:?}"
    );
    assert_eq!(run.stats.get(Counter::ReadsFailed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_close_is_dropped_and_the_fetcher_keeps_serving() {
    let source = Arc::new(FakeSource::new(data(MIB as usize)));
    let run = start(&[("layer", source.clone())], &[], FetcherConfig::default());
    run.open(1, "layer").await.expect("opened");
    run.script.close(20, 1);
    run.script.read(10, 1, 0, 4096);
    // A later object still gets served, so the stale READ was handled (and dropped).
    run.open(2, "layer").await.expect("opened again");
    run.script.read(11, 2, 0, 4096);
    let answers = run
        .script
        .recorder()
        .wait_until(|a| completes(a).contains(&11))
        .await;
    assert_eq!(
        completes(&answers),
        vec![11],
        "no completion for the closed object"
    );
    assert_eq!(source.reads(), 1, "nothing fetched for the closed object");
    assert_eq!(run.stats.get(Counter::Closes), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_copen_forgets_its_object() {
    let source = Arc::new(FakeSource::new(data(MIB as usize)));
    // OPEN message 1001 (object 1) fails its copen; object 2's succeeds.
    let run = start(
        &[("layer", source.clone())],
        &[1001],
        FetcherConfig::default(),
    );
    assert_eq!(
        run.open(1, "layer").await,
        Ok(MIB),
        "the fetcher tried to answer"
    );
    run.script.read(10, 1, 0, 4096);
    run.open(2, "layer").await.expect("opened");
    run.script.read(11, 2, 0, 4096);
    let answers = run
        .script
        .recorder()
        .wait_until(|a| completes(a).contains(&11))
        .await;
    assert_eq!(completes(&answers), vec![11]);
    assert_eq!(source.reads(), 1);
    assert_eq!(run.stats.get(Counter::Opens), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_that_cannot_be_served_are_refused_with_an_errno() {
    let run = start(&[], &[], FetcherConfig::default());
    assert_eq!(run.open(1, "unknown").await, Err(Errno::ENOENT));
    assert_eq!(run.open(2, "factory-fails").await, Err(Errno::ENOENT));
    assert_eq!(run.open(3, "resolver-fails").await, Err(Errno::EIO));
    assert_eq!(run.stats.get(Counter::OpensRefused), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_last_chunk_is_written_in_whole_pages_and_reads_are_clipped_to_the_size() {
    let size = MIB as usize + 100;
    let source = Arc::new(FakeSource::new(data(size)));
    let run = start(&[("layer", source.clone())], &[], FetcherConfig::default());
    run.open(1, "layer").await.expect("opened");
    // The kernel asks past the end (whole pages); only the blob's bytes are fetched.
    run.script.read(10, 1, MIB, 8192);
    let answers = run
        .script
        .recorder()
        .wait_until(|a| completes(a) == [10])
        .await;
    assert_eq!(writes(&answers), vec![(MIB, 4096)]);
    let file = run.script.file(1);
    assert_eq!(file[MIB as usize..size], source.data[MIB as usize..]);
    assert!(file[size..].iter().all(|b| *b == 0));
    assert_eq!(run.stats.get(Counter::BytesFetched), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_one_object_does_not_wait_for_another_objects_slow_source() {
    let mut slow = FakeSource::new(data(MIB as usize));
    slow.delay = Duration::from_secs(3);
    let (slow, fast) = (
        Arc::new(slow),
        Arc::new(FakeSource::new(data(MIB as usize))),
    );
    let run = start(
        &[("slow", slow), ("fast", fast)],
        &[],
        FetcherConfig::default(),
    );
    run.open(1, "slow").await.expect("opened");
    run.open(2, "fast").await.expect("opened");
    run.script.read(10, 1, 0, 4096);
    let asked = Instant::now();
    run.script.read(11, 2, 0, 4096);
    run.script
        .recorder()
        .wait_until(|a| completes(a).contains(&11))
        .await;
    let fast_took = asked.elapsed();
    assert!(
        !run.script.recorder().completes().contains(&10),
        "the slow READ is still fetching"
    );
    assert!(
        fast_took < Duration::from_secs(2),
        "fast READ took {fast_took:?}"
    );
}

#[test]
fn volume_keys_name_their_domain() {
    assert_eq!(erofs_domain(b"erofs,dom-1\0").as_deref(), Some("dom-1"));
    assert_eq!(erofs_domain(b"erofs,x").as_deref(), Some("x"));
    assert_eq!(erofs_domain(b"other,x\0"), None);
    assert_eq!(erofs_domain(b"erofs,\xff\0"), None);
}

#[test]
fn backoff_doubles_with_bounded_jitter() {
    let base = Duration::from_millis(50);
    for attempt in 1..=4 {
        let d = backoff(base, attempt);
        let floor = base * (1 << (attempt - 1));
        assert!(
            d >= floor && d <= floor.mul_f64(1.5),
            "attempt {attempt}: {d:?}"
        );
    }
}

mod ahead;
