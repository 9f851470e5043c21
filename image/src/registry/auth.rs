//! Who we are to each registry host: credentials a client gave for it (a kubelet's pull
//! secret, through the CRI image proxy), else the configuration file's, else docker's
//! `config.json` (and its credential helpers), else anonymous; and the
//! `Authorization` header for the requests we send ourselves (range reads, uploads),
//! with bearer tokens cached until the registry refuses them.

use std::collections::HashMap;
use std::sync::Mutex;

use oci_client::{Reference, RegistryOperation};

use super::retry::Failure;
use super::{Credentials, RegistryError, RegistryOptions, token};

/// What goes into the `Authorization` header.
#[derive(Clone)]
pub(super) enum Authorization {
    None,
    Basic { username: String, password: String },
    Bearer(String),
}

impl Authorization {
    pub fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Authorization::None => request,
            Authorization::Basic { username, password } => {
                request.basic_auth(username, Some(password))
            }
            Authorization::Bearer(token) => request.bearer_auth(token),
        }
    }
}

type TokenKey = (String, String, bool);

pub(super) struct Auth {
    options: RegistryOptions,
    credentials: Mutex<HashMap<String, Credentials>>,
    tokens: Mutex<HashMap<TokenKey, Authorization>>,
}

/// The keys docker's `config.json` may use for a host.
fn docker_config_keys(host: &str) -> Vec<String> {
    match host {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => {
            vec!["https://index.docker.io/v1/".into(), "docker.io".into()]
        }
        _ => vec![host.to_owned(), format!("https://{host}")],
    }
}

fn from_docker_config(host: &str) -> Option<Credentials> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".docker")))?;
    if !dir.join("config.json").exists() {
        return None;
    }
    for key in docker_config_keys(host) {
        use docker_credential::{CredentialRetrievalError as E, DockerCredential};
        match docker_credential::get_credential(&key) {
            Ok(DockerCredential::UsernamePassword(username, password)) => {
                return Some(Credentials::Basic { username, password });
            }
            Ok(DockerCredential::IdentityToken(_)) => {
                tracing::warn!(
                    host,
                    "docker config holds an identity token for this host, which is not \
                     supported; going anonymous (put a username and password in the \
                     [registry.hosts] table instead)"
                );
                return None;
            }
            Err(E::NoCredentialConfigured) => continue,
            // The error text names the helper and its exit, never the secret.
            Err(e) => {
                tracing::warn!(host, error = %e, "docker config credentials unusable; going anonymous");
                return None;
            }
        }
    }
    None
}

impl Auth {
    pub fn new(options: &RegistryOptions) -> Self {
        Self {
            options: options.clone(),
            credentials: Mutex::default(),
            tokens: Mutex::default(),
        }
    }

    /// Credentials for `host`: the configuration file's entry, else docker's config,
    /// else anonymous. Looked up once per host.
    pub fn credentials(&self, host: &str) -> Result<Credentials, RegistryError> {
        if let Some(known) = lock(&self.credentials).get(host) {
            return Ok(known.clone());
        }
        let configured = match self.options.host(host) {
            Some(entry) => entry.credentials(host)?,
            None => None,
        };
        let found = configured
            .or_else(|| {
                self.options
                    .docker_config
                    .then(|| from_docker_config(host))
                    .flatten()
            })
            .unwrap_or_default();
        lock(&self.credentials).insert(host.to_owned(), found.clone());
        Ok(found)
    }

    /// Credentials given at run time for `hosts` (a registry and its mirrors): they win
    /// over the configuration's, and tokens negotiated with other credentials go.
    pub fn provide(&self, hosts: &[String], credentials: &Credentials) {
        let mut known = lock(&self.credentials);
        for host in hosts {
            known.insert(host.clone(), credentials.clone());
        }
        drop(known);
        lock(&self.tokens).retain(|(host, _, _), _| !hosts.contains(host));
    }

    /// The header for a request to `endpoint`, and whether it was just negotiated (a
    /// fresh token refused means the credentials are wrong, not that it expired).
    /// `base` is the registry's `scheme://host`.
    pub async fn authorization(
        &self,
        http: &reqwest::Client,
        base: &str,
        endpoint: &Reference,
        operation: RegistryOperation,
    ) -> Result<(Authorization, bool), Failure> {
        let host = endpoint.resolve_registry().to_owned();
        let key = (
            host.clone(),
            endpoint.repository().to_owned(),
            matches!(operation, RegistryOperation::Push),
        );
        if let Some(cached) = lock(&self.tokens).get(&key) {
            return Ok((cached.clone(), false));
        }
        let credentials = self.credentials(&host).map_err(Failure::fatal)?;
        let push = matches!(operation, RegistryOperation::Push);
        let asked = std::time::Instant::now();
        let token = token::negotiate(http, base, endpoint.repository(), push, &credentials).await?;
        tracing::debug!(%host, elapsed = ?asked.elapsed(), "authorization negotiated");
        let authorization = match (token, credentials) {
            (Some(token), _) => Authorization::Bearer(token),
            (None, Credentials::Basic { username, password }) => {
                Authorization::Basic { username, password }
            }
            (None, Credentials::Anonymous) => Authorization::None,
        };
        lock(&self.tokens).insert(key, authorization.clone());
        Ok((authorization, true))
    }

    /// Forgets the cached header for `endpoint` (the registry answered 401).
    pub fn forget(&self, endpoint: &Reference, operation: RegistryOperation) {
        let key = (
            endpoint.resolve_registry().to_owned(),
            endpoint.repository().to_owned(),
            matches!(operation, RegistryOperation::Push),
        );
        lock(&self.tokens).remove(&key);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding a cache lock leaves a usable cache.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_is_looked_up_under_its_legacy_key() {
        assert_eq!(
            docker_config_keys("docker.io")[0],
            "https://index.docker.io/v1/"
        );
        assert_eq!(docker_config_keys("127.0.0.1:5000")[0], "127.0.0.1:5000");
    }

    #[test]
    fn provided_credentials_win_over_the_configuration_and_drop_its_tokens() {
        let mut options = RegistryOptions {
            docker_config: false,
            ..RegistryOptions::default()
        };
        options.hosts.insert(
            "r.example".into(),
            super::super::HostOptions::basic("config", "p"),
        );
        let auth = Auth::new(&options);
        auth.credentials("r.example").expect("configured");
        let key = ("r.example".to_owned(), "app".to_owned(), false);
        lock(&auth.tokens).insert(key.clone(), Authorization::Bearer("old".into()));
        let other = ("m.example".to_owned(), "app".to_owned(), false);
        lock(&auth.tokens).insert(other.clone(), Authorization::None);
        let given = Credentials::Basic {
            username: "kubelet".into(),
            password: "secret".into(),
        };
        auth.provide(&["r.example".into()], &given);
        assert!(matches!(
            auth.credentials("r.example"),
            Ok(Credentials::Basic { username, .. }) if username == "kubelet"
        ));
        assert!(!lock(&auth.tokens).contains_key(&key));
        assert!(lock(&auth.tokens).contains_key(&other));
    }

    #[test]
    fn configured_credentials_win_and_are_cached() {
        let mut options = RegistryOptions {
            docker_config: false,
            ..RegistryOptions::default()
        };
        options.hosts.insert(
            "r.example".into(),
            super::super::HostOptions::basic("u", "p"),
        );
        let auth = Auth::new(&options);
        assert!(matches!(
            auth.credentials("r.example"),
            Ok(Credentials::Basic { .. })
        ));
        assert!(matches!(
            auth.credentials("other.example"),
            Ok(Credentials::Anonymous)
        ));
    }
}
