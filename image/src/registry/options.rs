//! What the registry client is told: which hosts speak plain HTTP, per-host mirrors and
//! credentials, whether to read docker's `config.json`, and how hard to retry. The same
//! struct is the `[registry]` table of the configuration file.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::RegistryError;

#[derive(Clone, Default, PartialEq, Eq)]
pub enum Credentials {
    #[default]
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
}

/// Never prints the password, so credentials cannot leak through a `{:?}` in a log.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic { username, .. } => {
                write!(
                    f,
                    "Basic {{ username: {username:?}, password: <redacted> }}"
                )
            }
        }
    }
}

/// How hard a request tries before giving up: jittered exponential backoff on connect
/// errors, resets, 5xx and 429 (waiting at least as long as `Retry-After` asks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    #[serde(deserialize_with = "human_duration")]
    pub base_delay: Duration,
    #[serde(deserialize_with = "human_duration")]
    pub max_delay: Duration,
    /// No retry starts after this much time has passed since the first attempt.
    #[serde(deserialize_with = "human_duration")]
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

fn human_duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    humantime::parse_duration(&text)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration: {e}")))
}

/// One registry host (`host[:port]` as written in image references; `docker.io` for
/// Docker Hub).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostOptions {
    /// Pull endpoints (`host[:port]`) tried in order before the host itself. Pushes
    /// always go to the host.
    pub mirrors: Vec<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// A file holding the password (first line), so the configuration file itself
    /// need not be secret.
    pub password_file: Option<PathBuf>,
    /// PEM certificates of the CA that signs this host's TLS certificate (a private
    /// registry), trusted for this host besides the public roots.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for HostOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostOptions")
            .field("mirrors", &self.mirrors)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl HostOptions {
    pub fn basic(username: &str, password: &str) -> Self {
        Self {
            username: Some(username.to_owned()),
            password: Some(password.to_owned()),
            ..Self::default()
        }
    }

    /// The credentials this entry gives, if any.
    pub fn credentials(&self, host: &str) -> Result<Option<Credentials>, RegistryError> {
        let bad = |reason: String| RegistryError::Config {
            host: host.to_owned(),
            reason,
        };
        let password = match (&self.password, &self.password_file) {
            (Some(_), Some(_)) => {
                return Err(bad("give password or password_file, not both".into()));
            }
            (Some(password), None) => Some(password.clone()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| bad(format!("password_file {}: {e}", path.display())))?;
                Some(text.lines().next().unwrap_or_default().to_owned())
            }
            (None, None) => None,
        };
        match (&self.username, password) {
            (Some(username), Some(password)) => Ok(Some(Credentials::Basic {
                username: username.clone(),
                password,
            })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(bad("username without password".into())),
            (None, Some(_)) => Err(bad("password without username".into())),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryOptions {
    /// `host[:port]` entries reached over plain HTTP (e.g. a registry on loopback).
    pub insecure_hosts: Vec<String>,
    /// Look up credentials not given here in docker's `config.json`
    /// (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`; credential helpers too).
    pub docker_config: bool,
    pub retry: RetryPolicy,
    pub hosts: BTreeMap<String, HostOptions>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            insecure_hosts: Vec::new(),
            docker_config: true,
            retry: RetryPolicy::default(),
            hosts: BTreeMap::new(),
        }
    }
}

impl RegistryOptions {
    /// Options for one plain-HTTP host and nothing else configured (tests, loopback).
    pub fn insecure(host: &str) -> Self {
        Self {
            insecure_hosts: vec![host.to_owned()],
            ..Self::default()
        }
    }

    pub fn host(&self, host: &str) -> Option<&HostOptions> {
        self.hosts.get(host).or_else(|| match host {
            "index.docker.io" | "registry-1.docker.io" => self.hosts.get("docker.io"),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_the_password() {
        let mut options = RegistryOptions::default();
        options
            .hosts
            .insert("r.example".into(), HostOptions::basic("me", "hunter2"));
        let credentials = Credentials::Basic {
            username: "me".into(),
            password: "hunter2".into(),
        };
        for shown in [format!("{options:?}"), format!("{credentials:?}")] {
            assert!(
                shown.contains("me") && !shown.contains("hunter2"),
                "{shown}"
            );
        }
    }

    #[test]
    fn a_config_table_parses_with_durations_and_defaults() {
        let options: RegistryOptions = toml::from_str(
            r#"
            insecure_hosts = ["127.0.0.1:5000"]
            retry = { max_attempts = 3, budget = "10s" }
            [hosts."docker.io"]
            mirrors = ["mirror.example:5000"]
            username = "u"
            password = "p"
            "#,
        )
        .expect("parses");
        assert_eq!(options.retry.max_attempts, 3);
        assert_eq!(options.retry.budget, Duration::from_secs(10));
        assert_eq!(options.retry.base_delay, Duration::from_millis(100));
        assert!(options.docker_config);
        let hub = options.host("index.docker.io").expect("docker.io alias");
        assert_eq!(hub.mirrors, ["mirror.example:5000"]);
        assert_eq!(
            hub.credentials("docker.io").expect("valid"),
            Some(Credentials::Basic {
                username: "u".into(),
                password: "p".into()
            })
        );
    }

    #[test]
    fn bad_config_is_named() {
        let err = toml::from_str::<RegistryOptions>("retry = { budget = \"soon\" }")
            .expect_err("accepted");
        assert!(
            err.to_string().contains("\"soon\" is not a duration"),
            "{err}"
        );
        let err = toml::from_str::<RegistryOptions>("mirror = []").expect_err("accepted");
        assert!(err.to_string().contains("unknown field `mirror`"), "{err}");
        let half = HostOptions {
            username: Some("u".into()),
            ..HostOptions::default()
        };
        let err = half.credentials("r.example").expect_err("accepted");
        assert!(
            err.to_string().contains("r.example") && err.to_string().contains("without password"),
            "{err}"
        );
    }

    #[test]
    fn password_file_gives_its_first_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").expect("write");
        let host = HostOptions {
            username: Some("u".into()),
            password_file: Some(file),
            ..HostOptions::default()
        };
        assert_eq!(
            host.credentials("h").expect("valid"),
            Some(Credentials::Basic {
                username: "u".into(),
                password: "s3cret".into()
            })
        );
    }
}
