//! The `lazy-erofs-snapshotter` daemon: configuration, the store and snapshot tree under
//! the root, the gRPC socket served as soon as the store is open, SIGTERM/SIGINT stop it
//! after in-flight calls finish.
//!
//! Lazy layers: the daemon picks a backend (`snapshotter.backend`): it binds
//! `/dev/cachefiles` (cache in `<root>/cache`), or owns a fanotify pre-content group
//! (layer files in `<root>/layers/blobs`, a keeper process holding the group when the
//! daemon is gone), and hosts the failover supervisor, which runs the fetcher child (this
//! binary's hidden `fetcher` subcommand) and restarts it when it dies. Without either,
//! lazy layers are fetched whole and mounted file-backed.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Args;
use lazy_erofs_image::registry::Registry;
use lazy_erofs_ondemand::fanotify::{self, Broker};
use lazy_erofs_ondemand::supervisor::Transport;
use lazy_erofs_ondemand::{Device, Supervisor, SupervisorConfig};
use lazy_erofs_snapshotter::lazy::Backend;
use lazy_erofs_snapshotter::overlay::OverlaySnapshotter;
use lazy_erofs_snapshotter::server;

use crate::config::{BackendChoice, Config};
use crate::registry_args::RegistryArgs;
use crate::serve::keeper::Keeper;
use crate::serve::log_event;

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
    /// The fanotify backend's broker and group keeper.
    fanotify: Option<(Arc<Broker>, Keeper)>,
}

/// How long a planned stop waits for the fanotify broker's in-flight reads.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

impl FetcherSupervisor {
    fn stop(self) {
        if let Some((broker, _)) = &self.fanotify {
            let left = broker.drain(DRAIN);
            if left > 0 {
                tracing::warn!(left, "reads still in flight at stop; they fail with EIO");
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.thread.join();
        if let Some((broker, keeper)) = self.fanotify {
            let summary = broker.stop();
            tracing::info!(?summary, "fanotify broker stopped");
            keeper.release();
        }
    }
}

/// Picks the lazy backend `snapshotter.backend` asks for (`auto`: cachefiles where the
/// cache binds, else fanotify where a pre-content mark is accepted, else whole layers),
/// and starts its supervisor. Logs which and why.
fn lazy_backend(
    config: &Config,
    fetcher_registry: &RegistryArgs,
) -> Result<(Backend, Option<FetcherSupervisor>)> {
    let root = &config.snapshotter.root;
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
    let choice = config.snapshotter.backend;
    if matches!(choice, BackendChoice::Auto | BackendChoice::Cachefiles) {
        match Device::bind(&cache, &config.snapshotter.fscache_tag) {
            Ok(device) => return cachefiles_backend(config, fetcher_registry, device),
            Err(e) if choice == BackendChoice::Cachefiles => {
                return Err(e)
                    .context("backend = \"cachefiles\" but the ondemand cache does not bind");
            }
            Err(e) => tracing::info!(error = %e, "backend auto: no ondemand cachefiles here"),
        }
    }
    if matches!(choice, BackendChoice::Auto | BackendChoice::Fanotify) {
        match fanotify_backend(root, fetcher_registry) {
            Ok(started) => return Ok(started),
            Err(e) if choice == BackendChoice::Fanotify => {
                return Err(e.context("backend = \"fanotify\" cannot start"));
            }
            Err(e) => tracing::info!(
                error = format!("{e:#}"),
                "backend auto: no fanotify pre-content here"
            ),
        }
    }
    tracing::warn!(
        ?choice,
        "lazy layers are fetched whole and mounted file-backed (slower start; \
         `lazy-erofs check` explains)"
    );
    Ok((Backend::FileBacked, None))
}

fn fetcher_command(fetcher_registry: &RegistryArgs) -> Result<Vec<std::ffi::OsString>> {
    let exe = std::env::current_exe().context("finding our own executable")?;
    let mut command = vec![exe.into(), "fetcher".into()];
    command.extend(fetcher_registry.to_args());
    Ok(command)
}

fn spawn_supervisor(
    supervisor: Supervisor,
) -> Result<(Arc<AtomicBool>, std::thread::JoinHandle<()>)> {
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
    Ok((stop, thread))
}

fn cachefiles_backend(
    config: &Config,
    fetcher_registry: &RegistryArgs,
    device: Device,
) -> Result<(Backend, Option<FetcherSupervisor>)> {
    let root = &config.snapshotter.root;
    let tag = &config.snapshotter.fscache_tag;
    let supervisor = Supervisor::new(
        device,
        SupervisorConfig::new(root.join("fetcher"), fetcher_command(fetcher_registry)?),
    )?;
    let backend = Backend::Fscache {
        blobs: supervisor.blobs().clone(),
        tag: tag.clone(),
    };
    let (stop, thread) = spawn_supervisor(supervisor)?;
    tracing::info!(cache = %root.join("cache").display(), tag, "backend cachefiles: ondemand cache bound; fetcher supervised");
    Ok((
        backend,
        Some(FetcherSupervisor {
            stop,
            thread,
            fanotify: None,
        }),
    ))
}

/// The fanotify backend: the group (adopted from a previous run's keeper, or new), a
/// trial mark in the layer directory, the keeper, the broker and the supervisor.
fn fanotify_backend(
    root: &Path,
    fetcher_registry: &RegistryArgs,
) -> Result<(Backend, Option<FetcherSupervisor>)> {
    let dir = root.join("layers/blobs");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let group = match fanotify::keeper::adopt(&dir) {
        Some(group) => {
            tracing::info!("adopted the fanotify group a previous run left");
            group
        }
        None => fanotify::Group::new()?,
    };
    // The filesystem must accept pre-content marks (ext4, xfs, btrfs; not tmpfs).
    let probe = dir.join(".mark-probe");
    std::fs::write(&probe, b"")?;
    let marked = group.mark(&probe).and_then(|()| group.unmark(&probe));
    let _ = std::fs::remove_file(&probe);
    marked?;
    let keeper = crate::serve::keeper::spawn(&group, &dir)?;
    let broker = Arc::new(fanotify::Broker::start(
        group,
        fanotify::BrokerConfig::default(),
    )?);
    let mut config =
        SupervisorConfig::new(root.join("fetcher"), fetcher_command(fetcher_registry)?);
    config.restore = false;
    let supervisor = Supervisor::with_transport(Transport::Fanotify(broker.clone()), config)?;
    let backend = Backend::Fanotify {
        blobs: supervisor.blobs().clone(),
        broker: broker.clone(),
    };
    let (stop, thread) = spawn_supervisor(supervisor)?;
    tracing::info!(dir = %dir.display(), "backend fanotify: pre-content group ready; fetcher supervised");
    Ok((
        backend,
        Some(FetcherSupervisor {
            stop,
            thread,
            fanotify: Some((broker, keeper)),
        }),
    ))
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
