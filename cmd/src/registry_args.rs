//! The registry options every command takes (`--config`, `--insecure`), in one place.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use lazy_erofs_image::registry::Registry;

use crate::config::Config;

/// How a command reaches registries: the configuration file plus `--insecure` hosts.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Configuration file (registry hosts, mirrors, credentials); default
    /// /etc/lazy-erofs/config.toml when it exists.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A registry host (`host[:port]`) reached over plain HTTP; repeatable.
    #[arg(long = "insecure", value_name = "HOST")]
    pub insecure: Vec<String>,
}

impl RegistryArgs {
    pub fn registry(&self) -> Result<Registry> {
        Ok(Registry::new(&self.options()?))
    }

    /// The registry options: the configuration file's, plus `--insecure` hosts.
    pub fn options(&self) -> Result<lazy_erofs_image::registry::RegistryOptions> {
        Ok(self.load()?.registry)
    }

    /// The whole configuration file, with `--insecure` hosts added.
    pub fn load(&self) -> Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        config
            .registry
            .insecure_hosts
            .extend(self.insecure.iter().cloned());
        Ok(config)
    }

    /// The same options as command-line arguments, for the fetcher child.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut args = Vec::new();
        if let Some(config) = &self.config {
            args.extend(["--config".into(), config.clone().into_os_string()]);
        }
        for host in &self.insecure {
            args.extend(["--insecure".into(), host.into()]);
        }
        args
    }
}
