//! Fetching ahead of READs against the recording fake kernel: readahead of forward
//! walks within its budget, and the start-up region fetched at OPEN.

use super::*;

/// A reader walking forward finds the next units fetched before it asks for them; a
/// READ elsewhere starts nothing ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_walk_is_fetched_ahead_and_a_jump_is_not() {
    let source = Arc::new(FakeSource::new(data(16 * MIB as usize)));
    let config = FetcherConfig {
        readahead: 2 * MIB,
        ..FetcherConfig::default()
    };
    let run = start(&[("layer", source.clone())], &[], config);
    assert_eq!(run.open(1, "layer").await, Ok(16 * MIB));
    run.read_and_wait(10, 1, 0, 128 << 10, 1).await;
    run.read_and_wait(11, 1, MIB, 128 << 10, 2).await;
    assert_eq!(source.reads(), 2, "two READs fetched ahead");
    run.read_and_wait(12, 1, 2 * MIB, 128 << 10, 3).await;
    run.script.read(13, 1, 3 * MIB, 128 << 10);
    // Units 0 to 3 asked for; 3, then 4 and 5 fetched ahead (3 joined by its READ), 4
    // and 5 in one request.
    run.script
        .recorder()
        .wait_until(|a| writes(a).len() == 5)
        .await;
    assert_eq!(run.stats.get(Counter::ReadAheadFetches), 3);
    let calls = source.sorted_calls();
    assert_eq!(
        calls,
        vec![
            (0, MIB as usize),
            (MIB, MIB as usize),
            (2 * MIB, MIB as usize),
            (3 * MIB, MIB as usize),
            (4 * MIB, 2 * MIB as usize)
        ],
        "each unit fetched once, the batch ahead in one request"
    );
    assert_eq!(
        run.script.file(1)[..6 * MIB as usize],
        source.data[..6 * MIB as usize],
        "bytes fetched ahead differ"
    );
    run.read_and_wait(14, 1, 12 * MIB, 4096, 5).await;
    assert_eq!(source.reads(), 6, "a jump fetched ahead");
    assert_eq!(run.stats.get(Counter::ReadAheadFetches), 3);
    let _ = run.finish().await;
}

/// Readahead stops at the budget of bytes in flight ahead of READs: a batch that does not
/// fit beside what is in flight is not started, the READ that comes for it fetches its
/// own unit, and the next forward READ starts the batch again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_past_the_budget_is_left_to_the_reads() {
    let mut source = FakeSource::new(data(8 * MIB as usize));
    source.delay = Duration::from_millis(500);
    source.slow_from = 3 * MIB;
    let source = Arc::new(source);
    let config = FetcherConfig {
        readahead: 2 * MIB,
        readahead_budget: 2 * MIB,
        ..FetcherConfig::default()
    };
    let run = start(&[("layer", source.clone())], &[], config);
    assert_eq!(run.open(1, "layer").await, Ok(8 * MIB));
    for unit in 0..3 {
        run.read_and_wait(
            10 + unit as u32,
            1,
            unit * MIB,
            128 << 10,
            unit as usize + 1,
        )
        .await;
    }
    assert_eq!(run.stats.get(Counter::ReadAheadFetches), 1, "unit 3 ahead");
    // Unit 3 takes half a second: units 4 and 5 do not fit beside it.
    run.read_and_wait(13, 1, 3 * MIB, 128 << 10, 4).await;
    assert_eq!(run.stats.get(Counter::ReadAheadSkipped), 1);
    assert_eq!(run.stats.get(Counter::ReadAheadFetches), 1);
    run.read_and_wait(14, 1, 4 * MIB, 128 << 10, 5).await;
    run.script
        .recorder()
        .wait_until(|a| writes(a).len() == 6)
        .await;
    let calls = source.sorted_calls();
    assert_eq!(
        calls[3..],
        [
            (3 * MIB, MIB as usize),
            (4 * MIB, MIB as usize),
            (5 * MIB, 2 * MIB as usize)
        ],
        "unit 4 by its READ, 5 and 6 ahead of the next"
    );
    assert_eq!(
        run.script.file(1)[..7 * MIB as usize],
        source.data[..7 * MIB as usize]
    );
    let _ = run.finish().await;
}

/// The units holding the files an image reads as it starts are fetched as its object
/// is opened, before any READ asks, in runs of 4 MiB (one request each); a READ of one
/// joins its run's fetch, and nothing past the start-up region is fetched unasked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_startup_region_is_fetched_at_open_and_reads_join_it() {
    let mut source = FakeSource::new(data(10 * MIB as usize));
    source.startup = 5 * MIB + 4096; // six units
    source.delay = Duration::from_millis(20);
    let source = Arc::new(source);
    let config = FetcherConfig {
        readahead: 0,
        ..FetcherConfig::default()
    };
    let run = start(&[("layer", source.clone())], &[], config);
    assert_eq!(run.open(1, "layer").await, Ok(10 * MIB));
    run.script.read(10, 1, 4 * MIB, 4096);
    run.script
        .recorder()
        .wait_until(|a| writes(a).len() == 2 && completes(a).len() == 1)
        .await;
    assert_eq!(run.stats.get(Counter::StartupFetches), 6);
    let calls = source.sorted_calls();
    assert_eq!(
        calls,
        [(0, 4 * MIB as usize), (4 * MIB, 2 * MIB as usize)],
        "the start-up units, once each, in two runs"
    );
    assert_eq!(
        run.script.file(1)[..6 * MIB as usize],
        source.data[..6 * MIB as usize],
        "start-up bytes differ"
    );
    run.read_and_wait(11, 1, 8 * MIB, 4096, 2).await;
    assert_eq!(
        source.reads(),
        3,
        "one more unit, for the READ past the region"
    );
    let _ = run.finish().await;
}

