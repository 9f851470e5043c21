//! The distribution spec's token flow, bounded: `GET /v2/` for the challenge, then the
//! bearer token from the realm it names, read up to [`MAX_TOKEN_REPLY_BYTES`]. Written
//! here because the client library reads token replies whole, and a registry's token
//! endpoint is as hostile as the registry.

use reqwest::StatusCode;
use reqwest::header::WWW_AUTHENTICATE;

use super::document::read_bounded;
use super::retry::Failure;
use super::{Credentials, RegistryError};

/// Largest token reply accepted (real ones are a few KiB of JWT).
pub const MAX_TOKEN_REPLY_BYTES: u64 = 1 << 20;

/// What `GET /v2/` asked for.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Challenge {
    /// Nothing, or HTTP basic: no token to negotiate.
    None,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` value: `Bearer realm="…",service="…",scope="…"`.
pub(super) fn parse_challenge(header: &str) -> Result<Challenge, String> {
    let header = header.trim();
    let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(Challenge::None);
    }
    let mut realm = None;
    let mut service = None;
    let mut rest = params.trim();
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once('=')
            .ok_or_else(|| format!("no '=' in challenge parameters {rest:?}"))?;
        let (value, after) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted
                    .find('"')
                    .ok_or_else(|| "unterminated quoted challenge parameter".to_owned())?;
                (&quoted[..end], &quoted[end + 1..])
            }
            None => after.split_once(',').unwrap_or((after, "")),
        };
        match key.trim().to_ascii_lowercase().as_str() {
            "realm" => realm = Some(value.to_owned()),
            "service" => service = Some(value.to_owned()),
            _ => {}
        }
        rest = after.trim_start_matches([',', ' ']);
    }
    let realm = realm.ok_or_else(|| "bearer challenge without a realm".to_owned())?;
    if !(realm.starts_with("https://") || realm.starts_with("http://")) {
        return Err(format!("token realm {realm:?} is not an http(s) URL"));
    }
    Ok(Challenge::Bearer { realm, service })
}

/// A bearer token for `repository` on the registry at `base` (`scheme://host`), or
/// `None` when the registry asks for none (or for HTTP basic).
pub(super) async fn negotiate(
    http: &reqwest::Client,
    base: &str,
    repository: &str,
    push: bool,
    credentials: &Credentials,
) -> Result<Option<String>, Failure> {
    let what = format!("{base} token");
    let probe = http
        .get(format!("{base}/v2/"))
        .send()
        .await
        .map_err(|e| Failure::from_reqwest(&what, e))?;
    let status = probe.status();
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        return Err(Failure::from_status(&what, status, probe.headers()));
    }
    if status != StatusCode::UNAUTHORIZED {
        return Ok(None);
    }
    let header = probe
        .headers()
        .get(WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let protocol = |reason: String| {
        Failure::fatal(RegistryError::Protocol {
            what: what.clone(),
            reason,
        })
    };
    let Challenge::Bearer { realm, service } = parse_challenge(header).map_err(protocol)? else {
        return Ok(None);
    };
    let scope = format!(
        "repository:{repository}:{}",
        if push { "pull,push" } else { "pull" }
    );
    let mut query = vec![("scope", scope)];
    query.extend(service.map(|s| ("service", s)));
    let mut request = http.get(&realm).query(&query);
    if let Credentials::Basic { username, password } = credentials {
        request = request.basic_auth(username, Some(password));
    }
    let reply = request
        .send()
        .await
        .map_err(|e| Failure::from_reqwest(&what, e))?;
    let status = reply.status();
    if !status.is_success() {
        let mut failure = Failure::from_status(&what, status, reply.headers());
        let said = read_bounded(reply, 64 << 10, &what, "error replies")
            .await
            .map(|body| said(&body))
            .unwrap_or_default();
        let meaning = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                failure.retryable = false;
                "not authorized: "
            }
            _ => "",
        };
        failure.error = RegistryError::Protocol {
            what,
            reason: format!("{meaning}the token service answered HTTP {status}{said}"),
        };
        return Err(failure);
    }
    let body = read_bounded(reply, MAX_TOKEN_REPLY_BYTES, &what, "token replies").await?;
    token_from_reply(&body).map(Some).map_err(protocol)
}

/// What an error reply says, for the message: its first 200 printable characters.
fn said(body: &[u8]) -> String {
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect();
    if text.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", text.trim())
    }
}

/// The token of a reply `{"token": …}` (or OAuth2's `access_token`), checked to fit in
/// a header.
pub(super) fn token_from_reply(body: &[u8]) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(default)]
        token: Option<String>,
        #[serde(default)]
        access_token: Option<String>,
    }
    let reply: Reply =
        serde_json::from_slice(body).map_err(|e| format!("token reply is not JSON: {e}"))?;
    let token = reply
        .token
        .filter(|t| !t.is_empty())
        .or(reply.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| "token reply holds no token".to_owned())?;
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("token reply holds a token that cannot go into a header".into());
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_as_registries_send_them() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#
            ),
            Ok(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"bearer realm="http://127.0.0.1:5001/auth, with comma""#),
            Ok(Challenge::Bearer {
                realm: "http://127.0.0.1:5001/auth, with comma".into(),
                service: None,
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Ok(Challenge::None)
        );
        assert_eq!(parse_challenge(""), Ok(Challenge::None));
    }

    #[test]
    fn hostile_challenges_are_refused() {
        for bad in [
            r#"Bearer service="x""#,
            r#"Bearer realm="file:///etc/passwd""#,
            r#"Bearer realm="https://x"#,
            "Bearer realm",
        ] {
            assert!(parse_challenge(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn token_replies() {
        assert_eq!(token_from_reply(br#"{"token":"abc"}"#), Ok("abc".into()));
        assert_eq!(
            token_from_reply(br#"{"token":"","access_token":"def"}"#),
            Ok("def".into())
        );
        assert!(token_from_reply(br#"{}"#).unwrap_err().contains("no token"));
        assert!(
            token_from_reply(br#"{"token":"a\nb"}"#)
                .unwrap_err()
                .contains("header")
        );
        assert!(token_from_reply(b"<html>").is_err());
    }
}
