//! The `lazy-erofs-snapshotter` daemon: configuration, the store and snapshot tree under
//! the root, the gRPC socket served as soon as the store is open, SIGTERM/SIGINT stop it
//! after in-flight calls finish.
//!
//! Lazy layers: the daemon binds `/dev/cachefiles` (cache in `<root>/cache`) and hosts
//! the failover supervisor, which runs the fetcher child (this binary's hidden
//! `fetcher` subcommand) and restarts it when it dies. Without ondemand mode, lazy
//! layers are fetched whole and mounted file-backed.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Args;
use lazy_erofs_image::registry::Registry;
use lazy_erofs_ondemand::{Device, Event, Supervisor, SupervisorConfig};
use lazy_erofs_snapshotter::lazy::Backend;
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // The fetcher child reads the same configuration file (credentials never travel on
    // its command line).
    let fetcher_registry = RegistryArgs {
        config: args.config.clone(),
        insecure: Vec::new(),
    };
    runtime.block_on(serve(config, &fetcher_registry))
}

/// The running supervisor thread and how to stop it.
struct FetcherSupervisor {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl FetcherSupervisor {
    fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
    }
}

/// Binds the ondemand cache and starts the supervisor; without ondemand mode, says so
/// and falls back to whole-layer fetches.
fn lazy_backend(
    config: &Config,
    fetcher_registry: &RegistryArgs,
) -> Result<(Backend, Option<FetcherSupervisor>)> {
    let root = &config.snapshotter.root;
    let tag = &config.snapshotter.fscache_tag;
    let cache = root.join("cache");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cache)
        .with_context(|| format!("creating {}", cache.display()))?;
    // Mounts a killed predecessor left keep its cache alive, and the kernel refuses
    // fscache mounts while a second cache lingers: clear them before binding. Running
    // containers keep theirs alive regardless (overlayfs holds clones of its layers);
    // opening the layer mounts counts and logs those.
    lazy_erofs_snapshotter::lazy::layers::clear_stale_mounts(&root.join("layers/mnt"));
    let device = match Device::bind(&cache, tag) {
        Ok(device) => device,
        Err(e) => {
            tracing::warn!(
                error = %e,
                "no ondemand cachefiles here: lazy layers are fetched whole and mounted \
                 file-backed (slower start; `lazy-erofs check` explains)"
            );
            return Ok((Backend::FileBacked, None));
        }
    };
    let exe = std::env::current_exe().context("finding our own executable")?;
    let mut command = vec![exe.into(), "fetcher".into()];
    command.extend(fetcher_registry.to_args());
    let supervisor = Supervisor::new(device, SupervisorConfig::new(root.join("fetcher"), command))?;
    let backend = Backend::Fscache {
        blobs: supervisor.blobs().clone(),
        tag: tag.clone(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let thread = std::thread::Builder::new()
        .name("supervisor".into())
        .spawn({
            let stop = stop.clone();
            move || {
                let summary = supervisor.run(&stop, log_event);
                tracing::info!(restarts = summary.restarts, "fetcher supervisor stopped");
            }
        })?;
    tracing::info!(cache = %cache.display(), tag, "ondemand cache bound; fetcher supervised");
    Ok((backend, Some(FetcherSupervisor { stop, thread })))
}

fn log_event(event: &Event) {
    match event {
        Event::Started {
            pid,
            generation,
            restored,
        } => {
            tracing::info!(pid, generation, restored, "fetcher started");
        }
        Event::Exited {
            pid,
            generation,
            status,
            lived,
        } => {
            tracing::warn!(pid, generation, %status, ?lived, "fetcher exited; restarting");
        }
        Event::StartFailed { generation, reason } => {
            tracing::error!(generation, %reason, "fetcher failed to start");
        }
    }
}

fn open_snapshotter(
    config: &Config,
    fetcher_registry: &RegistryArgs,
) -> Result<(OverlaySnapshotter, Option<FetcherSupervisor>)> {
    let root: &Path = &config.snapshotter.root;
    let (backend, supervisor) = lazy_backend(config, fetcher_registry)?;
    let registry = Arc::new(Registry::new(&config.registry));
    let snapshotter = OverlaySnapshotter::open_lazy(root, backend, registry)
        .with_context(|| format!("opening snapshotter root {}", root.display()))?;
    Ok((snapshotter, supervisor))
}

async fn serve(config: &Config, fetcher_registry: &RegistryArgs) -> Result<()> {
    let settings = &config.snapshotter;
    let root = &settings.root;
    // Handlers before anything else: clients may connect as soon as the socket exists,
    // and a SIGTERM during start-up must still stop the daemon cleanly.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    // The socket first: a second daemon on the same socket is told so plainly.
    let listener = server::bind(&settings.address)?;
    let (snapshotter, supervisor) = match open_snapshotter(config, fetcher_registry) {
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
    tokio::select! {
        result = &mut server => result?,
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = interrupt.recv() => tracing::info!("SIGINT: stopping"),
    }
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
    if let Some(supervisor) = supervisor {
        supervisor.stop();
    }
    tracing::info!("stopped");
    Ok(())
}
