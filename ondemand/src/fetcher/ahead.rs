//! Readahead for one object: READs that walk forward start fetches of the units after
//! them, so a sequential reader finds the next unit fetched (or in flight) instead of
//! waiting a whole registry round trip per unit. Like the kernel's page-cache
//! readahead: a READ that starts where the stream's last one ended (or inside what was
//! read ahead) doubles the window, up to the configured bytes; any other READ resets it.
//! A lone READ fetches nothing ahead, even at offset 0: a program that reads one small
//! file (or a file's head) costs no more than before.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Mutex;

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
    /// The unit after the stream's furthest READ.
    next: u64,
    /// The end of the units started ahead.
    until: u64,
    /// Units fetched ahead of the next READ, doubling per forward READ.
    window: u64,
    written: HashSet<u64>,
}

impl ReadAhead {
    /// For a READ of units `first..end` of an object of `units` units: the units to
    /// fetch ahead of it (none past `max_window` units after `end`, none written).
    pub(super) fn after_read(&self, first: u64, end: u64, units: u64, max_window: u64) -> Vec<u64> {
        let mut state = self.lock();
        if max_window == 0 {
            return Vec::new();
        }
        let forward = state.seen
            && first >= state.next.saturating_sub(1)
            && first <= state.next.max(state.until);
        state.seen = true;
        if forward {
            state.window = (state.window * 2).clamp(1, max_window);
            state.next = state.next.max(end);
        } else {
            // A new stream may start here: its next READ at `end` reads forward.
            state.window = 0;
            state.next = end;
            state.until = end;
            return Vec::new();
        }
        let range: Range<u64> = state.until.max(end)..(end + state.window).min(units);
        state.until = state.until.max(range.end);
        range.filter(|unit| !state.written.contains(unit)).collect()
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

#[cfg(test)]
mod tests {
    use super::ReadAhead;

    #[test]
    fn a_forward_walk_grows_the_window_and_never_asks_twice() {
        let ahead = ReadAhead::default();
        assert!(ahead.after_read(0, 1, 100, 8).is_empty(), "a lone READ");
        assert_eq!(ahead.after_read(1, 2, 100, 8), vec![2]);
        // The kernel asks for unit 2 (in flight): the window doubles past what was asked.
        assert_eq!(ahead.after_read(2, 3, 100, 8), vec![3, 4]);
        assert_eq!(ahead.after_read(3, 4, 100, 8), vec![5, 6, 7]);
        assert_eq!(ahead.after_read(4, 5, 100, 8), vec![8, 9, 10, 11, 12]);
        let capped = ahead.after_read(5, 6, 100, 8);
        assert_eq!(capped, vec![13], "capped at 8 past 6");
    }

    #[test]
    fn a_jump_resets_and_the_object_end_bounds() {
        let ahead = ReadAhead::default();
        assert!(ahead.after_read(0, 1, 10, 4).is_empty());
        assert_eq!(ahead.after_read(1, 2, 10, 4), vec![2]);
        assert!(ahead.after_read(7, 8, 10, 4).is_empty(), "random read");
        assert_eq!(ahead.after_read(8, 9, 10, 4), vec![9], "a new stream");
        assert!(ahead.after_read(9, 10, 10, 4).is_empty(), "past the end");
    }

    #[test]
    fn written_units_are_skipped_and_zero_turns_it_off() {
        let ahead = ReadAhead::default();
        ahead.written(3);
        assert!(ahead.after_read(0, 1, 10, 4).is_empty());
        assert_eq!(ahead.after_read(1, 2, 10, 4), vec![2]);
        assert_eq!(ahead.after_read(2, 3, 10, 4), vec![4]);
        let off = ReadAhead::default();
        assert!(off.after_read(0, 1, 10, 0).is_empty());
        assert!(off.after_read(1, 2, 10, 0).is_empty());
    }
}