/// An object whose `copen` fails fetches none of its start-up region and counts none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_copen_fetches_and_counts_no_startup_region() {
    let mut source = FakeSource::new(data(4 * MIB as usize));
    source.startup = 2 * MIB;
    let source = Arc::new(source);
    // OPEN message 1001 (object 1) fails its copen; object 2's succeeds.
    let run = start(
        &[("layer", source.clone())],
        &[1001],
        FetcherConfig::default(),
    );
    assert_eq!(run.open(1, "layer").await, Ok(4 * MIB), "tried to answer");
    assert_eq!(run.open(2, "layer").await, Ok(4 * MIB));
    run.script
        .recorder()
        .wait_until(|a| !writes(a).is_empty())
        .await;
    assert_eq!(
        run.stats.get(Counter::StartupFetches),
        2,
        "object 2's units"
    );
    assert_eq!(
        *source.calls.lock().expect("calls"),
        [(0, 2 * MIB as usize)],
        "one run, for object 2"
    );
    let _ = run.finish().await;
}

/// Start-up runs give way to READs of objects without a start-up region (a layer's
/// metadata view while the pull mounts it): none starts while such a READ waits on its
/// source, and they run once it is completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_runs_wait_for_metadata_reads_in_flight() {
    let mut metadata = FakeSource::new(data(MIB as usize));
    metadata.delay = Duration::from_millis(400);
    let metadata = Arc::new(metadata);
    let mut layer = FakeSource::new(data(4 * MIB as usize));
    layer.startup = 2 * MIB;
    let layer = Arc::new(layer);
    let run = start(
        &[("metadata", metadata.clone()), ("layer", layer.clone())],
        &[],
        FetcherConfig::default(),
    );
    assert_eq!(run.open(1, "metadata").await, Ok(MIB));
    run.script.read(10, 1, 0, 4096);
    while metadata.reads() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(run.open(2, "layer").await, Ok(4 * MIB));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        layer.reads(),
        0,
        "a start-up run started beside a metadata READ in flight"
    );
    let answers = run
        .script
        .recorder()
        .wait_until(|a| completes(a).len() == 1 && writes(a).len() == 2)
        .await;
    assert_eq!(completes(&answers), [10]);
    assert_eq!(layer.sorted_calls(), [(0, 2 * MIB as usize)], "one run");
    assert_eq!(run.stats.get(Counter::StartupFetches), 2);
    let _ = run.finish().await;
}

/// Two READs of units close together (an importer reading one directory's files in no
/// order) fetch the units between them in one request while the reader goes on; its
/// READs of those units join that fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_units_between_two_near_reads_are_fetched_once_in_one_request() {
    let source = Arc::new(FakeSource::new(data(16 * MIB as usize)));
    let run = start(&[("layer", source.clone())], &[], FetcherConfig::default());
    assert_eq!(run.open(1, "layer").await, Ok(16 * MIB));
    run.read_and_wait(10, 1, 5 * MIB, 16 << 10, 1).await;
    run.read_and_wait(11, 1, 2 * MIB, 16 << 10, 2).await;
    // Units 3 and 4 (between 2 and 5) were started by the second READ.
    run.script
        .recorder()
        .wait_until(|a| writes(a).len() == 3)
        .await;
    assert_eq!(
        source.sorted_calls(),
        vec![
            (2 * MIB, MIB as usize),
            (3 * MIB, 2 * MIB as usize),
            (5 * MIB, MIB as usize)
        ],
        "the gap in one request"
    );
    assert_eq!(run.stats.get(Counter::ReadAheadFetches), 2);
    assert_eq!(
        run.script.file(1)[2 * MIB as usize..6 * MIB as usize],
        source.data[2 * MIB as usize..6 * MIB as usize],
        "bytes fetched for the gap differ"
    );
    // Far from both: nothing between.
    run.read_and_wait(12, 1, 12 * MIB, 4096, 3).await;
    assert_eq!(source.reads(), 4);
    // A READ of a unit the gap fetched is answered without another request.
    run.read_and_wait(13, 1, 4 * MIB, 4096, 4).await;
    assert_eq!(source.reads(), 4, "the gap's unit fetched again");
    let _ = run.finish().await;
}

/// Readahead that finds its units already in flight joins those fetches and counts
/// nothing: `readahead_fetches` counts the units it started, not the ones it joined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_counts_only_the_units_it_started() {
    let mut source = FakeSource::new(data(16 * MIB as usize));
    source.delay = Duration::from_millis(300);
    source.slow_from = 3 * MIB;
    let source = Arc::new(source);
    let run = start(&[("layer", source.clone())], &[], FetcherConfig::default());
    assert_eq!(run.open(1, "layer").await, Ok(16 * MIB));
    run.read_and_wait(10, 1, 5 * MIB, 4096, 1).await;
    // Unit 3 near unit 5: its READ starts unit 4 between them.
    run.script.read(11, 1, 3 * MIB, 4096);
    while source.reads() < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(run.stats.get(Counter::ReadAheadFetches), 1, "unit 4");
    // Unit 2 near unit 5: units 3 and 4 lie between, both in flight already.
    run.script.read(12, 1, 2 * MIB, 4096);
    run.script
        .recorder()
        .wait_until(|a| completes(a).len() == 3)
        .await;
    assert_eq!(
        source.sorted_calls(),
        vec![
            (2 * MIB, MIB as usize),
            (3 * MIB, MIB as usize),
            (4 * MIB, MIB as usize),
            (5 * MIB, MIB as usize)
        ],
        "each unit fetched once"
    );
    assert_eq!(
        run.stats.get(Counter::ReadAheadFetches),
        1,
        "joined units counted"
    );
    let _ = run.finish().await;
}
