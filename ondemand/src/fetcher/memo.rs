//! Chunks whose fetch ran out of time, remembered briefly: after a failed readahead the
//! kernel asks again at once for a page of the same range, and that READ should get its
//! EIO at once instead of waiting a second deadline on a stalled source.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Failed chunks remembered before old entries are pruned.
const MAX_KEPT: usize = 4096;

/// (object id, chunk index) → when and why its fetch ran out of time.
pub(super) struct FailureMemo {
    memo: Duration,
    entries: Mutex<HashMap<(u32, u64), (Instant, String)>>,
}

impl FailureMemo {
    pub fn new(memo: Duration) -> Self {
        Self {
            memo,
            entries: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(u32, u64), (Instant, String)>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why chunk `key` failed, if it did within the memo.
    pub fn recent(&self, key: (u32, u64)) -> Option<String> {
        let mut entries = self.lock();
        match entries.get(&key) {
            Some((at, why)) if at.elapsed() < self.memo => {
                Some(format!("failed {:?} ago: {why}", at.elapsed()))
            }
            Some(_) => {
                entries.remove(&key);
                None
            }
            None => None,
        }
    }

    pub fn remember(&self, key: (u32, u64), why: String) {
        let mut entries = self.lock();
        if entries.len() >= MAX_KEPT {
            entries.retain(|_, (at, _)| at.elapsed() < self.memo);
        }
        if entries.len() < MAX_KEPT {
            entries.insert(key, (Instant::now(), why));
        }
    }

    /// Forgets object `object_id` (closed: the kernel may reuse its id).
    pub fn forget_object(&self, object_id: u32) {
        self.lock().retain(|(object, _), _| *object != object_id);
    }
}
