//! Shared wiring of the lazy-erofs binaries: logging and the CLI subcommands' bodies.
//! Thin by design: the work lives in the library crates.

pub mod admin;
pub mod check;
pub mod config;
pub mod convert;
pub mod pull;
pub mod recent_errors;
pub mod record;
pub mod registry_args;
pub mod serve;
pub mod snapshotter;

/// Logs go to stderr (coloured only on a terminal, so files and journald get plain
/// `key=value` text); `RUST_LOG` overrides `default_level`.
pub fn init_logging(default_level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // oci-client logs registry token responses at debug level: never let them through.
    let filter = match "oci_client=info".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    use tracing_subscriber::prelude::*;
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(recent_errors::Layer)
        .init();
}

/// The executable to start our own children (fetcher, keeper) from: `/proc/self/exe`
/// where procfs is mounted, so after an upgrade replaced the file on disk they still run
/// the version that starts them (the path would name the new one, or nothing).
pub fn own_executable() -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    let proc_exe = std::path::Path::new("/proc/self/exe");
    if proc_exe.exists() {
        return Ok(proc_exe.to_path_buf());
    }
    std::env::current_exe().context("finding our own executable")
}
