//! Readahead for one object: READs that walk forward start fetches of the units after
//! them, so a sequential reader finds the next unit fetched (or in flight) instead of
//! waiting a whole registry round trip per unit. Like the kernel's page-cache
//! readahead: a READ that starts where the stream's last one ended (or inside what was
//! read ahead) may grow the window, up to the configured bytes; any other READ resets
//! it. Units are started in batches: only once no more than half the window is left
//! ahead of the reader does the window double and the units up to its end start, so the
//! fetcher asks for them in a few large range requests instead of one per unit (each
//! request costs the registry a few milliseconds whatever its size).
//! Only the third READ of a forward stream starts it: a program that reads a small file,
//! a file's head, or two neighbouring files fetches nothing extra (the python cold
//! start's 43 scattered READs fetch exactly the units they fetched without readahead;
//! starting after two READs fetched 3 more units there).
//!
//! Scattered READs get one thing: a READ that lands within `readahead_gap` bytes
//! (4 MiB) of one of the last [`RECENT`] READs starts the units between the two. A
//! program that imports its modules one by one reads a directory's files in no order,
//! but close together (the python cold start missed units 26, 33, 31, 5, 32, 28, 29, 27,
//! 30 of one layer in that order, each a registry round trip while python waited); the
//! units between two near misses are mostly read soon after. In a replay of that cold
//! start's 38 misses, a 4-unit gap left 28 waits for 4 more units fetched, an 8-unit one
//! 22 for 14 more (past the goal of 1.5× the bytes read).

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use super::{Fetcher, Object, RUN_BYTES};
use crate::kernel::Kernel;
use crate::stats::Counter;
use crate::sys::PAGE_SIZE;

/// Forward READs in a row before anything is fetched ahead of the next.
const MIN_STREAK: u32 = 2;
/// The READs a new one is compared with for gaps.
const RECENT: usize = 2;

/// One object's stream state, and which units this fetcher has written (the kernel
/// sends no READ for those, so they are never fetched ahead twice).
#[derive(Debug, Default)]
pub(super) struct ReadAhead {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// A READ came before: the next one may walk on from it.
    seen: bool,
    /// Forward READs in a row.
    streak: u32,
    /// The unit after the stream's furthest READ.
    next: u64,
    /// The end of the units started ahead.
    until: u64,
    /// Units fetched ahead of the next READ, doubling per forward READ.
    window: u64,
    /// The units of the last [`RECENT`] READs, oldest first.
    recent: VecDeque<Range<u64>>,
    written: HashSet<u64>,
}

impl ReadAhead {
    /// For a READ of units `first..end` of an object of `units` units: the units to
    /// fetch ahead of it (none past `max_window` units after `end`, none written; 0
    /// turns readahead off) and between it and a recent READ at most `gap` units away.
    pub(super) fn after_read(
        &self,
        first: u64,
        end: u64,
        units: u64,
        max_window: u64,
        gap: u64,
    ) -> Vec<u64> {
        let mut state = self.lock();
        if max_window == 0 {
            return Vec::new();
        }
        // The stream's last unit again (a READ that raced its fetch): neither on nor off.
        if state.seen && first + 1 == state.next && end <= state.next {
            return Vec::new();
        }
        let forward = state.seen && first >= state.next && first <= state.next.max(state.until);
        state.seen = true;
        // A forward READ continues the stream: nothing lies between it and the last one.
        let between = if forward {
            Vec::new()
        } else {
            state.between(first, end, gap)
        };
        if state.recent.len() == RECENT {
            state.recent.pop_front();
        }
        state.recent.push_back(first..end);
        if !forward {
            // A new stream may start here: its next READ at `end` reads forward.
            state.streak = 0;
            state.window = 0;
            state.next = end;
            state.until = end;
            return between;
        }
        state.streak += 1;
        state.next = state.next.max(end);
        if state.streak < MIN_STREAK || state.until.saturating_sub(end) > state.window / 2 {
            return Vec::new();
        }
        state.window = (state.window * 2).clamp(1, max_window);
        let range: Range<u64> = state.until.max(end)..(end + state.window).min(units);
        state.until = state.until.max(range.end);
        range.filter(|unit| !state.written.contains(unit)).collect()
    }

