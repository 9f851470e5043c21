//! `lazy-erofs-snapshotter`: the containerd snapshotter daemon (a proxy plugin).

use std::process::ExitCode;

use clap::Parser;
use lazy_erofs_cmd::serve::{self, FetcherArgs};
use lazy_erofs_cmd::snapshotter::{self, DaemonArgs};

#[derive(Debug, Parser)]
#[command(
    name = "lazy-erofs-snapshotter",
    version,
    about = "containerd snapshotter for lazily pulled EROFS layers: serves containerd's \
             Snapshots gRPC service on a Unix socket ([proxy_plugins]); stops on SIGTERM"
)]
struct Cli {
    #[command(flatten)]
    daemon: DaemonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// The fetcher child the daemon runs (not for direct use).
    #[command(hide = true)]
    Fetcher(FetcherArgs),
    /// Holds the fanotify group once the daemon is gone (not for direct use).
    #[command(hide = true, name = "fanotify-keeper")]
    FanotifyKeeper(serve::keeper::KeeperArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Fetcher(args)) = &cli.command {
        lazy_erofs_cmd::init_logging("info");
        return match serve::fetcher(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!("fetcher: {err:#}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(Command::FanotifyKeeper(args)) = &cli.command {
        lazy_erofs_cmd::init_logging("info");
        return match serve::keeper::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!("fanotify keeper: {err:#}");
                ExitCode::from(2)
            }
        };
    }
    let config = match snapshotter::config(&cli.daemon) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("lazy-erofs-snapshotter: error: {err:#}");
            return ExitCode::from(2);
        }
    };
    lazy_erofs_cmd::init_logging(&config.snapshotter.log_level);
    match snapshotter::run(&config, &cli.daemon) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("lazy-erofs-snapshotter: error: {err:#}");
            ExitCode::from(2)
        }
    }
}
