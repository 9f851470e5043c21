//! Shared wiring of the lazy-erofs binaries: logging and the CLI subcommands' bodies.
//! Thin by design: the work lives in the library crates.

pub mod check;
pub mod convert;
pub mod serve;

/// Logs go to stderr; `RUST_LOG` overrides `default_level`.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
