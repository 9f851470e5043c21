//! The configuration file: TOML, every key with a default embedded from
//! `packaging/config.toml`, so a file only holds what it changes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use lazy_erofs_image::registry::RegistryOptions;
use lazy_erofs_snapshotter::cache::CacheLimits;
use serde::Deserialize;

/// The defaults, as shipped.
pub const DEFAULT_CONFIG: &str = include_str!("../../packaging/config.toml");
/// Read when `--config` is not given and the file exists.
pub const DEFAULT_PATH: &str = "/etc/lazy-erofs/config.toml";

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub snapshotter: SnapshotterConfig,
    pub cache: CacheLimits,
    pub metrics: MetricsConfig,
    pub fetch: FetchConfig,
    pub registry: RegistryOptions,
    pub cri: CriConfig,
}

/// The `[cri]` table: the kubelet's image service proxy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriConfig {
    /// Socket of the image service proxy (kubelet `--image-service-endpoint`); empty:
    /// none.
    pub image_proxy: PathBuf,
    /// containerd's socket, where the proxy forwards every call.
    pub containerd: PathBuf,
}

impl Default for CriConfig {
    fn default() -> Self {
        Self {
            image_proxy: PathBuf::new(),
            containerd: PathBuf::from("/run/containerd/containerd.sock"),
        }
    }
}

/// The `[fetch]` table: how the fetcher reads lazy layers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    /// Bytes fetched ahead of a reader walking forward through a layer; 0: off.
    pub readahead: u64,
    /// Two reads of a layer at most this many bytes apart fetch what lies between; 0: off.
    pub readahead_gap: u64,
    /// Start-up regions wait while a layer's metadata is read (see the fetcher).
    pub startup_yields: bool,
    /// Bytes fetched for a READ at least, rounded up to whole chunks of the layer.
    pub unit: u64,
}

impl FetchConfig {
    /// A unit the fetcher can work in: whole pages, at most its largest unit.
    fn check(&self) -> Result<()> {
        let max = lazy_erofs_ondemand::fetcher::MAX_UNIT;
        if self.unit == 0 || !self.unit.is_multiple_of(4096) || self.unit > max {
            bail!(
                "fetch.unit {} is not a multiple of 4096 between 4096 and {max}",
                self.unit
            );
        }
        Ok(())
    }
}

impl Default for FetchConfig {
    fn default() -> Self {
        let fetcher = lazy_erofs_ondemand::fetcher::FetcherConfig::default();
        Self {
            readahead: fetcher.readahead,
            readahead_gap: fetcher.readahead_gap,
            startup_yields: fetcher.startup_yields,
            unit: fetcher.chunk_size,
        }
    }
}

/// The `[metrics]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` of the Prometheus endpoint; empty: none.
    pub address: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:9108".into(),
        }
    }
}

impl MetricsConfig {
    /// The address to serve on, if any; a malformed one is an error naming the key.
    pub fn socket_addr(&self) -> Result<Option<std::net::SocketAddr>> {
        if self.address.is_empty() {
            return Ok(None);
        }
        self.address.parse().map(Some).with_context(|| {
            format!(
                "metrics.address {:?} is not host:port (e.g. \"127.0.0.1:9108\", or \"\" for none)",
                self.address
            )
        })
    }
}

/// The `[snapshotter]` table: where the daemon keeps its state and listens.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotterConfig {
    /// Snapshots, metadata store and cache live here (a real filesystem, not tmpfs).
    pub root: PathBuf,
    /// The gRPC socket containerd's `[proxy_plugins]` entry points at.
    pub address: PathBuf,
    /// Log filter (`RUST_LOG` syntax) when `RUST_LOG` is not set.
    pub log_level: String,
    /// cachefiles tag of the lazy layer cache and default fscache domain.
    pub fscache_tag: String,
    /// How lazy layers reach the kernel.
    pub backend: BackendChoice,
}

/// `snapshotter.backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// cachefiles ondemand where the cache binds, else fanotify pre-content where a mark
    /// is accepted, else whole layers.
    #[default]
    Auto,
    Cachefiles,
    Fanotify,
    /// Lazy layers fetched whole and mounted file-backed.
    Whole,
}

impl Default for SnapshotterConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/lazy-erofs"),
            address: PathBuf::from("/run/lazy-erofs/snapshotter.sock"),
            log_level: "info".into(),
            fscache_tag: "lazy-erofs".into(),
            backend: BackendChoice::Auto,
        }
    }
}

