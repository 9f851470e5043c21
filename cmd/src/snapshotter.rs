//! The `lazy-erofs-snapshotter` daemon: configuration, the store and snapshot tree under
//! the root, the gRPC socket served as soon as the store is open, SIGTERM/SIGINT stop it
//! after in-flight calls finish.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use lazy_erofs_snapshotter::overlay::OverlaySnapshotter;
use lazy_erofs_snapshotter::server;

use crate::config::Config;

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Configuration file; default /etc/lazy-erofs/config.toml when it exists.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// State directory (overrides the config's snapshotter.root).
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// gRPC socket (overrides the config's snapshotter.address).
    #[arg(long)]
    pub address: Option<PathBuf>,
}

/// The configuration with command-line overrides applied.
pub fn config(args: &DaemonArgs) -> Result<Config> {
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(root) = &args.root {
        config.snapshotter.root = root.clone();
    }
    if let Some(address) = &args.address {
        config.snapshotter.address = address.clone();
    }
    Ok(config)
}

pub fn run(config: &Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(config))
}

async fn serve(config: &Config) -> Result<()> {
    let settings = &config.snapshotter;
    let root = &settings.root;
    let snapshotter = Arc::new(
        OverlaySnapshotter::open(root)
            .with_context(|| format!("opening snapshotter root {}", root.display()))?,
    );
    let listener = server::bind(&settings.address)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        root = %root.display(),
        address = %settings.address.display(),
        "serving"
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        }
    };
    server::serve(listener, snapshotter, shutdown).await?;
    // A socket left behind would only look like a dead daemon; remove it.
    let _ = std::fs::remove_file(&settings.address);
    tracing::info!("stopped");
    Ok(())
}
