//! The `lazy-erofs-snapshotter` daemon: configuration, the store and snapshot tree under
//! the root, the gRPC socket served as soon as the store is open, SIGTERM/SIGINT stop it
//! after in-flight calls finish.
//!
//! Lazy layers: the daemon picks a backend ([`backend`]) and hosts the failover
//! supervisor, which runs the fetcher child (this binary's hidden `fetcher` subcommand)
//! and restarts it when it dies. Under systemd (`Type=notify`) it says `READY=1` once
//! serving and keeps its kernel handles in systemd's file descriptor store.

mod admin;
mod backend;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::Args;
use lazy_erofs_image::registry::Registry;
use lazy_erofs_ondemand::fdstore::FdStore;
use lazy_erofs_ondemand::stats::Stats;
use lazy_erofs_snapshotter::cri::{self, PullCredentials};
use lazy_erofs_snapshotter::metrics::{CacheFigures, Metrics, StatsObserver};
use lazy_erofs_snapshotter::overlay::OverlaySnapshotter;
use lazy_erofs_snapshotter::server;

use self::admin::FetcherInfo;
use crate::config::{Config, CriConfig};
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
    /// Prometheus endpoint host:port, "" for none (overrides the config's
    /// metrics.address).
    #[arg(long)]
    pub metrics_address: Option<String>,
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
    if let Some(address) = &args.metrics_address {
        config.metrics.address = address.clone();
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

/// The daemon's parts once the store is open and the backend runs.
struct Opened {
    snapshotter: Arc<OverlaySnapshotter>,
    supervisor: Option<backend::Running>,
    /// The fetchers' counters (also counting the daemon's own registry requests).
    stats: Arc<Stats>,
    fetcher: Option<Arc<Mutex<FetcherInfo>>>,
    backend: &'static str,
    /// Where the CRI image proxy puts the credentials pulls carry.
    pull_credentials: Arc<PullCredentials>,
}

/// The snapshotter over its lazy backend, then the supervisor: layer mounts taken over
/// from a previous process are in the blob table before the first fetcher restores.
fn open_snapshotter(
    config: &Config,
    fetcher_registry: &RegistryArgs,
    store: &mut FdStore,
) -> Result<Opened> {
    let root: &Path = &config.snapshotter.root;
    let (backend, pending) = backend::choose(config, fetcher_registry, store)?;
    let stats = match &pending {
        Some(pending) => pending.stats()?,
        None => Arc::new(Stats::create().context("creating the registry counters")?),
    };
    let observer = Arc::new(StatsObserver(stats.clone()));
    let registry = Arc::new(Registry::new(&config.registry).with_observer(observer));
    let name = backend.name();
    // Before the supervisor starts: restored fetchers need them for their first reads.
    let pull_credentials = Arc::new(PullCredentials::with_file(
        registry.clone(),
        backend.blobs().cloned(),
        root.join(cri::CREDENTIALS_FILE),
    ));
    let snapshotter = OverlaySnapshotter::open_lazy(root, backend, registry)
        .with_context(|| format!("opening snapshotter root {}", root.display()))?;
    let fetcher = pending
        .as_ref()
        .map(|_| Arc::new(Mutex::new(FetcherInfo::default())));
    let supervisor = match (pending, &fetcher) {
        (Some(pending), Some(fetcher)) => Some(pending.start(fetcher.clone())?),
        _ => None,
    };
    Ok(Opened {
        snapshotter: Arc::new(snapshotter),
        supervisor,
        stats,
        fetcher,
        backend: name,
        pull_credentials,
    })
}

/// Metrics endpoint (when configured), the Admin service, the periodic cache GC.
async fn operations(config: &Config, opened: &Opened) -> Result<server::Extras> {
    let snapshotter = opened.snapshotter.clone();
    let figures: CacheFigures = Arc::new(move || {
        snapshotter
            .cache_inventory()
            .ok()
            .flatten()
            .map(|inventory| inventory.by_state())
            .unwrap_or_default()
    });
    let metrics = Arc::new(Metrics::new(Some(opened.stats.clone()), figures));
    let mut metrics_address = None;
    if let Some(address) = config.metrics.socket_addr()? {
        let bound = lazy_erofs_snapshotter::metrics::http::serve(address, metrics.clone()).await?;
        tracing::info!(address = %bound, "metrics at http://{bound}/metrics");
        metrics_address = Some(bound);
    }
    admin::spawn_collector(
        opened.snapshotter.clone(),
        config.cache.clone(),
        Some(metrics.clone()),
    );
    let control = admin::DaemonControl {
        snapshotter: opened.snapshotter.clone(),
        fetcher: opened.fetcher.clone(),
        stats: opened.stats.clone(),
        limits: config.cache.clone(),
        metrics: Some(metrics.clone()),
        metrics_address,
        backend: opened.backend,
        kept_by_systemd: opened
            .supervisor
            .as_ref()
            .is_some_and(backend::Running::kept),
        root: config.snapshotter.root.clone(),
    };
    Ok(server::Extras {
        admin: Some(Arc::new(control)),
        metrics: Some(metrics),
    })
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
    let opened = match open_snapshotter(config, fetcher_registry, store) {
        Ok(opened) => opened,
        Err(e) => {
            let _ = std::fs::remove_file(&settings.address);
            return Err(e);
        }
    };
    let extras = match operations(config, &opened).await {
        Ok(extras) => extras,
        Err(e) => {
            let _ = std::fs::remove_file(&settings.address);
            return Err(e);
        }
    };
    let Opened {
        snapshotter,
        supervisor,
        pull_credentials,
        ..
    } = opened;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let image_proxy =
        image_proxy(&config.cri, pull_credentials, stop_rx.clone()).inspect_err(|_| {
            let _ = std::fs::remove_file(&settings.address);
        })?;
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
    let mut stopped = stop_rx;
    let server = server::serve(listener, snapshotter.clone(), extras, async move {
        let _ = stopped.wait_for(|stop| *stop).await;
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
    let _ = stop_tx.send(true);
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
        .await
        .is_err()
    {
        tracing::info!(grace = ?SHUTDOWN_GRACE, "clients still connected; exiting");
    }
    // A socket left behind would only look like a dead daemon; remove it.
    let _ = std::fs::remove_file(&settings.address);
    if let Some(proxy) = image_proxy {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, proxy).await;
        let _ = std::fs::remove_file(&config.cri.image_proxy);
    }
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

/// The kubelet's image service proxy on `config.image_proxy`, if configured, serving
/// until `stop` turns true.
fn image_proxy(
    config: &CriConfig,
    credentials: Arc<PullCredentials>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    if config.image_proxy.as_os_str().is_empty() {
        return Ok(None);
    }
    let listener = server::bind(&config.image_proxy)
        .with_context(|| format!("cri.image_proxy {}", config.image_proxy.display()))?;
    let proxy = cri::ImageProxy::new(config.containerd.clone(), credentials);
    tracing::info!(
        address = %config.image_proxy.display(),
        containerd = %config.containerd.display(),
        "CRI image proxy serving"
    );
    Ok(Some(tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.wait_for(|stop| *stop).await;
        };
        if let Err(err) = cri::serve(listener, proxy, shutdown).await {
            tracing::error!(%err, "CRI image proxy stopped");
        }
    })))
}
