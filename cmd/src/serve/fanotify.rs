//! `lazy-erofs serve --backend fanotify`: every lazy layer of an image as a file-backed
//! EROFS mount under `--mount-dir`, its data file filled on fanotify pre-content events
//! that the broker (this process) hands to the fetcher child.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::Registry;
use lazy_erofs_ondemand::fanotify::{Broker, BrokerConfig, Group, layer};
use lazy_erofs_ondemand::supervisor::Transport;
use lazy_erofs_ondemand::{BlobSpec, Event, Supervisor, SupervisorConfig};
use lazy_erofs_snapshotter::lazy::{LazyRecord, View, fetch_metadata};

use lazy_erofs_ondemand::fanotify::keeper::adopt;

use super::{ServeArgs, fetcher_command, keeper, layer_spec, lazy_layers, log_event, status_lines};

/// How long a planned stop waits for in-flight reads before denying what is left.
const DRAIN: Duration = Duration::from_secs(10);

/// One lazy layer of the image, ready to mount.
struct Prepared {
    meta: PathBuf,
    data: Option<PathBuf>,
    digest: String,
}

pub fn run(args: &ServeArgs, term: &Arc<AtomicBool>) -> Result<()> {
    let Some(image) = &args.image else {
        bail!("--backend fanotify serves registry images: give --image REF");
    };
    let Some(mount_dir) = &args.mount_dir else {
        bail!("--backend fanotify mounts the image's layers: give --mount-dir DIR");
    };
    // The image's layers are checked before the kernel is touched.
    let registry = Arc::new(args.registry.registry()?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let layers = lazy_layers(&runtime, &registry, image)?;
    // A keeper left by a previous run holds the group its mounts still use: adopt it.
    let group = match adopt(&args.cache_dir) {
        Some(group) => {
            tracing::info!("adopted the fanotify group a previous run left");
            group
        }
        None => Group::new()?,
    };
    let keeper = keeper::spawn(&group, &args.cache_dir, std::time::Duration::ZERO)
        .context("starting the group keeper")?;
    let broker = Arc::new(Broker::start(
        group,
        BrokerConfig {
            resend: !args.no_restore,
            ..BrokerConfig::default()
        },
    )?);
    let mut config = SupervisorConfig::new(args.run_dir.clone(), fetcher_command(args)?);
    config.restore = false;
    let supervisor = Supervisor::with_transport(Transport::Fanotify(broker.clone()), config)?;

    let layers = prepare_layers(
        &runtime,
        &registry,
        image,
        layers,
        &broker,
        &supervisor,
        args,
    )?;
    let mut mounted = Vec::new();
    for (index, prepared) in layers.iter().enumerate() {
        let target = mount_dir.join(index.to_string());
        std::fs::create_dir_all(&target)
            .with_context(|| format!("creating {}", target.display()))?;
        // A killed predecessor's mount of this layer: replaced (its open files keep
        // being answered through the adopted group).
        let _ = layer::unmount(&target);
        layer::mount(&prepared.meta, prepared.data.as_deref(), &target)?;
        tracing::info!(layer = %prepared.digest, target = %target.display(), "layer mounted");
        mounted.push(target);
    }

    let stop = AtomicBool::new(false);
    let pid_file = supervisor.pid_file();
    let summary = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !term.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Planned stop: no new opens, in-flight reads finish, then the fetcher goes.
            unmount_all(&mounted);
            let left = broker.drain(DRAIN);
            if left > 0 {
                tracing::warn!(left, "reads still in flight at stop; they fail with EIO");
            }
            stop.store(true, Ordering::SeqCst);
        });
        if args.status_interval > 0 {
            let every = Duration::from_secs(args.status_interval);
            let (stop, supervisor) = (&stop, &supervisor);
            scope.spawn(move || status_lines(stop, supervisor, every));
        }
        let mut announced = false;
        supervisor.run(&stop, |event| {
            log_event(event);
            if let Event::Started { pid, .. } = event
                && !announced
            {
                    announced = true;
                    println!(
                        "ready: backend fanotify, {} layers of {image} mounted under {}, fetcher pid {pid} (also in {})",
                        layers.len(),
                        mount_dir.display(),
                        pid_file.display()
                    );
                    let _ = std::io::stdout().flush();
            }
        })
    });
    let broker = broker.stop();
    keeper.release();
    println!(
        "stats {}",
        serde_json::json!({ "supervisor": summary, "broker": broker })
    );
    Ok(())
}

/// Fetches each layer's verified region once (the metadata image, and the rest kept for
/// the fetcher), creates its sparse data file,
/// registers it with the supervisor (for the fetcher) and the broker (marking it).
fn prepare_layers(
    runtime: &tokio::runtime::Runtime,
    registry: &Arc<Registry>,
    image: &str,
    (repository, layers): (String, Vec<LazyLayer>),
    broker: &Broker,
    supervisor: &Supervisor,
    options: &ServeArgs,
) -> Result<Vec<Prepared>> {
    let cache_dir = options.cache_dir.as_path();
    let mut prepared = Vec::new();
    for (index, lazy) in layers.into_iter().enumerate() {
        let record = LazyRecord::new(image, &repository, &lazy);
        let (dir, registry) = (cache_dir.to_path_buf(), registry.clone());
        // Once, through the verifying reader; the rest of the verified region is kept
        // beside the metadata image, so the fetcher does not fetch it again.
        let (name, kept) = runtime
            .block_on(runtime.spawn_blocking(move || fetch_metadata(&dir, &record, &registry)))?
            .with_context(|| format!("the metadata of layer {} ({})", index + 1, lazy.digest))?;
        let (meta, files) = layer::files(cache_dir, &name);
        let data = if lazy.data_space_size > 0 {
            layer::ensure_data_file(&files, lazy.data_space_size)?;
            let mut data_spec = layer_spec(image, &lazy, View::Data, options.throttle);
            if let BlobSpec::Registry(spec) = &mut data_spec {
                spec.kept_region = Some(kept);
            }
            supervisor.blobs().insert(name.clone(), data_spec);
            broker.add_layer(files.clone())?;
            Some(files.data.clone())
        } else {
            None
        };
        println!("layer {}: {} ({name})", index + 1, lazy.digest);
        prepared.push(Prepared {
            meta,
            data,
            digest: lazy.digest.clone(),
        });
    }
    Ok(prepared)
}

/// Unmounts each layer; one still in use is detached (its readers keep reading, the
/// group stays open for them in the keeper).
fn unmount_all(mounted: &[PathBuf]) {
    for target in mounted.iter().rev() {
        if let Err(err) = layer::unmount(target) {
            tracing::warn!(target = %target.display(), %err, "cannot unmount a layer");
        }
    }
}
