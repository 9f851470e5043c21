//! `lazy-erofs serve`: the failover supervisor and fetcher serving EROFS images lazily
//! (through `/dev/cachefiles`, or as file-backed mounts filled on fanotify events), and
//! the hidden `fetcher` child it runs.

mod fanotify;
pub mod keeper;

use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::Registry;
use lazy_erofs_ondemand::stats::Stats;
use lazy_erofs_ondemand::{
    BlobSource, BlobSpec, Device, Event, LocalBlob, LocalSourceFactory, RegistryCredentials,
    SourceError, SourceFactory, Supervisor, SupervisorConfig, Throttle, child,
    fetcher::FetcherConfig,
};
use lazy_erofs_snapshotter::lazy::{LazyLayerSpec, LazySourceFactory, View};
use lazy_erofs_snapshotter::metrics::StatsObserver;

use crate::registry_args::RegistryArgs;

/// The kernel transport `serve` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServeBackend {
    /// EROFS over fscache, `/dev/cachefiles` in ondemand mode (kernels up to 7.1 built
    /// with CACHEFILES_ONDEMAND).
    Cachefiles,
    /// File-backed EROFS filled on fanotify pre-content events (6.14+).
    Fanotify,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Kernel transport.
    #[arg(long, value_enum, default_value_t = ServeBackend::Cachefiles)]
    pub backend: ServeBackend,
    /// Directory for the cache (created if missing). Must be on a disk filesystem (ext4,
    /// xfs, btrfs): the kernel refuses tmpfs for both backends.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: PathBuf,
    /// Mount each lazy layer of `--image` at DIR/0, DIR/1, … (manifest order) before
    /// printing `ready`; unmounted on SIGTERM.
    #[arg(long, value_name = "DIR", requires = "image")]
    pub mount_dir: Option<PathBuf>,
    /// A blob to serve: NAME is the EROFS fsid (or device tag) the kernel asks for,
    /// PATH a local image file. Repeatable.
    #[arg(long = "blob", value_name = "NAME=PATH", value_parser = parse_blob, required_unless_present = "image")]
    pub blobs: Vec<(String, PathBuf)>,
    /// Serve every lazy layer of this registry image: its metadata image under the
    /// layer's fsid (printed, one line per layer), its data space under the layer's data
    /// tag; every byte verified against the manifest before the kernel sees it.
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Slow every fetch down, e.g. `latency=20ms,rate=8MiB` (per second): models a
    /// remote registry; used by tests and benchmarks.
    #[arg(long, value_name = "SPEC", value_parser = Throttle::parse)]
    pub throttle: Option<Throttle>,
    /// cachefiles tag of this cache (shown in /proc/fs/fscache).
    #[arg(long, default_value = "lazy-erofs")]
    pub tag: String,
    /// Directory for the fd hand-over socket and `fetcher.pid` (the current fetcher's
    /// pid). Created 0700.
    #[arg(long, value_name = "DIR", default_value = "/run/lazy-erofs/serve")]
    pub run_dir: PathBuf,
    /// Seconds between status lines on stderr (0: none).
    #[arg(long, default_value_t = 5)]
    pub status_interval: u64,
    /// Do not write `restore` after a fetcher restart. This breaks failover (readers of
    /// in-flight data hang); it exists to prove in tests that failover needs restore.
    #[arg(long, hide = true)]
    pub no_restore: bool,
}

/// The fsid and data-tag blob entries for every lazy layer of `image`.
fn lazy_layer_blobs(
    registry: &Registry,
    image: &str,
    throttle: Option<Throttle>,
) -> Result<Vec<(String, BlobSpec)>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (repository, layers) = lazy_layers(&runtime, registry, image)?;
    let mut blobs = Vec::new();
    for (index, lazy) in layers.into_iter().enumerate() {
        let spec = |view| layer_spec(image, &lazy, view, throttle);
        let fsid = lazy_erofs_image::manifest::layer_fsid(&lazy.binding(&repository));
        println!(
            "layer {}: fsid={fsid} data-tag={} ({})",
            index + 1,
            lazy.data_tag(),
            lazy.digest
        );
        blobs.push((fsid, spec(View::Metadata)));
        if lazy.data_space_size > 0 {
            blobs.push((lazy.data_tag(), spec(View::Data)));
        }
    }
    Ok(blobs)
}

/// The repository of `image` and its layers from its manifest, each of which must be
/// lazy.
fn lazy_layers(
    runtime: &tokio::runtime::Runtime,
    registry: &Registry,
    image: &str,
) -> Result<(String, Vec<LazyLayer>)> {
    let (manifest, digest) = runtime
        .block_on(registry.pull_manifest(image))
        .with_context(|| format!("pulling the manifest of {image}"))?;
    let repository = lazy_erofs_image::registry::repository_of(image)?;
    let layers = manifest
        .layers()
        .iter()
        .enumerate()
        .map(|(index, descriptor)| {
            LazyLayer::from_descriptor(descriptor)?.with_context(|| {
                format!(
                    "{image}@{digest}: layer {} is not lazy (convert it first)",
                    index + 1
                )
            })
        })
        .collect::<Result<_>>()?;
    Ok((repository, layers))
}

