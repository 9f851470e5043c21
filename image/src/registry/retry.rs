//! One retry loop for every registry request: jittered exponential backoff, at least
//! as long as the server's `Retry-After`, bounded in attempts and total time.

use std::future::Future;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, RETRY_AFTER};

use super::{RegistryError, RetryPolicy};

/// One attempt's failure: whether it is worth another try, and how long the server
/// asked us to wait.
pub(super) struct Failure {
    pub retryable: bool,
    pub retry_after: Option<Duration>,
    /// The registry answered 401: a cached token may have expired.
    pub unauthorized: bool,
    /// The HTTP status the registry answered, if it answered.
    pub status: Option<u16>,
    pub error: RegistryError,
}

impl Failure {
    pub fn fatal(error: RegistryError) -> Self {
        Self {
            retryable: false,
            retry_after: None,
            unauthorized: false,
            status: None,
            error,
        }
    }

    pub fn transient(error: RegistryError) -> Self {
        Self {
            retryable: true,
            retry_after: None,
            unauthorized: false,
            status: None,
            error,
        }
    }

    pub fn from_reqwest(what: &str, error: reqwest::Error) -> Self {
        // A redirect's storage URL carries its signature: errors never name URLs (what
        // failed is named by `what`, the log line by its registry).
        let error = error.without_url();
        Self {
            retryable: error.is_connect()
                || error.is_timeout()
                || error.is_request()
                || error.is_body(),
            retry_after: None,
            unauthorized: false,
            status: None,
            error: RegistryError::Protocol {
                what: what.to_owned(),
                reason: format!("request: {}", with_causes(&error)),
            },
        }
    }

    /// A non-success HTTP status: 5xx and 429 are worth another try.
    pub fn from_status(what: &str, status: reqwest::StatusCode, headers: &HeaderMap) -> Self {
        Self {
            retryable: status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS,
            retry_after: retry_after(headers),
            unauthorized: status == reqwest::StatusCode::UNAUTHORIZED,
            status: Some(status.as_u16()),
            error: RegistryError::Protocol {
                what: what.to_owned(),
                reason: format!("HTTP {status}"),
            },
        }
    }
}

/// `error` and its causes (reqwest's own message leaves out why, e.g. "connection
/// refused").
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let said = e.to_string();
        if !text.contains(&said) {
            text = format!("{text}: {said}");
        }
        cause = e.source();
    }
    text
}

/// Slowest transfer a bounded request tolerates once its budget is spent: a reply of
/// `size` bytes gets the budget plus `size / MIN_RATE` in all.
pub(super) const MIN_RATE: u64 = 1 << 20;

/// Runs `attempt` until it succeeds, fails for good, or the policy is spent. Attempts
/// run as long as they take (uploads and whole-blob pulls of any size).
pub(super) async fn with_retries<T, F, Fut>(
    policy: &RetryPolicy,
    what: &str,
    attempt: F,
) -> Result<T, RegistryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    retry_loop(policy, what, None, attempt).await
}

/// Like [`with_retries`] for a reply of at most `size` bytes (a range, a manifest),
/// with the whole request — every attempt and wait — bounded by the budget plus
/// `size / MIN_RATE`: a registry that trickles (a byte a minute never trips a read
/// timeout) fails it then, with an error naming the budget.
pub(super) async fn with_retries_within<T, F, Fut>(
    policy: &RetryPolicy,
    what: &str,
    size: u64,
    attempt: F,
) -> Result<T, RegistryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    retry_loop(policy, what, Some(bounded_time(policy, size)), attempt).await
}

/// The longest a bounded request for `size` bytes may take in all.
pub(super) fn bounded_time(policy: &RetryPolicy, size: u64) -> Duration {
    policy.budget + Duration::from_secs(size / MIN_RATE)
}

