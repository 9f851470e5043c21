//! Manifest and index GETs over reqwest, bounded: a registry's reply is read only up to
//! [`MAX_DOCUMENT_BYTES`] (containerd's own limit for manifests), so a hostile registry
//! cannot make the snapshotter or the CLI allocate without bound.

use futures::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_LENGTH};

use super::RegistryError;
use super::auth::Authorization;
use super::retry::Failure;

/// Largest manifest, index or config accepted.
pub const MAX_DOCUMENT_BYTES: u64 = 4 << 20;

/// One GET of a manifest or index at `url`: its bytes.
pub(super) async fn attempt(
    http: &reqwest::Client,
    url: &str,
    authorization: &Authorization,
    accepted: &[&str],
    what: &str,
) -> Result<Vec<u8>, Failure> {
    let request = http.get(url).header(ACCEPT, accepted.join(", "));
    let response = authorization
        .apply(request)
        .send()
        .await
        .map_err(|e| Failure::from_reqwest(what, e))?;
    let status = response.status();
    if !status.is_success() {
        let mut failure = Failure::from_status(what, status, response.headers());
        let said = registry_errors(response).await;
        let meaning = match status {
            reqwest::StatusCode::UNAUTHORIZED => "not authorized: ",
            reqwest::StatusCode::NOT_FOUND => "not found: ",
            _ => "",
        };
        failure.error = RegistryError::Protocol {
            what: what.to_owned(),
            reason: format!("{meaning}HTTP {status}{said}"),
        };
        return Err(failure);
    }
    read_bounded(response, MAX_DOCUMENT_BYTES, what, "manifests").await
}

/// A reply's body, refused (for good) once it passes `max` bytes, declared or sent.
pub(super) async fn read_bounded(
    response: reqwest::Response,
    max: u64,
    what: &str,
    kind: &str,
) -> Result<Vec<u8>, Failure> {
    let too_large = |size: u64| {
        Failure::fatal(RegistryError::Protocol {
            what: what.to_owned(),
            reason: format!(
                "the registry sent {size} bytes or more; {kind} are limited to {max} bytes"
            ),
        })
    };
    let declared = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(size) = declared.filter(|&s| s > max) {
        return Err(too_large(size));
    }
    let mut body = response.bytes_stream();
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            Failure::transient(RegistryError::Protocol {
                what: what.to_owned(),
                reason: format!("body: {}", e.without_url()),
            })
        })?;
        if out.len() as u64 + chunk.len() as u64 > max {
            return Err(too_large(out.len() as u64 + chunk.len() as u64));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The messages of an OCI error reply (`{"errors":[{"code","message"}]}`), read from at
/// most 64 KiB of body, as `: message (CODE); …`; empty when there are none.
async fn registry_errors(response: reqwest::Response) -> String {
    #[derive(serde::Deserialize)]
    struct Reply {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let mut body = response.bytes_stream();
    let mut bytes = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > 64 << 10 {
            return String::new();
        }
    }
    let Ok(reply) = serde_json::from_slice::<Reply>(&bytes) else {
        return String::new();
    };
    let said: Vec<String> = reply
        .errors
        .iter()
        .take(4)
        .map(|e| {
            format!(
                "{} ({})",
                e.message.chars().take(200).collect::<String>(),
                e.code
            )
        })
        .collect();
    if said.is_empty() {
        String::new()
    } else {
        format!(": {}", said.join("; "))
    }
}
