//! The lazy backend the daemon runs (`snapshotter.backend`): binds `/dev/cachefiles`
//! (cache in `<root>/cache`), or owns a fanotify pre-content group (layer files in
//! `<root>/layers/blobs`, a keeper process holding the group when the daemon is gone),
//! and prepares the failover supervisor for it. Under systemd the kernel handle goes to
//! its file descriptor store, and a handle a previous process stored is taken back, so
//! layer mounts outlive restarts.

use std::os::fd::AsFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use lazy_erofs_ondemand::fanotify::{self, Broker};
use lazy_erofs_ondemand::fdstore::{self, FdStore};
use lazy_erofs_ondemand::stats::Stats;
use lazy_erofs_ondemand::supervisor::Transport;
use lazy_erofs_ondemand::{Device, Supervisor, SupervisorConfig};
use lazy_erofs_snapshotter::lazy::Backend;
use sha2::{Digest, Sha256};

use super::admin::FetcherInfo;
use crate::config::{BackendChoice, Config};
use crate::registry_args::RegistryArgs;
use crate::serve::keeper::Keeper;
use crate::serve::log_event;

/// How long a planned stop waits for the fanotify broker's in-flight reads.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// How long the fanotify keeper, under systemd, lets reads wait for the restarted
/// daemon before it answers them itself (present pages, else EIO).
const SUCCESSOR_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A supervisor ready to start once the snapshotter has put the blob descriptions of
/// the layers it took over into the table (the first fetcher may `restore` at once).
pub struct Pending {
    supervisor: Supervisor,
    fanotify: Option<(Arc<Broker>, Keeper)>,
    /// The cache stays bound after this process (systemd keeps the device): a stop
    /// leaves the layer mounts for the next process to take over.
    pub keep_mounts: bool,
    /// The group outlives this process for a successor (systemd keeps it): a stop
    /// leaves new reads queued in it rather than fetching them.
    quiesce: bool,
}

/// The running supervisor thread and how to stop it.
pub struct Running {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    fanotify: Option<(Arc<Broker>, Keeper)>,
    pub keep_mounts: bool,
    quiesce: bool,
}

impl Pending {
    /// The fetchers' shared counters, mapped once more for the daemon's metrics.
    pub fn stats(&self) -> Result<Arc<Stats>> {
        let fd = self
            .supervisor
            .stats()
            .fd()
            .try_clone_to_owned()
            .context("duplicating the fetcher counters")?;
        Ok(Arc::new(
            Stats::from_fd(fd).context("mapping the fetcher counters")?,
        ))
    }

    /// Starts the supervisor; `fetcher` follows its child (for `lazy-erofs status`).
    pub fn start(self, fetcher: Arc<Mutex<FetcherInfo>>) -> Result<Running> {
        let stop = Arc::new(AtomicBool::new(false));
        let supervisor = self.supervisor;
        let thread = std::thread::Builder::new()
            .name("supervisor".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    let summary = supervisor.run(&stop, |event| {
                        fetcher
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .follow(event);
                        log_event(event);
                    });
                    tracing::info!(restarts = summary.restarts, "fetcher supervisor stopped");
                }
            })?;
        Ok(Running {
            stop,
            thread,
            fanotify: self.fanotify,
            keep_mounts: self.keep_mounts,
            quiesce: self.quiesce,
        })
    }
}

impl Running {
    /// Whether systemd keeps the kernel handle for the next process.
    pub fn kept(&self) -> bool {
        self.keep_mounts || self.quiesce
    }