    /// The units from `index` on were not started after all (over the budget): a later
    /// forward READ asks for them again.
    pub(super) fn not_started(&self, index: u64) {
        let mut state = self.lock();
        state.until = state.until.min(index);
    }

    /// Unit `index` is in the cache file.
    pub(super) fn written(&self, index: u64) {
        self.lock().written.insert(index);
    }

    /// Whether this fetcher wrote unit `index` (a READ of it raced the write).
    pub(super) fn is_written(&self, index: u64) -> bool {
        self.lock().written.contains(&index)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl State {
    /// Unwritten units between a READ of `first..end` and each recent READ whose
    /// nearest unit is at most `gap` units from the READ's nearest one, in order.
    fn between(&self, first: u64, end: u64, gap: u64) -> Vec<u64> {
        let mut units = BTreeSet::new();
        for other in &self.recent {
            if other.end <= first && first + 1 - other.end <= gap {
                units.extend(other.end..first);
            } else if other.start >= end && other.start + 1 - end <= gap {
                units.extend(end..other.start);
            }
        }
        units.retain(|unit| !self.written.contains(unit));
        units.into_iter().collect()
    }
}

impl<K: Kernel> Fetcher<K> {
    /// Starts the fetches of the units after a forward-walking READ of `first..last`, in
    /// runs of up to [`RUN_BYTES`] (one range request each); nobody waits for them, a
    /// later READ of one joins its run's fetch.
    pub(super) fn read_ahead(
        &self,
        object_id: u32,
        object: &Arc<Object<K::Object>>,
        first: u64,
        last: u64,
    ) {
        let units = object.source.size().div_ceil(object.unit);
        let window = self.parts.config.readahead.div_ceil(object.unit);
        let gap = self.parts.config.readahead_gap / object.unit;
        let ahead = object.ahead.after_read(first, last, units, window, gap);
        let per_run = (RUN_BYTES / object.unit).max(1);
        let mut at = 0;
        while let Some(&index) = ahead.get(at) {
            let mut len = 1;
            while len < per_run && ahead.get(at + len as usize) == Some(&(index + len)) {
                len += 1;
            }
            // Over budget: the rest is left to the READs that come for it.
            let Some(permit) = self.ahead_permit(len * object.unit) else {
                self.parts.stats.add(Counter::ReadAheadSkipped, 1);
                object.ahead.not_started(index);
                return;
            };
            let run = self.run(object_id, object, index, len, Some(permit));
            self.parts
                .stats
                .add(Counter::ReadAheadFetches, run.started());
            at += run.covered as usize;
            let fetch = run.fetch;
            tokio::spawn(async move {
                if let Err(err) = fetch.await {
                    tracing::debug!(
                        index,
                        "readahead failed (a READ of it fetches again): {err}"
                    );
                }
            });
        }
    }

    /// The budget for `bytes` more in flight ahead of READs, if it has room; a run larger
    /// than the whole budget (a blob of huge chunks) needs all of it.
    fn ahead_permit(&self, bytes: u64) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let pages = usize::try_from(bytes / PAGE_SIZE as u64)
            .unwrap_or(usize::MAX)
            .min(self.ahead_budget_pages)
            .max(1);
        let pages = u32::try_from(pages).ok()?;
        self.ahead_budget.clone().try_acquire_many_owned(pages).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::ReadAhead;

    #[test]
    fn a_forward_walk_grows_the_window_and_never_asks_twice() {
        let ahead = ReadAhead::default();
        assert!(ahead.after_read(0, 1, 100, 8, 0).is_empty(), "a lone READ");
        assert!(ahead.after_read(1, 2, 100, 8, 0).is_empty(), "two READs");
        assert_eq!(ahead.after_read(2, 3, 100, 8, 0), vec![3]);
        // The kernel asks for unit 3 (in flight): the window doubles past what was asked.
        assert_eq!(ahead.after_read(3, 4, 100, 8, 0), vec![4, 5]);
        assert_eq!(ahead.after_read(4, 5, 100, 8, 0), vec![6, 7, 8]);
        // More than half the window (4) is still ahead: nothing yet, then a batch.
        assert!(ahead.after_read(5, 6, 100, 8, 0).is_empty());
        assert_eq!(
            ahead.after_read(6, 7, 100, 8, 0),
            vec![9, 10, 11, 12, 13, 14]
        );
        for unit in 7..10 {
            assert!(ahead.after_read(unit, unit + 1, 100, 8, 0).is_empty());
        }
        let capped = ahead.after_read(10, 11, 100, 8, 0);
        assert_eq!(capped, vec![15, 16, 17, 18], "capped at 8 past 11");
    }

    #[test]
    fn a_jump_resets_a_raced_reread_does_not_and_the_object_end_bounds() {
        let ahead = ReadAhead::default();
        assert!(ahead.after_read(0, 1, 20, 4, 0).is_empty());
        assert!(ahead.after_read(1, 2, 20, 4, 0).is_empty());
        assert!(ahead.after_read(1, 2, 20, 4, 0).is_empty(), "raced re-READ");
        assert_eq!(
            ahead.after_read(2, 3, 20, 4, 0),
            vec![3],
            "the stream went on"
        );
        assert!(ahead.after_read(7, 8, 20, 4, 0).is_empty(), "random read");
        assert!(ahead.after_read(8, 9, 20, 4, 0).is_empty());
        assert_eq!(ahead.after_read(9, 10, 20, 4, 0), vec![10], "a new stream");
        let short = ReadAhead::default();
        for unit in 0..3 {
            assert!(
                short.after_read(unit, unit + 1, 3, 4, 0).is_empty(),
                "past the end"
            );
        }
    }

    #[test]
    fn written_units_are_skipped_and_zero_turns_it_off() {
        let ahead = ReadAhead::default();
        ahead.written(4);
        assert!(ahead.after_read(0, 1, 10, 4, 0).is_empty());
        assert!(ahead.after_read(1, 2, 10, 4, 0).is_empty());
        assert_eq!(ahead.after_read(2, 3, 10, 4, 0), vec![3]);
        assert_eq!(ahead.after_read(3, 4, 10, 4, 0), vec![5]);
        let off = ReadAhead::default();
        for unit in 0..4 {
            assert!(off.after_read(unit, unit + 1, 10, 0, 4).is_empty());
        }
    }

    /// The python cold start's first misses of one layer: the units between two READs
    /// at most 4 units apart are fetched, nothing for READs further apart, nothing
    /// written, and each unit is asked for once.
    #[test]
    fn the_units_between_near_reads_are_fetched() {
        let ahead = ReadAhead::default();
        ahead.written(30);
        assert!(
            ahead.after_read(26, 27, 100, 8, 4).is_empty(),
            "a lone READ"
        );
        assert_eq!(ahead.after_read(29, 30, 100, 8, 4), vec![27, 28], "26 → 29");
        assert!(
            ahead.after_read(5, 6, 100, 8, 4).is_empty(),
            "far from 26 and 29"
        );
        assert_eq!(
            ahead.after_read(33, 34, 100, 8, 4),
            vec![31, 32],
            "29 → 33, 30 written; 5 is too far"
        );
        assert!(
            ahead.after_read(40, 41, 100, 8, 4).is_empty(),
            "7 units away"
        );
        // Backwards works too; only the last two READs count (33 and 40, not 29).
        assert_eq!(
            ahead.after_read(37, 38, 100, 8, 4),
            vec![34, 35, 36, 38, 39]
        );
        assert!(
            ahead.after_read(28, 29, 100, 8, 4).is_empty(),
            "29 was forgotten"
        );
    }
}
