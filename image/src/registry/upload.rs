//! Streamed blob upload (OCI distribution chunked push: POST, PATCH…, PUT): a layer is
//! read from disk one chunk at a time, so pushing needs the memory of one chunk whatever
//! the layer's size. oci-client's push takes the whole blob as one slice.

use std::path::Path;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION};
use tokio::io::AsyncReadExt;

use super::RegistryError;
use super::auth::Authorization;
use super::retry::Failure;

/// Bytes sent per PATCH.
pub(super) const UPLOAD_CHUNK: usize = 8 << 20;

pub(super) struct Upload<'a> {
    /// `scheme://host/v2/<repository>/`
    pub repository_url: reqwest::Url,
    pub authorization: &'a Authorization,
    pub path: &'a Path,
    pub digest: &'a str,
}

fn protocol(what: &str, reason: impl ToString) -> Failure {
    Failure::fatal(RegistryError::Protocol {
        what: what.to_owned(),
        reason: reason.to_string(),
    })
}

/// Whether the registry already holds the blob (then nothing is sent).
async fn exists(http: &reqwest::Client, upload: &Upload<'_>) -> Result<bool, Failure> {
    let url = join(
        &upload.repository_url,
        &format!("blobs/{}", upload.digest),
        upload,
    )?;
    let response = upload
        .authorization
        .apply(http.head(url))
        .send()
        .await
        .map_err(|e| Failure::from_reqwest(upload.digest, e))?;
    match response.status() {
        StatusCode::OK => Ok(true),
        StatusCode::NOT_FOUND => Ok(false),
        status => Err(Failure::from_status(
            upload.digest,
            status,
            response.headers(),
        )),
    }
}

fn join(base: &reqwest::Url, path: &str, upload: &Upload<'_>) -> Result<reqwest::Url, Failure> {
    base.join(path)
        .map_err(|e| protocol(upload.digest, format!("bad URL {path:?}: {e}")))
}

/// The next upload URL from a 202 answer (may be relative to the registry).
fn next_location(
    response: &reqwest::Response,
    upload: &Upload<'_>,
) -> Result<reqwest::Url, Failure> {
    let status = response.status();
    if status != StatusCode::ACCEPTED {
        return Err(Failure::from_status(
            upload.digest,
            status,
            response.headers(),
        ));
    }
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| protocol(upload.digest, "upload answer without a Location header"))?;
    join(&upload.repository_url, location, upload)
}

/// One whole upload attempt; a retry starts the upload over.
pub(super) async fn attempt(http: &reqwest::Client, upload: &Upload<'_>) -> Result<(), Failure> {
    if exists(http, upload).await? {
        return Ok(());
    }
    let what = upload.digest;
    let start = join(&upload.repository_url, "blobs/uploads/", upload)?;
    let response = upload
        .authorization
        .apply(http.post(start).header(CONTENT_LENGTH, 0))
        .send()
        .await
        .map_err(|e| Failure::from_reqwest(what, e))?;
    let mut location = next_location(&response, upload)?;
    let mut file = tokio::fs::File::open(upload.path)
        .await
        .map_err(|e| protocol(what, format!("{}: {e}", upload.path.display())))?;
    let mut offset = 0u64;
    let mut chunk = vec![0u8; UPLOAD_CHUNK];
    loop {
        let mut filled = 0;
        while filled < chunk.len() {
            let n = file
                .read(&mut chunk[filled..])
                .await
                .map_err(|e| protocol(what, format!("{}: {e}", upload.path.display())))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        let end = offset + filled as u64 - 1;
        let response = upload
            .authorization
            .apply(http.patch(location.clone()))
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_RANGE, format!("{offset}-{end}"))
            .header(CONTENT_LENGTH, filled)
            .body(chunk[..filled].to_vec())
            .send()
            .await
            .map_err(|e| Failure::from_reqwest(what, e))?;
        location = next_location(&response, upload)?;
        offset = end + 1;
    }
    location
        .query_pairs_mut()
        .append_pair("digest", upload.digest);
    let response = upload
        .authorization
        .apply(http.put(location))
        .header(CONTENT_LENGTH, 0)
        .send()
        .await
        .map_err(|e| Failure::from_reqwest(what, e))?;
    match response.status() {
        StatusCode::CREATED | StatusCode::ACCEPTED | StatusCode::NO_CONTENT => Ok(()),
        status => {
            let headers = response.headers().clone();
            let body = response.text().await.unwrap_or_default();
            let mut failure = Failure::from_status(what, status, &headers);
            failure.error = RegistryError::Protocol {
                what: what.to_owned(),
                reason: format!("finishing upload: HTTP {status}: {}", body.trim()),
            };
            Err(failure)
        }
    }
}

/// A manifest to put under a tag or digest of a repository.
pub(super) struct ManifestPut<'a> {
    pub repository_url: reqwest::Url,
    pub authorization: &'a Authorization,
    pub reference: &'a str,
    pub media_type: &'a str,
    pub bytes: &'a [u8],
}

/// One attempt at putting a manifest.
pub(super) async fn put_manifest(
    http: &reqwest::Client,
    put: &ManifestPut<'_>,
) -> Result<(), Failure> {
    let what = put.reference;
    let url = put
        .repository_url
        .join(&format!("manifests/{what}"))
        .map_err(|e| protocol(what, format!("bad manifest URL: {e}")))?;
    let response = put
        .authorization
        .apply(http.put(url))
        .header(CONTENT_TYPE, put.media_type)
        .body(put.bytes.to_vec())
        .send()
        .await
        .map_err(|e| Failure::from_reqwest(what, e))?;
    if response.status().is_success() {
        return Ok(());
    }
    Err(Failure::from_status(
        what,
        response.status(),
        response.headers(),
    ))
}