async fn retry_loop<T, F, Fut>(
    policy: &RetryPolicy,
    what: &str,
    deadline: Option<Duration>,
    mut attempt: F,
) -> Result<T, RegistryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let started = Instant::now();
    let mut tries = 0;
    loop {
        tries += 1;
        let outcome = match deadline {
            None => Ok(attempt().await),
            Some(total) => {
                let left = total.saturating_sub(started.elapsed());
                tokio::time::timeout(left, attempt()).await
            }
        };
        let failure = match outcome {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(failure)) => failure,
            Err(_) => {
                return Err(RegistryError::Protocol {
                    what: what.to_owned(),
                    reason: format!(
                        "no complete answer within the {:?} retry budget (attempt {tries})",
                        deadline.unwrap_or(policy.budget)
                    ),
                });
            }
        };
        let mut delay = policy
            .base_delay
            .saturating_mul(1 << (tries - 1).min(16))
            .min(policy.max_delay);
        delay += delay.mul_f64(jitter());
        if let Some(asked) = failure.retry_after {
            delay = delay.max(asked);
        }
        let out_of_budget = started.elapsed() + delay > policy.budget;
        if !failure.retryable || tries >= policy.max_attempts || out_of_budget {
            return Err(failure.error);
        }
        tracing::warn!(what, attempt = tries, ?delay, error = %failure.error, "registry request failed, retrying");
        tokio::time::sleep(delay).await;
    }
}

/// `Retry-After` in seconds (the HTTP-date form is treated as "soon").
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
        .or(Some(Duration::from_secs(1)))
}

/// 0.0..0.5, cheap and good enough to spread retries.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1000) / 2000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_errors_never_carry_the_url() {
        let signed = "http://127.0.0.1:1/blobs/data?X-Amz-Signature=s3cr3t";
        let error = reqwest::get(signed).await.expect_err("port 1 answered");
        let failure = Failure::from_reqwest("sha256:00", error);
        let text = failure.error.to_string();
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(
            failure.retryable,
            "a refused connection is worth another try"
        );
    }

    fn quick(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
            budget: Duration::from_secs(5),
        }
    }

    fn transient() -> Failure {
        Failure::transient(RegistryError::Protocol {
            what: "x".into(),
            reason: "flaky".into(),
        })
    }

    #[tokio::test]
    async fn transient_failures_are_retried_up_to_the_limit() {
        let mut calls = 0;
        let result: Result<(), _> = with_retries(&quick(4), "x", || {
            calls += 1;
            async { Err(transient()) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls, 4);

        let mut calls = 0;
        let result = with_retries(&quick(4), "x", || {
            calls += 1;
            let ok = calls == 3;
            async move { if ok { Ok(7) } else { Err(transient()) } }
        })
        .await;
        assert_eq!(result.expect("third try succeeds"), 7);
    }

    #[tokio::test]
    async fn fatal_failures_are_not_retried() {
        let mut calls = 0;
        let result: Result<(), _> = with_retries(&quick(4), "x", || {
            calls += 1;
            async {
                Err(Failure::fatal(RegistryError::Protocol {
                    what: "x".into(),
                    reason: "404".into(),
                }))
            }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls, 1);
    }

    #[tokio::test]
    async fn a_retry_after_beyond_the_budget_gives_up_at_once() {
        let policy = RetryPolicy {
            budget: Duration::from_millis(500),
            ..quick(10)
        };
        let started = Instant::now();
        let mut calls = 0;
        let result: Result<(), _> = with_retries(&policy, "x", || {
            calls += 1;
            async {
                Err(Failure {
                    retry_after: Some(Duration::from_secs(60)),
                    ..transient()
                })
            }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls, 1);
        assert!(started.elapsed() < Duration::from_millis(400));
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_that_never_ends_is_cut_at_the_budget() {
        let policy = RetryPolicy {
            budget: Duration::from_secs(30),
            ..quick(10)
        };
        let started = tokio::time::Instant::now();
        let result: Result<(), _> = with_retries_within(&policy, "blob", 4096, || async {
            // A registry sending a byte a minute: the attempt itself never finishes.
            std::future::pending::<Result<(), Failure>>().await
        })
        .await;
        let err = result.expect_err("a stalled attempt succeeded");
        assert!(err.to_string().contains("retry budget"), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }
}
