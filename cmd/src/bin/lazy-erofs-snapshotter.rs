//! `lazy-erofs-snapshotter`: the containerd snapshotter daemon.
//!
//! The gRPC Snapshots service is not built yet; until it is, the daemon reports what
//! this kernel allows and refuses to start rather than pretend to serve.

use std::process::ExitCode;

use clap::Parser;
use lazy_erofs_cmd::check::{self, CheckArgs};

#[derive(Debug, Parser)]
#[command(
    name = "lazy-erofs-snapshotter",
    version,
    about = "containerd snapshotter for lazily pulled EROFS layers"
)]
struct Cli {
    #[command(flatten)]
    check: CheckArgs,
}

fn main() -> ExitCode {
    lazy_erofs_cmd::init_logging("info");
    let cli = Cli::parse();
    if let Err(err) = check::run(&cli.check, &mut std::io::stderr().lock()) {
        eprintln!("lazy-erofs-snapshotter: error: {err:#}");
    }
    eprintln!("lazy-erofs-snapshotter: the snapshot service is not available in this build");
    ExitCode::from(2)
}
