//! `lazy-erofs`: the command-line tool.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lazy_erofs_cmd::admin::{self, GcArgs, StatusArgs};
use lazy_erofs_cmd::check::{self, CheckArgs};
use lazy_erofs_cmd::convert::{self, ConvertArgs};
use lazy_erofs_cmd::pull::{self, PullArgs};
use lazy_erofs_cmd::record::{self, RecordArgs};
use lazy_erofs_cmd::serve::{self, FetcherArgs, ServeArgs};

#[derive(Debug, Parser)]
#[command(
    name = "lazy-erofs",
    version,
    about = "Lazily pulled EROFS container images"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report what this kernel supports (ondemand mode, failover, file-backed EROFS,
    /// overlayfs) and what the snapshotter can do here. Exits 0 only when lazy pulling
    /// with failover is possible.
    Check(CheckArgs),
    /// Convert an OCI image (layout directory) into a lazily pullable one: every tar
    /// layer becomes a lazy EROFS layer; config and everything else are kept.
    Convert(ConvertArgs),
    /// Make a converted image runnable by containerd without downloading its layers:
    /// manifest and config into containerd's content store, every layer mounted lazily
    /// by the lazy-erofs snapshotter. Then `ctr run --snapshotter lazy-erofs IMAGE …`.
    Pull(PullArgs),
    /// Write the files an image read as it started (a container of it ran once on
    /// freshly mounted lazy layers) as a prefetch list: `lazy-erofs convert --prefetch
    /// LIST` then lays them out first, and the fetcher fetches them as the layer mounts.
    #[command(name = "record-startup")]
    RecordStartup(RecordArgs),
    /// Serve EROFS images lazily with fetcher failover: through /dev/cachefiles (so
    /// `mount -t erofs none -o fsid=NAME MNT` works), or with `--backend fanotify` as
    /// file-backed mounts under `--mount-dir`. Root only; stops on SIGTERM.
    Serve(ServeArgs),
    /// Ask the running snapshotter how it is: backend and kernel, fetcher pid and
    /// generation, mounted layers with how much of each is fetched, cache usage against
    /// its limits, recent errors.
    Status(StatusArgs),
    /// Collect the running snapshotter's layer cache now (as it does every
    /// cache.gc_interval) and print what it freed, or with --dry-run what it would.
    Gc(GcArgs),
    /// The fetcher child process (started by `serve` and the snapshotter).
    #[command(hide = true)]
    Fetcher(FetcherArgs),
    /// Holds the fanotify group once its broker is gone (started by the broker).
    #[command(hide = true, name = "fanotify-keeper")]
    FanotifyKeeper(serve::keeper::KeeperArgs),
}

fn main() -> ExitCode {
    lazy_erofs_cmd::init_logging("info");
    match run(Cli::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(err) => {
            eprintln!("lazy-erofs: error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Check(args) => check::run(&args, &mut std::io::stdout().lock()),
        Command::Convert(args) => convert::run(&args).map(|()| true),
        Command::Pull(args) => pull::run(&args).map(|_| true),
        Command::RecordStartup(args) => record::run(&args).map(|()| true),
        Command::Serve(args) => serve::run(&args).map(|()| true),
        Command::Status(args) => admin::status(&args, &mut std::io::stdout().lock()).map(|()| true),
        Command::Gc(args) => admin::gc(&args, &mut std::io::stdout().lock()).map(|()| true),
        Command::Fetcher(args) => serve::fetcher(&args).map(|()| true),
        Command::FanotifyKeeper(args) => serve::keeper::run(&args).map(|()| true),
    }
}
