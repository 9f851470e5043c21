//! Fault injection for failover tests: a named fake. The real kernel and a real SIGKILL
//! cannot choose the instant a fetcher dies, so tests ask a fetcher to kill itself at a
//! precise point. Set `LAZY_EROFS_FAULT=<point>[:<nth>]` in the supervisor's environment;
//! the fault fires once across all fetcher generations (claimed in the shared stats).
//! Compiled in only with the `fault-injection` feature, which the tests enable.

use crate::stats::{Counter, Stats};

pub const ENV: &str = "LAZY_EROFS_FAULT";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// On an OPEN, before `copen` is written.
    CrashInOpen,
    /// On a READ, after its bytes were written to the cache file, before READ_COMPLETE.
    CrashAfterWrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub point: FaultPoint,
    /// Fire at the nth occurrence of the point in a child (1-based).
    pub nth: u64,
}

impl Fault {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (point, nth) = text.split_once(':').unwrap_or((text, "1"));
        let point = match point {
            "crash-in-open" => FaultPoint::CrashInOpen,
            "crash-after-write" => FaultPoint::CrashAfterWrite,
            other => {
                return Err(format!(
                    "unknown fault point '{other}' (crash-in-open, crash-after-write)"
                ));
            }
        };
        let nth = nth
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("bad fault count '{nth}'"))?;
        Ok(Self { point, nth })
    }

    /// From the environment; a malformed value is reported and ignored.
    /// Only builds with the `fault-injection` feature (the tests') honour it: a release
    /// daemon must not let its environment kill its fetchers.
    pub fn from_env() -> Option<Self> {
        let text = std::env::var(ENV).ok()?;
        if !cfg!(feature = "fault-injection") {
            tracing::warn!("{ENV} is set, but this build has no fault injection; ignored");
            return None;
        }
        match Self::parse(&text) {
            Ok(fault) => Some(fault),
            Err(err) => {
                tracing::error!("{ENV}={text}: {err}; no fault injected");
                None
            }
        }
    }
}

/// Counts occurrences of a point in this child and kills the process (SIGKILL, like an
/// OOM kill) at the chosen one, if no earlier generation already fired the fault.
#[derive(Debug)]
pub struct FaultTrigger {
    fault: Option<Fault>,
    seen: std::sync::atomic::AtomicU64,
}

impl FaultTrigger {
    pub fn new(fault: Option<Fault>) -> Self {
        Self {
            fault,
            seen: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn hit(&self, point: FaultPoint, stats: &Stats) {
        let Some(fault) = self.fault.filter(|f| f.point == point) else {
            return;
        };
        let n = self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n == fault.nth && stats.claim_once(Counter::FaultsFired) {
            tracing::warn!(?point, "injected fault: fetcher kills itself");
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_fault_specs() {
        assert_eq!(
            Fault::parse("crash-in-open"),
            Ok(Fault {
                point: FaultPoint::CrashInOpen,
                nth: 1
            })
        );
        assert_eq!(
            Fault::parse("crash-after-write:5"),
            Ok(Fault {
                point: FaultPoint::CrashAfterWrite,
                nth: 5
            })
        );
        assert!(Fault::parse("crash-after-write:0").is_err());
        assert!(Fault::parse("explode").is_err());
    }
}
