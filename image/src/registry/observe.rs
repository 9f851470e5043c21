//! What each registry HTTP attempt came to, for whoever counts them (the daemon's
//! metrics): the registry client reports, it keeps no counters of its own.

use std::time::Duration;

/// The outcome of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx (or 3xx followed) answer.
    Ok,
    /// 4xx: refused, not found, unauthorized.
    ClientError,
    /// 5xx.
    ServerError,
    /// No HTTP answer (connection, timeout) or one that broke the protocol.
    Transport,
}

impl Outcome {
    pub(super) fn of(status: Option<u16>, ok: bool) -> Self {
        match (ok, status) {
            (true, _) => Self::Ok,
            (false, Some(400..=499)) => Self::ClientError,
            (false, Some(500..=599)) => Self::ServerError,
            (false, _) => Self::Transport,
        }
    }
}

/// Told about every attempt of a range read or manifest pull.
pub trait Observer: Send + Sync + std::fmt::Debug {
    fn attempt(&self, outcome: Outcome, elapsed: Duration);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert_eq!(Outcome::of(Some(206), true), Outcome::Ok);
        assert_eq!(Outcome::of(Some(404), false), Outcome::ClientError);
        assert_eq!(Outcome::of(Some(503), false), Outcome::ServerError);
        assert_eq!(Outcome::of(None, false), Outcome::Transport);
        assert_eq!(Outcome::of(Some(200), false), Outcome::Transport);
    }
}
