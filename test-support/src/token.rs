//! A bearer-token authority for docker-registry's `auth: token` mode: the registry
//! trusts a self-signed certificate, this server hands out ES256 JWTs carrying that
//! certificate (`x5c`) to clients with the right basic credentials, granting what the
//! `scope` asks. A real token server is a separate product not packaged by Debian; this
//! one implements the documented protocol and nothing more.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use base64::prelude::{BASE64_STANDARD, Engine as _};

pub const SERVICE: &str = "lazy-erofs-test-registry";
pub const ISSUER: &str = "lazy-erofs-test-issuer";

pub struct TokenAuthority {
    /// `http://127.0.0.1:PORT/token`
    pub realm: String,
    /// How many tokens were handed out.
    pub issued: Arc<AtomicUsize>,
}

#[derive(serde::Serialize)]
struct Access {
    r#type: String,
    name: String,
    actions: Vec<String>,
}

#[derive(serde::Serialize)]
struct Claims {
    iss: &'static str,
    sub: String,
    aud: &'static str,
    exp: u64,
    nbf: u64,
    iat: u64,
    jti: String,
    access: Vec<Access>,
}

impl TokenAuthority {
    /// Starts the server; writes the certificate the registry must trust to `cert_pem`.
    pub fn start(cert_pem: &Path, username: &str, password: &str) -> Result<Self> {
        let key = rcgen::KeyPair::generate().context("key pair")?;
        let cert = rcgen::CertificateParams::new(vec!["token-issuer".to_owned()])?
            .self_signed(&key)
            .context("self-signed certificate")?;
        std::fs::write(cert_pem, cert.pem())?;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.x5c = Some(vec![BASE64_STANDARD.encode(cert.der())]);
        let signing = jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der());
        let expected = format!(
            "Basic {}",
            BASE64_STANDARD.encode(format!("{username}:{password}"))
        );

        let listener = TcpListener::bind("127.0.0.1:0")?;
        let realm = format!("http://{}/token", listener.local_addr()?);
        let issued = Arc::new(AtomicUsize::new(0));
        let counter = issued.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(&stream);
                let mut request_line = String::new();
                let mut authorized = false;
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("authorization")
                    {
                        authorized = value.trim() == expected;
                    }
                }
                let (status, body) = if authorized {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let n = counter.fetch_add(1, Ordering::SeqCst);
                    let claims = Claims {
                        iss: ISSUER,
                        sub: "tester".into(),
                        aud: SERVICE,
                        exp: now + 300,
                        nbf: now.saturating_sub(10),
                        iat: now,
                        jti: format!("token-{n}"),
                        access: scopes(&request_line),
                    };
                    match jsonwebtoken::encode(&header, &claims, &signing) {
                        Ok(token) => (
                            "200 OK",
                            format!(r#"{{"token":"{token}","expires_in":300}}"#),
                        ),
                        Err(e) => ("500 Internal Server Error", e.to_string()),
                    }
                } else {
                    (
                        "401 Unauthorized",
                        r#"{"details":"bad credentials"}"#.to_owned(),
                    )
                };
                let _ = write!(
                    &stream,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Ok(Self { realm, issued })
    }

    /// The registry's `auth:` section trusting this authority.
    pub fn registry_auth_config(&self, cert_pem: &Path) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.realm,
            cert_pem.display()
        )
    }
}

/// Grants exactly the `scope=repository:NAME:ACTIONS` parameters of the request line.
fn scopes(request_line: &str) -> Vec<Access> {
    let query = request_line
        .split_whitespace()
        .nth(1)
        .and_then(|target| target.split_once('?'))
        .map_or("", |(_, q)| q);
    query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("scope="))
        .filter_map(|scope| {
            let scope = scope
                .replace("%3A", ":")
                .replace("%2C", ",")
                .replace("%2F", "/");
            let mut parts = scope.splitn(3, ':');
            Some(Access {
                r#type: parts.next()?.to_owned(),
                name: parts.next()?.to_owned(),
                actions: parts.next()?.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}
