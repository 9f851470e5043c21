//! The lazy layer cache on disk: what each layer holds (bytes, last use, whether a
//! snapshot references it or a mount reads it: [`inventory`]) and garbage collection
//! within the configured limits ([`plan`] decides, [`collect`] removes).
//!
//! A layer's cache goes once no snapshot has referenced it for `unreferenced_grace`;
//! past `max_bytes` or below `min_free_percent` free space, unreferenced layers go
//! earlier, least recently used first. A referenced layer never goes, and neither does
//! one a mount still reads (checked with the kernel: a write lease on the backing file,
//! or cachefiles refusing to cull an object in use).

mod collect;
pub mod inventory;
pub mod plan;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use collect::{Evicted, GcReport, Skipped, collect};
pub use inventory::{Entry, Inventory, LayerUse, State};
pub use plan::Reason;

/// The `[cache]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheLimits {
    /// Bytes the layer cache may hold; 0: no limit.
    pub max_bytes: u64,
    /// Evict until the cache's filesystem has this much free; 0: off.
    pub min_free_percent: u8,
    /// How long the cache of a layer no snapshot references is kept.
    #[serde(with = "duration")]
    pub unreferenced_grace: Duration,
    /// How often the daemon collects; 0: only on `lazy-erofs gc`.
    #[serde(with = "duration")]
    pub gc_interval: Duration,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            max_bytes: 0,
            min_free_percent: 10,
            unreferenced_grace: Duration::from_secs(3600),
            gc_interval: Duration::from_secs(300),
        }
    }
}

/// Durations as humane strings ("10m", "1h 30m", "0s").
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is not a duration (e.g. \"10m\"): {e}"))
        })
    }
}

/// Seconds since the epoch, now.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
