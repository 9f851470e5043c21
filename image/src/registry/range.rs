//! Blob range reads: the fetcher's hot path, so they go over reqwest directly to see
//! status codes and `Retry-After`, which oci-client does not expose.

use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::RANGE;

use super::RegistryError;
use super::auth::Authorization;
use super::retry::Failure;

/// One range of one blob at one endpoint.
pub(super) struct RangeRequest<'a> {
    pub url: String,
    pub authorization: &'a Authorization,
    pub digest: &'a str,
    pub offset: u64,
    pub len: u64,
}

/// One attempt: `len` bytes at `offset`. A registry that ignores the range (200) is
/// skipped forward; short bodies, resets, 5xx and 429 are transient.
pub(super) async fn attempt(
    http: &reqwest::Client,
    range: &RangeRequest<'_>,
) -> Result<Vec<u8>, Failure> {
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
    let mut pieces = 0u32;
    let mut first_piece_at = None;
    let mut body = response.bytes_stream();
    let mut out = Vec::with_capacity(len.min(64 << 20) as usize);
    let mut seen = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            Failure::transient(RegistryError::Protocol {
                what: digest.to_owned(),
                reason: format!("body: {e}"),
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
            return Ok(out);
        }
    }
    Err(Failure::transient(RegistryError::ShortRange {
        digest: digest.to_owned(),
        offset,
        len,
        got: out.len() as u64,
    }))
}
