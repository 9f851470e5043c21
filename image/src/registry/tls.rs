//! The HTTP clients registry requests go over: one trusting the public roots, and for
//! each host with a `ca_file` one trusting that CA as well (a private registry's own
//! CA is trusted for that host alone, never for Docker Hub). All speak HTTP/2 where the
//! registry offers it (ALPN over TLS): range requests in flight then share one
//! connection.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use super::{RegistryError, RegistryOptions};

/// The most a CA file may hold (a bundle of a few certificates is a few KiB).
const MAX_CA_FILE: u64 = 1 << 20;

pub(super) struct HttpClients {
    public: reqwest::Client,
    by_host: HashMap<String, reqwest::Client>,
}

fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
}

/// The certificates of `path`, a PEM bundle, for `host`'s configuration.
pub fn ca_certificates(
    host: &str,
    path: &Path,
) -> Result<Vec<reqwest::Certificate>, RegistryError> {
    use std::io::Read;
    let bad = |reason: String| RegistryError::Config {
        host: host.to_owned(),
        reason: format!("ca_file {}: {reason}", path.display()),
    };
    let mut pem = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_CA_FILE + 1).read_to_end(&mut pem))
        .map_err(|e| bad(e.to_string()))?;
    if pem.len() as u64 > MAX_CA_FILE {
        return Err(bad(format!("larger than {MAX_CA_FILE} bytes")));
    }
    let certificates =
        reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
    if certificates.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certificates)
}

impl HttpClients {
    /// The clients `options` call for; a host whose CA file cannot be read gets the
    /// public roots only (its requests then fail on its certificate), and the error
    /// is logged: configuration loading checks the files before this.
    pub(super) fn new(options: &RegistryOptions) -> Self {
        let mut by_host = HashMap::new();
        for (host, host_options) in &options.hosts {
            let Some(path) = &host_options.ca_file else {
                continue;
            };
            let client = ca_certificates(host, path).and_then(|certificates| {
                let builder = certificates.into_iter().fold(builder(), |b, certificate| {
                    b.add_root_certificate(certificate)
                });
                builder.build().map_err(|e| RegistryError::Config {
                    host: host.clone(),
                    reason: format!("TLS client: {e}"),
                })
            });
            match client {
                Ok(client) => {
                    by_host.insert(host.clone(), client);
                }
                Err(e) => tracing::error!(host, "{e}"),
            }
        }
        Self {
            public: builder().build().unwrap_or_default(),
            by_host,
        }
    }

    /// The client for requests to `host` (`host[:port]` as in image references).
    pub(super) fn get(&self, host: &str) -> &reqwest::Client {
        let configured = self.by_host.get(host).or_else(|| match host {
            "index.docker.io" | "registry-1.docker.io" => self.by_host.get("docker.io"),
            _ => None,
        });
        configured.unwrap_or(&self.public)
    }
}
