//! Which layers' caches go, decided from figures alone (no I/O), so the policy is
//! tested on its own: first every unreferenced layer idle past the grace period, then,
//! while the cache is over `max_bytes` or its filesystem under `min_free_percent` free,
//! the least recently used of the other unreferenced ones.

use serde::{Deserialize, Serialize};

use super::CacheLimits;

/// Why a layer's cache was (or would be) removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No snapshot referenced it for the grace period.
    Unreferenced,
    /// The cache held more than `max_bytes`.
    OverMaxBytes,
    /// The filesystem had less than `min_free_percent` free.
    BelowMinFree,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unreferenced => "unreferenced",
            Self::OverMaxBytes => "over_max_bytes",
            Self::BelowMinFree => "below_min_free",
        }
    }
}

/// One layer's figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub bytes: u64,
    /// Unix seconds of its last use.
    pub last_used: u64,
    /// Referenced by a snapshot or read by a mount: never evicted.
    pub in_use: bool,
}

/// The cache's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    pub total: u64,
    pub free: u64,
}

/// Indices into `layers` to evict, in order, with why.
pub fn plan(
    layers: &[Candidate],
    limits: &CacheLimits,
    now: u64,
    space: Space,
) -> Vec<(usize, Reason)> {
    let grace = limits.unreferenced_grace.as_secs();
    let mut chosen: Vec<(usize, Reason)> = Vec::new();
    let mut idle: Vec<usize> = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        if layer.in_use {
            continue;
        }
        if now.saturating_sub(layer.last_used) >= grace {
            chosen.push((i, Reason::Unreferenced));
        } else {
            idle.push(i);
        }
    }
    idle.sort_by_key(|&i| (layers[i].last_used, std::cmp::Reverse(layers[i].bytes)));
    let freed: u64 = chosen.iter().map(|&(i, _)| layers[i].bytes).sum();
    let mut held: u64 = layers.iter().map(|l| l.bytes).sum::<u64>() - freed;
    let mut free = space.free.saturating_add(freed);
    let min_free = space.total / 100 * u64::from(limits.min_free_percent);
    for i in idle {
        let reason = if limits.max_bytes > 0 && held > limits.max_bytes {
            Reason::OverMaxBytes
        } else if limits.min_free_percent > 0 && free < min_free {
            Reason::BelowMinFree
        } else {
            break;
        };
        chosen.push((i, reason));
        held -= layers[i].bytes;
        free = free.saturating_add(layers[i].bytes);
    }
    chosen
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(max_bytes: u64, min_free_percent: u8) -> CacheLimits {
        CacheLimits {
            max_bytes,
            min_free_percent,
            unreferenced_grace: Duration::from_secs(100),
            gc_interval: Duration::ZERO,
        }
    }

    fn layer(bytes: u64, last_used: u64, in_use: bool) -> Candidate {
        Candidate {
            bytes,
            last_used,
            in_use,
        }
    }

    const ROOMY: Space = Space {
        total: 1000,
        free: 900,
    };

    #[test]
    fn idle_past_the_grace_goes_in_use_never() {
        let layers = [
            layer(10, 0, false),
            layer(10, 950, false),
            layer(10, 0, true),
        ];
        assert_eq!(
            plan(&layers, &limits(0, 0), 1000, ROOMY),
            vec![(0, Reason::Unreferenced)]
        );
    }

    #[test]
    fn over_the_limit_the_least_recently_used_go_first_and_only_as_many_as_needed() {
        // 60 held, limit 25: the two oldest unreferenced (30, then 10) bring it to 20.
        let layers = [
            layer(10, 960, false),
            layer(30, 920, false),
            layer(15, 990, true),
            layer(5, 980, false),
        ];
        assert_eq!(
            plan(&layers, &limits(25, 0), 1000, ROOMY),
            vec![(1, Reason::OverMaxBytes), (0, Reason::OverMaxBytes)]
        );
        // A limit below what is in use evicts every unreferenced layer, no more.
        let all = plan(&layers, &limits(1, 0), 1000, ROOMY);
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|&(i, _)| !layers[i].in_use));
    }

    #[test]
    fn low_free_space_evicts_until_the_floor_is_back() {
        let layers = [layer(50, 990, false), layer(50, 980, false)];
        let tight = Space {
            total: 1000,
            free: 60,
        };
        // 10 % of 1000 = 100 free wanted: one layer of 50 brings 60 to 110.
        assert_eq!(
            plan(&layers, &limits(0, 10), 1000, tight),
            vec![(1, Reason::BelowMinFree)]
        );
    }
}
