//! Blob range reads: the fetcher's hot path, so they go over reqwest directly to see
//! status codes and `Retry-After`, which oci-client does not expose.

use futures::StreamExt;
use oci_client::RegistryOperation;
use reqwest::StatusCode;
use reqwest::header::RANGE;
use tracing::Instrument;

use super::auth::Authorization;
use super::retry::{Failure, bounded_time, with_retries_within};
use super::{Endpoint, Registry, RegistryError, observe, parse_reference};

impl Registry {
    /// Exactly `len` bytes of blob `digest` from `offset`: mirrors first (one attempt
    /// each), then the origin with retries (see [`super::RetryPolicy`]); a registry that
    /// ignores the range is handled too, and one that redirects is asked where it
    /// redirected to next time ([`super::redirect`]).
    pub async fn read_range(
        &self,
        image: &str,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, RegistryError> {
        let image = &parse_reference(image)?;
        let started = std::time::Instant::now();
        let span = tracing::debug_span!("range", digest, offset, len);
        let result = self
            .on_first_endpoint(image, digest, |endpoint: Endpoint| async move {
                let endpoint = &endpoint;
                let url = self.blob_url(endpoint, image, digest)?.to_string();
                let url = &url;
                let (http, policy) = (
                    self.http.get(endpoint.reference.resolve_registry()),
                    &self.policy(endpoint),
                );
                let redirected = RangeRequest {
                    url: url.clone(),
                    authorization: &Authorization::None,
                    digest,
                    offset,
                    len,
                };
                if let Some(bytes) = self.redirected_range(http, policy, &redirected).await {
                    return Ok(bytes);
                }
                let ranged = with_retries_within(policy, digest, len, || {
                    self.authorized(
                        &endpoint.reference,
                        RegistryOperation::Pull,
                        |authorization| async move {
                            let request = RangeRequest {
                                url: url.clone(),
                                authorization: &authorization,
                                digest,
                                offset,
                                len,
                            };
                            attempt(http, &request).await
                        },
                    )
                })
                .await?;
                self.redirects.landed(url, &ranged.landed);
                Ok(ranged.bytes)
            })
            .instrument(span.clone())
            .await;
        span.in_scope(|| match &result {
            Ok(_) => tracing::debug!(elapsed = ?started.elapsed(), "range read"),
            Err(e) => tracing::debug!(elapsed = ?started.elapsed(), "range read failed: {e}"),
        });
        result
    }

    /// The range `request` asks of a blob URL, from where the registry last redirected
    /// reads of it, if it did lately: one attempt over the registry's client (its CA, if
    /// it has one), without its authorization, bounded in time like a range request
    /// through the registry. `None` (and the storage URL forgotten) on any failure, for
    /// the registry to answer instead.
    async fn redirected_range(
        &self,
        http: &reqwest::Client,
        policy: &super::RetryPolicy,
        request: &RangeRequest<'_>,
    ) -> Option<Vec<u8>> {
        let blob_url = request.url.as_str();
        let storage = self.redirects.get(blob_url)?;
        let started = std::time::Instant::now();
        let direct = RangeRequest {
            url: storage.to_string(),
            ..*request
        };
        let within = bounded_time(policy, request.len);
        let result = match tokio::time::timeout(within, attempt(http, &direct)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::transient(RegistryError::Protocol {
                what: request.digest.to_owned(),
                reason: format!("no answer within {within:?}"),
            })),
        };
        if let Some(observer) = &self.observer {
            let status = result.as_ref().err().and_then(|f| f.status);
            let outcome = observe::Outcome::of(status, result.is_ok());
            observer.attempt(outcome, started.elapsed());
        }
        match result {
            Ok(ranged) => Some(ranged.bytes),
            Err(failure) => {
                let host = storage.host_str().unwrap_or_default();
                tracing::debug!(
                    host,
                    "a redirected range read failed, asking the registry again: {}",
                    failure.error
                );
                self.redirects.forget(blob_url);
                None
            }
        }
    }
}

/// One range of one blob at one endpoint.
pub(super) struct RangeRequest<'a> {
    pub url: String,
    pub authorization: &'a Authorization,
    pub digest: &'a str,
    pub offset: u64,
    pub len: u64,
}

/// The bytes of one range, and the URL that sent them (another one when the registry
/// redirected the request).
pub(super) struct Ranged {
    pub bytes: Vec<u8>,
    pub landed: reqwest::Url,
}

/// One attempt: `len` bytes at `offset`. A registry that ignores the range (200) is
/// skipped forward; short bodies, resets, 5xx and 429 are transient.
pub(super) async fn attempt(
    http: &reqwest::Client,
    range: &RangeRequest<'_>,
) -> Result<Ranged, Failure> {
    let RangeRequest {
        digest,
        offset,
        len,
        ..
    } = *range;
    let started = std::time::Instant::now();
    let request = http
        .get(&range.url)
        .header(RANGE, format!("bytes={offset}-{}", offset + len.max(1) - 1));
    let response = range
        .authorization
        .apply(request)
        .send()
        .await
        .map_err(|e| Failure::from_reqwest(digest, e))?;
    let status = response.status();
    let skip = match status {
        StatusCode::PARTIAL_CONTENT => 0,
        StatusCode::OK => offset,
        _ => {
            let mut failure = Failure::from_status(digest, status, response.headers());
            failure.error = RegistryError::Protocol {
                what: digest.to_owned(),
                reason: format!("HTTP {status} for range {offset}+{len}"),
            };
            return Err(failure);
        }
    };
    let headers_at = started.elapsed();
    let landed = response.url().clone();
    let mut pieces = 0u32;
    let mut first_piece_at = None;
    let mut body = response.bytes_stream();
    let mut out = Vec::with_capacity(len.min(64 << 20) as usize);
    let mut seen = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            Failure::transient(RegistryError::Protocol {
                what: digest.to_owned(),
                reason: format!("body: {}", e.without_url()),
            })
        })?;
        pieces += 1;
        first_piece_at.get_or_insert_with(|| started.elapsed());
        let start = skip.saturating_sub(seen).min(chunk.len() as u64) as usize;
        seen += chunk.len() as u64;
        let take = (chunk.len() - start).min((len - out.len() as u64) as usize);
        out.extend_from_slice(&chunk[start..start + take]);
        if out.len() as u64 == len {
            // Where a range request's time goes: the registry's answer, then its body.
            tracing::debug!(
                target: "read_trace",
                len,
                pieces,
                headers_us = headers_at.as_micros() as u64,
                first_byte_us = first_piece_at.unwrap_or_default().as_micros() as u64,
                body_us = started.elapsed().as_micros() as u64,
                "range_body"
            );
            return Ok(Ranged { bytes: out, landed });
        }
    }
    Err(Failure::transient(RegistryError::ShortRange {
        digest: digest.to_owned(),
        offset,
        len,
        got: out.len() as u64,
    }))
}
