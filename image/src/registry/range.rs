//! Blob range reads with retries: the fetcher's hot path, so it talks HTTP itself
//! (reqwest) to see status codes and `Retry-After`, which oci-client does not expose.
//! Authorisation comes from oci-client (bearer token) or the basic credentials.

use std::time::{Duration, Instant};

use futures::StreamExt;
use oci_client::Reference;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderMap, RANGE, RETRY_AFTER};

use super::{Credentials, RegistryError};

/// How hard a read tries before giving up.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// No retry starts after this much time has passed since the first attempt.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 6,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            budget: Duration::from_secs(30),
        }
    }
}

/// One attempt's failure: whether it is worth another try, and how long the server
/// asked us to wait.
struct Failure {
    retryable: bool,
    retry_after: Option<Duration>,
    error: RegistryError,
}

/// One range of one blob, and the bearer token to send (if the registry uses them).
#[derive(Clone, Copy)]
pub(super) struct RangeRequest<'a> {
    pub image: &'a Reference,
    pub bearer: Option<&'a str>,
    pub digest: &'a str,
    pub offset: u64,
    pub len: u64,
}

pub(super) struct RangeClient {
    pub http: reqwest::Client,
    pub insecure_hosts: Vec<String>,
    pub credentials: Credentials,
    pub policy: RetryPolicy,
}

fn protocol_error(what: &str, reason: impl ToString) -> RegistryError {
    RegistryError::Protocol {
        what: what.to_owned(),
        reason: reason.to_string(),
    }
}

impl RangeClient {
    fn url(&self, image: &Reference, digest: &str) -> String {
        let host = image.resolve_registry();
        let scheme = if self.insecure_hosts.iter().any(|h| h == host) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}/v2/{}/blobs/{digest}", image.repository())
    }

    /// `len` bytes at `offset`, retrying connect errors, resets, short bodies, 5xx and
    /// 429 (waiting as long as Retry-After says) with jittered exponential backoff.
    pub async fn read(&self, request: &RangeRequest<'_>) -> Result<Vec<u8>, RegistryError> {
        let RangeRequest {
            digest,
            offset,
            len,
            ..
        } = *request;
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let failure = match self.attempt(request).await {
                Ok(bytes) => return Ok(bytes),
                Err(failure) => failure,
            };
            let mut delay = self
                .policy
                .base_delay
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(self.policy.max_delay);
            delay += delay.mul_f64(jitter());
            if let Some(asked) = failure.retry_after {
                delay = delay.max(asked);
            }
            let out_of_budget = started.elapsed() + delay > self.policy.budget;
            if !failure.retryable || attempt >= self.policy.max_attempts || out_of_budget {
                return Err(failure.error);
            }
            tracing::warn!(digest, offset, len, attempt, ?delay, error = %failure.error, "range read failed, retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(&self, range: &RangeRequest<'_>) -> Result<Vec<u8>, Failure> {
        let RangeRequest {
            image,
            bearer,
            digest,
            offset,
            len,
        } = *range;
        let mut request = self
            .http
            .get(self.url(image, digest))
            .header(RANGE, format!("bytes={offset}-{}", offset + len.max(1) - 1));
        request = match (bearer, &self.credentials) {
            (Some(token), _) => request.header(AUTHORIZATION, format!("Bearer {token}")),
            (None, Credentials::Basic { username, password }) => {
                request.basic_auth(username, Some(password))
            }
            (None, Credentials::Anonymous) => request,
        };
        let response = request.send().await.map_err(|e| Failure {
            retryable: e.is_connect() || e.is_timeout() || e.is_request(),
            retry_after: None,
            error: protocol_error(digest, format!("request: {e}")),
        })?;
        let status = response.status();
        let skip = match status {
            StatusCode::PARTIAL_CONTENT => 0,
            StatusCode::OK => offset,
            _ => {
                let retryable = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
                return Err(Failure {
                    retryable,
                    retry_after: retry_after(response.headers()),
                    error: protocol_error(
                        digest,
                        format!("HTTP {status} for range {offset}+{len}"),
                    ),
                });
            }
        };
        let mut body = response.bytes_stream();
        let mut out = Vec::with_capacity(len.min(64 << 20) as usize);
        let mut seen = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Failure {
                retryable: true,
                retry_after: None,
                error: protocol_error(digest, format!("body: {e}")),
            })?;
            let start = skip.saturating_sub(seen).min(chunk.len() as u64) as usize;
            seen += chunk.len() as u64;
            let take = (chunk.len() - start).min((len - out.len() as u64) as usize);
            out.extend_from_slice(&chunk[start..start + take]);
            if out.len() as u64 == len {
                return Ok(out);
            }
        }
        Err(Failure {
            retryable: true,
            retry_after: None,
            error: RegistryError::ShortRange {
                digest: digest.to_owned(),
                offset,
                len,
                got: out.len() as u64,
            },
        })
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