    /// A planned stop: the fetcher goes; with the handle kept, requests it had not
    /// answered stay queued in the kernel for the next process.
    pub fn stop(self) {
        if let Some((broker, _)) = &self.fanotify {
            if self.quiesce {
                // New reads queue in the group for the next process.
                broker.quiesce();
            }
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
/// and prepares its supervisor. Logs which and why.
pub fn choose(
    config: &Config,
    fetcher_registry: &RegistryArgs,
    store: &mut FdStore,
) -> Result<(Backend, Option<Pending>)> {
    let root = &config.snapshotter.root;
    let cache = root.join("cache");
    make_dir(&cache)?;
    let choice = config.snapshotter.backend;
    let kept_device = kept_cachefiles(config, store);
    forget_untaken(store);
    if kept_device.is_none() {
        // Mounts a killed predecessor left keep its cache alive, and the kernel refuses
        // fscache mounts while a second cache lingers: clear them before binding.
        // Running containers keep theirs alive regardless (overlayfs holds clones of
        // its layers); opening the layer mounts counts and logs those.
        lazy_erofs_snapshotter::lazy::layers::clear_stale_mounts(&root.join("layers/mnt"));
    }
    if matches!(choice, BackendChoice::Auto | BackendChoice::Cachefiles) {
        let device = match kept_device {
            Some(device) => Ok((device, true)),
            None => Device::bind(&cache, &config.snapshotter.fscache_tag).map(|d| (d, false)),
        };
        match device {
            Ok((device, kept)) => return cachefiles(config, fetcher_registry, device, kept, store),
            Err(e) if choice == BackendChoice::Cachefiles => {
                return Err(e)
                    .context("backend = \"cachefiles\" but the ondemand cache does not bind");
            }
            Err(e) => tracing::info!(error = %e, "backend auto: no ondemand cachefiles here"),
        }
    }
    if matches!(choice, BackendChoice::Auto | BackendChoice::Fanotify) {
        match fanotify_backend(config, fetcher_registry, store) {
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

fn make_dir(path: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// The store name of this configuration's cachefiles handle: a handle bound for another
/// cache directory or tag (the configuration changed) is not taken back.
fn cachefiles_name(config: &Config) -> String {
    let mut hash = Sha256::new();
    hash.update(
        config
            .snapshotter
            .root
            .join("cache")
            .as_os_str()
            .as_encoded_bytes(),
    );
    hash.update([0]);
    hash.update(config.snapshotter.fscache_tag.as_bytes());
    let hex: String = hash.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}.{hex}", fdstore::CACHEFILES)
}

/// The bound device a previous process of this unit stored, if it is still bound.
fn kept_cachefiles(config: &Config, store: &mut FdStore) -> Option<Device> {
    let name = cachefiles_name(config);
    let fd = store.take(&name)?;
    match Device::adopt(fd) {
        Ok(device) => {
            tracing::info!(
                name,
                "backend cachefiles: took back the bound cache systemd kept"
            );
            Some(device)
        }
        Err(e) => {
            tracing::warn!(name, error = %e, "dropping the cachefiles handle systemd kept");
            let _ = store.forget(&name);
            None
        }
    }
}

/// Closes stored handles this configuration does not use (and has systemd close its
/// copies): a cache bound for another directory or tag would keep that binding alive.
fn forget_untaken(store: &mut FdStore) {
    for name in store.untaken() {
        if name == fdstore::FANOTIFY {
            continue;
        }
        tracing::warn!(
            name,
            "closing a handle systemd kept that this configuration does not use"
        );
        drop(store.take(&name));
        let _ = store.forget(&name);
    }
}

/// The fetcher runs from this process's own executable: after an upgrade replaced the
/// file on disk, `/proc/self/exe` still names the running version (the path would name
/// the new one, or nothing), so supervisor and fetcher always speak one protocol.
fn fetcher_command(fetcher_registry: &RegistryArgs) -> Result<Vec<std::ffi::OsString>> {
    let exe = crate::own_executable()?;
    let mut command = vec![exe.into(), "fetcher".into()];
    command.extend(fetcher_registry.to_args());
    Ok(command)
}

fn cachefiles(
    config: &Config,
    fetcher_registry: &RegistryArgs,
    device: Device,
    adopted: bool,
    store: &FdStore,
) -> Result<(Backend, Option<Pending>)> {
    let root = &config.snapshotter.root;
    let tag = &config.snapshotter.fscache_tag;
    let kept = adopted || keep(store, &cachefiles_name(config), &device);
    let mut supervisor_config =
        SupervisorConfig::new(root.join("fetcher"), fetcher_command(fetcher_registry)?);
    supervisor_config.adopted = adopted;
    // The cache GC culls objects through its own handle on the same binding.
    let culls = Device::from_fd(
        device
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating the cachefiles fd")?,
    );
    let supervisor = Supervisor::new(device, supervisor_config)?;
    let backend = Backend::Fscache {
        blobs: supervisor.blobs().clone(),
        tag: tag.clone(),
        kept: adopted,
        cache_dir: root.join("cache"),
        device: Arc::new(culls),
    };
    tracing::info!(cache = %root.join("cache").display(), tag, adopted, kept, "backend cachefiles: ondemand cache bound; fetcher supervised");
    Ok((
        backend,
        Some(Pending {
            supervisor,
            fanotify: None,
            keep_mounts: kept,
            quiesce: false,
        }),
    ))
}

/// Hands systemd a copy of a kernel handle; says whether it now holds one.
fn keep(store: &FdStore, name: &str, fd: &impl AsFd) -> bool {
    if !store.active() {
        tracing::info!(
            "not under systemd (no NOTIFY_SOCKET): the kernel handles end with this \
             process, and readers of data not fetched yet fail once it is gone"
        );
        return false;
    }
    match store.keep(name, fd.as_fd()) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(name, error = %e, "systemd did not take the handle; a restart breaks lazy reads");
            false
        }
    }
}

/// The fanotify backend: the group (adopted from a previous run's keeper, else the one
/// systemd kept, else new), a trial mark in the layer directory, the keeper, the broker
/// and the supervisor.
fn fanotify_backend(
    config: &Config,
    fetcher_registry: &RegistryArgs,
    store: &mut FdStore,
) -> Result<(Backend, Option<Pending>)> {
    let (root, startup_yields) = (&config.snapshotter.root, config.fetch.startup_yields);
    let dir = root.join("layers/blobs");
    make_dir(&dir)?;
    let stored = store.take(fdstore::FANOTIFY);
    // systemd holds this group already: storing it again would only add a copy.
    let in_store = stored.is_some();
    let group = match (fanotify::keeper::adopt(&dir), stored) {
        (Some(group), _) => {
            tracing::info!("adopted the fanotify group a previous run's keeper held");
            group
        }
        (None, Some(fd)) => {
            // Nobody answered what the previous process had read: deny it before this
            // process reads (and numbers) events of its own.
            let group = fanotify::Group::from_fd(fd);
            let stale = fanotify::keeper::deny_stale(&group, fanotify::keeper::fd_limit());
            tracing::info!(stale, "took back the fanotify group systemd kept");
            group
        }
        (None, None) => fanotify::Group::new()?,
    };
    // The filesystem must accept pre-content marks (ext4, xfs, btrfs; not tmpfs).
    let probe = dir.join(".mark-probe");
    std::fs::write(&probe, b"")?;
    let marked = group.mark(&probe).and_then(|()| group.unmark(&probe));
    let _ = std::fs::remove_file(&probe);
    marked?;
    let kept = in_store || keep(store, fdstore::FANOTIFY, &group);
    let successor_wait = if kept {
        SUCCESSOR_WAIT
    } else {
        std::time::Duration::ZERO
    };
    let keeper = crate::serve::keeper::spawn(&group, &dir, successor_wait)?;
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
        startup_yields,
    };
    tracing::info!(dir = %dir.display(), kept, "backend fanotify: pre-content group ready; fetcher supervised");
    Ok((
        backend,
        // File-backed mounts are replaced at each start (the group, kept or adopted,
        // serves the old ones' readers too): a stop unmounts them.
        Some(Pending {
            supervisor,
            fanotify: Some((broker, keeper)),
            keep_mounts: false,
            quiesce: kept,
        }),
    ))
}