/// How the fetcher is told about one view of a lazy layer of `image`.
fn layer_spec(image: &str, lazy: &LazyLayer, view: View, throttle: Option<Throttle>) -> BlobSpec {
    BlobSpec::Registry(LazyLayerSpec {
        image: image.to_owned(),
        digest: lazy.digest.clone(),
        verified_digest: lazy.verified_digest.clone(),
        region_len: lazy.verified_region_len(),
        size: match view {
            View::Metadata => lazy.metadata_size,
            View::Data => lazy.data_space_size,
        },
        view,
        chunk_size: lazy.chunk_size.into(),
        startup_size: lazy.startup_size,
        throttle,
        kept_region: None,
    })
}

fn parse_blob(text: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}': expected NAME=PATH"))?;
    if name.is_empty() || name.contains(['\n', '\0']) {
        return Err(format!(
            "'{text}': blob name must be non-empty, without newline or NUL"
        ));
    }
    Ok((name.to_owned(), PathBuf::from(path)))
}

/// Runs until SIGTERM or SIGINT. Prints `ready …` on stdout once the first fetcher is
/// serving, status lines on stderr, and a final `stats {json}` line on stdout.
pub fn run(args: &ServeArgs) -> Result<()> {
    for (name, path) in &args.blobs {
        if !path.is_file() {
            bail!("blob {name}: {} is not a readable file", path.display());
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    make_cache_dir(&args.cache_dir)?;
    match args.backend {
        ServeBackend::Fanotify => fanotify::run(args, &stop),
        ServeBackend::Cachefiles => run_cachefiles(args, &stop),
    }
}

/// Creates the cache directory (0700) if missing; an existing one keeps its mode.
fn make_cache_dir(dir: &std::path::Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the cache directory {}", dir.display()))
}

/// Our own executable as the fetcher child, with the registry options.
fn fetcher_command(args: &ServeArgs) -> Result<Vec<std::ffi::OsString>> {
    let exe = crate::own_executable()?;
    let mut command = vec![exe.into(), "fetcher".into()];
    command.extend(args.registry.to_args());
    Ok(command)
}

fn run_cachefiles(args: &ServeArgs, stop: &Arc<AtomicBool>) -> Result<()> {
    // The image's layers are checked before the kernel is touched.
    let lazy_blobs = match &args.image {
        Some(image) => lazy_layer_blobs(&args.registry.registry()?, image, args.throttle)?,
        None => Vec::new(),
    };
    let device = Device::bind(&args.cache_dir, &args.tag)
        .with_context(|| format!("binding an ondemand cache in {}", args.cache_dir.display()))?;
    let mut config = SupervisorConfig::new(args.run_dir.clone(), fetcher_command(args)?);
    config.restore = !args.no_restore;
    let supervisor = Supervisor::new(device, config)?;
    for (name, path) in &args.blobs {
        let blob = LocalBlob {
            path: path.canonicalize()?,
            throttle: args.throttle,
        };
        supervisor
            .blobs()
            .insert(name.clone(), BlobSpec::Local(blob));
    }
    for (name, spec) in &lazy_blobs {
        supervisor.blobs().insert(name.clone(), spec.clone());
    }
    let names: Vec<&str> = args
        .blobs
        .iter()
        .map(|(n, _)| n.as_str())
        .chain(lazy_blobs.iter().map(|(n, _)| n.as_str()))
        .collect();
    let pid_file = supervisor.pid_file();
    // The layers' fsids in manifest order, for --mount-dir.
    let fsids: Vec<&str> = lazy_blobs
        .iter()
        .filter(|(_, spec)| matches!(spec, BlobSpec::Registry(s) if s.view == View::Metadata))
        .map(|(name, _)| name.as_str())
        .collect();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<u32>();
    let mount_failed = std::sync::Mutex::new(None::<String>);
    let mounted = std::sync::Mutex::new(Vec::<PathBuf>::new());

    let status = std::thread::scope(|scope| {
        if let Some(mount_dir) = &args.mount_dir {
            let (fsids, mounted, mount_failed, pid_file) =
                (&fsids, &mounted, &mount_failed, &pid_file);
            let image = args.image.as_deref().unwrap_or_default();
            scope.spawn(move || {
                    // A mount waits for the fetcher's OPEN answer: only once one serves.
                    let Ok(pid) = started_rx.recv() else { return };
                    match mount_fsids(fsids, mount_dir, mounted) {
                        Ok(()) => {
                            println!(
                                "ready: backend cachefiles, {} layers of {image} mounted under {}, fetcher pid {pid} (also in {})",
                                fsids.len(),
                                mount_dir.display(),
                                pid_file.display()
                            );
                            let _ = std::io::stdout().flush();
                        }
                        Err(err) => {
                            *lock(mount_failed) = Some(format!("{err:#}"));
                            stop.store(true, Ordering::SeqCst);
                        }
                    }
                });
        }
        if args.status_interval > 0 {
            let (stop, supervisor) = (&stop, &supervisor);
            scope.spawn(move || {
                status_lines(stop, supervisor, Duration::from_secs(args.status_interval))
            });
        }
        let mut announced = false;
        supervisor.run(stop, |event| {
            log_event(event);
            let Event::Started { pid, .. } = event else {
                return;
            };
            if announced {
                return;
            }
            announced = true;
            if args.mount_dir.is_some() {
                let _ = started_tx.send(*pid);
            } else {
                println!(
                    "ready: cache {} bound (tag {}), fetcher pid {pid} (also in {}), blobs: {}",
                    args.cache_dir.display(),
                    args.tag,
                    pid_file.display(),
                    names.join(", ")
                );
                let _ = std::io::stdout().flush();
            }
        })
    });
    for target in lock(&mounted).iter().rev() {
        if let Err(err) = lazy_erofs_ondemand::fanotify::layer::unmount(target) {
            tracing::warn!(target = %target.display(), %err, "cannot unmount a layer");
        }
    }
    if let Some(err) = lock(&mount_failed).take() {
        bail!("{err}");
    }
    println!("stats {}", serde_json::to_string(&status)?);
    Ok(())
}

/// Mounts each fsid at `mount_dir/<index>` (EROFS over fscache).
fn mount_fsids(
    fsids: &[&str],
    mount_dir: &std::path::Path,
    mounted: &std::sync::Mutex<Vec<PathBuf>>,
) -> Result<()> {
    for (index, fsid) in fsids.iter().enumerate() {
        let target = mount_dir.join(index.to_string());
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        lazy_erofs_ondemand::cachefiles::mount(fsid, &target).with_context(|| {
            format!(
                "mounting layer {index} (fsid {fsid}) at {}",
                target.display()
            )
        })?;
        lock(mounted).push(target);
    }
    Ok(())
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The supervisor's events in the log.
pub fn log_event(event: &Event) {
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

fn status_lines(stop: &AtomicBool, supervisor: &Supervisor, every: Duration) {
    let mut next = std::time::Instant::now() + every;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
        if std::time::Instant::now() < next {
            continue;
        }
        next += every;
        let s = supervisor.stats().summary();
        tracing::info!(
            restores = s.restores,
            opens = s.opens,
            reads = s.reads_served,
            failed = s.reads_failed,
            retries = s.fetch_retries,
            fetched_mib = s.bytes_fetched >> 20,
            p50_ms = s.read_p50_ms.unwrap_or(0.0),
            p99_ms = s.read_p99_ms.unwrap_or(0.0),
            "status"
        );
    }
}

#[derive(Debug, Args)]
pub struct FetcherArgs {
    /// The supervisor's hand-over socket.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Local files or lazy layers in a registry, by the shape of the description.
struct AnySourceFactory {
    local: LocalSourceFactory,
    lazy: LazySourceFactory,
}

#[async_trait::async_trait]
impl SourceFactory for AnySourceFactory {
    async fn open(
        &self,
        name: &str,
        spec: &BlobSpec,
    ) -> std::result::Result<Arc<dyn BlobSource>, SourceError> {
        match spec {
            BlobSpec::Registry(_) => self.lazy.open(name, spec).await,
            BlobSpec::Local(_) => self.local.open(name, spec).await,
        }
    }

    fn provide_credentials(&self, credentials: &RegistryCredentials) {
        self.lazy.provide_credentials(credentials);
    }
}

/// The fetcher child: serves the blobs the supervisor describes.
pub fn fetcher(args: &FetcherArgs) -> Result<()> {
    let loaded = args.registry.load()?;
    let options = loaded.registry;
    let factory = |stats: &Arc<Stats>| -> Arc<dyn SourceFactory> {
        let registry =
            Registry::new(&options).with_observer(Arc::new(StatsObserver(stats.clone())));
        Arc::new(AnySourceFactory {
            local: LocalSourceFactory,
            lazy: LazySourceFactory::new(Arc::new(registry)),
        })
    };
    // One budget: the registry's retries run inside the fetcher's deadline, and the
    // reader gets its bytes or EIO within the configured budget (plus the write).
    let config = FetcherConfig {
        deadline: options.retry.budget,
        readahead: loaded.fetch.readahead,
        readahead_gap: loaded.fetch.readahead_gap,
        readahead_budget: FetcherConfig::budget_for(loaded.fetch.readahead),
        startup_yields: loaded.fetch.startup_yields,
        chunk_size: loaded.fetch.unit,
        ..FetcherConfig::default()
    };
    child::run(&args.socket, factory, config)?;
    Ok(())
}