impl Config {
    /// `path`, else [`DEFAULT_PATH`] if it exists, else the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let path = match path {
            Some(path) => path.to_path_buf(),
            None if Path::new(DEFAULT_PATH).exists() => PathBuf::from(DEFAULT_PATH),
            None => return Ok(Self::default()),
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let config: Config =
            toml::from_str(&text).with_context(|| format!("config {}", path.display()))?;
        config
            .fetch
            .check()
            .with_context(|| format!("config {}", path.display()))?;
        for (host, options) in &config.registry.hosts {
            if let Some(ca_file) = &options.ca_file {
                lazy_erofs_image::registry::tls::ca_certificates(host, ca_file)
                    .with_context(|| format!("config {}", path.display()))?;
            }
        }
        let holds_password = config.registry.hosts.values().any(|h| h.password.is_some());
        let mode = std::fs::metadata(&path)?.permissions().mode();
        if holds_password && mode & 0o004 != 0 {
            bail!(
                "config {} holds a registry password but is readable by everyone \
                 (mode {:o}); chmod 600 it or use password_file",
                path.display(),
                mode & 0o777
            );
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_file_is_exactly_the_defaults() {
        let shipped: Config = toml::from_str(DEFAULT_CONFIG).expect("shipped config parses");
        assert_eq!(shipped, Config::default());
    }

    #[test]
    fn the_containerd_snippet_points_at_the_default_socket() {
        let snippet: toml::Value =
            toml::from_str(include_str!("../../packaging/containerd/proxy-plugin.toml"))
                .expect("snippet parses");
        let plugin = &snippet["proxy_plugins"]["lazy-erofs"];
        assert_eq!(plugin["type"].as_str(), Some("snapshot"));
        assert_eq!(
            plugin["address"].as_str().map(std::path::PathBuf::from),
            Some(SnapshotterConfig::default().address)
        );
        let unit = include_str!("../../packaging/systemd/lazy-erofs-snapshotter.service");
        for line in [
            "KillMode=process",
            "Restart=always",
            "--config /etc/lazy-erofs/config.toml",
        ] {
            assert!(unit.contains(line), "unit lacks {line}");
        }
    }

    #[test]
    fn a_world_readable_password_is_refused_and_a_private_one_accepted() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("config.toml");
        std::fs::write(
            &file,
            "[registry.hosts.\"r.example\"]\nusername = \"u\"\npassword = \"hunter2\"\n",
        )?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644))?;
        let err = Config::load(Some(&file)).expect_err("accepted").to_string();
        assert!(
            err.contains("readable by everyone") && !err.contains("hunter2"),
            "{err}"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
        let config = Config::load(Some(&file))?;
        assert!(config.registry.hosts.contains_key("r.example"));
        Ok(())
    }

    #[test]
    fn unknown_keys_are_named_with_the_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("config.toml");
        std::fs::write(&file, "[registry]\ninsecure = []\n")?;
        let err = format!("{:#}", Config::load(Some(&file)).expect_err("accepted"));
        assert!(
            err.contains("config.toml") && err.contains("unknown field `insecure`"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn a_fetch_unit_the_fetcher_cannot_use_is_refused_by_name() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("config.toml");
        for bad in ["0", "1000", "134217728"] {
            std::fs::write(&file, format!("[fetch]\nunit = {bad}\n"))?;
            let err = format!("{:#}", Config::load(Some(&file)).expect_err("accepted"));
            assert!(
                err.contains("config.toml") && err.contains(&format!("fetch.unit {bad} ")),
                "{err}"
            );
        }
        std::fs::write(&file, "[fetch]\nunit = 262144\n")?;
        assert_eq!(Config::load(Some(&file))?.fetch.unit, 262144);
        Ok(())
    }

    #[test]
    fn a_ca_file_that_holds_no_certificate_is_refused_at_load() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let (file, ca) = (dir.path().join("config.toml"), dir.path().join("ca.pem"));
        std::fs::write(&ca, "not a certificate\n")?;
        std::fs::write(
            &file,
            format!(
                "[registry.hosts.\"r.example\"]\nca_file = {:?}\n",
                ca.display().to_string()
            ),
        )?;
        let err = format!("{:#}", Config::load(Some(&file)).expect_err("accepted"));
        assert!(
            err.contains("config.toml") && err.contains("r.example") && err.contains("ca.pem"),
            "{err}"
        );
        let tls = lazy_erofs_test_support::tls_files(dir.path())?;
        std::fs::rename(&tls.ca, &ca)?;
        assert!(
            Config::load(Some(&file))?.registry.hosts["r.example"]
                .ca_file
                .is_some()
        );
        Ok(())
    }
}
