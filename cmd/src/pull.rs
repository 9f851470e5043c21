//! `lazy-erofs pull IMAGE`: makes a converted image runnable by containerd without
//! downloading its layers (`lazy_erofs_snapshotter::pull` does the work).

use anyhow::Result;
use clap::Args;
use lazy_erofs_snapshotter::pull::{PullOptions, Pulled, pull};

use crate::registry_args::RegistryArgs;

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Image reference, e.g. `registry.example.com/app:1` (converted with
    /// `lazy-erofs convert`).
    pub image: String,
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub address: std::path::PathBuf,
    /// containerd namespace (`ctr -n`; Kubernetes uses `k8s.io`).
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// The snapshotter's name in containerd's `[proxy_plugins]`.
    #[arg(long, default_value = "lazy-erofs")]
    pub snapshotter: String,
    /// Platform to pull (`os/arch[/variant]`).
    #[arg(long, default_value = default_platform())]
    pub platform: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

const fn default_platform() -> &'static str {
    if cfg!(target_arch = "aarch64") {
        "linux/arm64"
    } else {
        "linux/amd64"
    }
}

pub fn run(args: &PullArgs) -> Result<Pulled> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let registry = args.registry.registry()?;
    let options = PullOptions {
        image: args.image.clone(),
        address: args.address.clone(),
        namespace: args.namespace.clone(),
        snapshotter: args.snapshotter.clone(),
        platform: args.platform.clone(),
    };
    let pulled = runtime.block_on(pull(&options, &registry))?;
    // Scripts read "(registry N ms, total N ms)".
    println!(
        "pulled {}: {} layers lazily ({} already present), manifest {} (registry {:.0} ms, total {:.0} ms)",
        args.image,
        pulled.layers,
        pulled.layers_present,
        pulled.manifest_digest,
        pulled.registry_time.as_secs_f64() * 1000.0,
        pulled.total_time.as_secs_f64() * 1000.0,
    );
    Ok(pulled)
}
