//! The `lazy-erofs-snapshotter` daemon: configuration, the store and snapshot tree under
//! the root, the gRPC socket served as soon as the store is open, SIGTERM/SIGINT stop it
//! after in-flight calls finish.
//!
//! Lazy layers: the daemon picks a backend ([`backend`]) and hosts the failover
//! supervisor, which runs the fetcher child (this binary's hidden `fetcher` subcommand)
//! and restarts it when it dies. Under systemd (`Type=notify`) it says `READY=1` once
//! serving and keeps its kernel handles in systemd's file descriptor store.

mod backend;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use lazy_erofs_image::registry::Registry;
use lazy_erofs_ondemand::fdstore::FdStore;
use lazy_erofs_snapshotter::overlay::OverlaySnapshotter;
use lazy_erofs_snapshotter::server;

use crate::config::Config;
use crate::registry_args::RegistryArgs;

/// How long in-flight calls get to finish after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

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

pub fn run(config: &Config, args: &DaemonArgs) -> Result<()> {
    let mut store = FdStore::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The fetcher child reads the same configuration file (credentials never travel on
    // its command line).
    let fetcher_registry = RegistryArgs {
        config: args.config.clone(),
        insecure: Vec::new(),
    };
    runtime.block_on(serve(config, &fetcher_registry, &mut store))
}

/// The snapshotter over its lazy backend, then the supervisor: layer mounts taken over
/// from a previous process are in the blob table before the first fetcher restores.
fn open_snapshotter(
    config: &Config,
    fetcher_registry: &RegistryArgs,
    store: &mut FdStore,
) -> Result<(OverlaySnapshotter, Option<backend::Running>)> {
    let root: &Path = &config.snapshotter.root;
    let (backend, pending) = backend::choose(config, fetcher_registry, store)?;
    let registry = Arc::new(Registry::new(&config.registry));
    let snapshotter = OverlaySnapshotter::open_lazy(root, backend, registry)
        .with_context(|| format!("opening snapshotter root {}", root.display()))?;
    let running = pending.map(backend::Pending::start).transpose()?;
    Ok((snapshotter, running))
}

async fn serve(
    config: &Config,
    fetcher_registry: &RegistryArgs,
    store: &mut FdStore,
) -> Result<()> {
    let settings = &config.snapshotter;
    let root = &settings.root;
    // Handlers before anything else: clients may connect as soon as the socket exists,
    // and a SIGTERM during start-up must still stop the daemon cleanly.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    // The socket first: a second daemon on the same socket is told so plainly.
    let listener = server::bind(&settings.address)?;
    let (snapshotter, supervisor) = match open_snapshotter(config, fetcher_registry, store) {
        Ok((snapshotter, supervisor)) => (Arc::new(snapshotter), supervisor),
        Err(e) => {
            let _ = std::fs::remove_file(&settings.address);
            return Err(e);
        }
    };
    // Slow recovery after the socket serves: Mounts calls mount what they need meanwhile.
    tokio::spawn({
        let snapshotter = snapshotter.clone();
        async move {
            match snapshotter.mount_lazy_layers().await {
                Ok(0) => {}
                Ok(count) => tracing::info!(count, "lazy layers mounted"),
                Err(e) => tracing::warn!(error = %e, "mounting lazy layers"),
            }
        }
    });
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        root = %root.display(),
        address = %settings.address.display(),
        "serving"
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = server::serve(listener, snapshotter.clone(), async {
        let _ = stop_rx.await;
    });
    tokio::pin!(server);
    if let Err(e) = store.ready("serving") {
        tracing::warn!(error = %e, "cannot tell systemd we are ready");
    }
    tokio::select! {
        result = &mut server => result?,
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
    }
    let _ = store.stopping("stopping");
    // Stop accepting, let in-flight calls finish; containerd keeps its connection open
    // for good, so do not wait for connections to close beyond the grace period.
    let _ = stop_tx.send(());
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
        .await
        .is_err()
    {
        tracing::info!(grace = ?SHUTDOWN_GRACE, "clients still connected; exiting");
    }
    // A socket left behind would only look like a dead daemon; remove it.
    let _ = std::fs::remove_file(&settings.address);
    let keep_mounts = supervisor.as_ref().is_some_and(|s| s.keep_mounts);
    if keep_mounts {
        // systemd keeps the cache bound: the mounts and every read waiting on them
        // stay for the next process (a restart), or until systemd drops the store.
        tracing::info!("layer mounts stay: systemd keeps the cache bound for the next start");
    } else {
        stop_mounts(&snapshotter);
    }
    if let Some(supervisor) = supervisor {
        supervisor.stop();
    }
    tracing::info!("stopped");
    Ok(())
}

/// Unmounts the lazy layers at a stop that keeps no kernel handle.
fn stop_mounts(snapshotter: &OverlaySnapshotter) {
    let in_use = snapshotter.overlays_using_layers();
    if in_use > 0 {
        tracing::warn!(
            containers = in_use,
            "running containers use lazy layers: once this daemon is gone their reads of \
             data not fetched yet fail (ENOBUFS; EIO for a read in flight) until they are \
             restarted"
        );
    }
    let refused = snapshotter.unmount_layers();
    if refused > 0 {
        tracing::warn!(refused, "lazy layer mounts could not be unmounted");
    }
}
