//! `lazy-erofs status` and `lazy-erofs gc`: the running daemon's Admin service, asked
//! over its snapshotter socket; a human table by default, the daemon's JSON with
//! `--json`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use lazy_erofs_snapshotter::admin::{AdminClient, GcRequest, StatusReport, StatusRequest};
use lazy_erofs_snapshotter::cache::{CacheLimits, GcReport};
use tonic::transport::Channel;

use crate::config::Config;

/// Which daemon to ask.
#[derive(Debug, Args)]
pub struct DaemonSocket {
    /// The snapshotter's socket; default: snapshotter.address of the configuration.
    #[arg(long)]
    pub address: Option<PathBuf>,
    /// Configuration file; default /etc/lazy-erofs/config.toml when it exists.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the daemon's reply as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub daemon: DaemonSocket,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub daemon: DaemonSocket,
    /// Say what would be freed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Collect down to this many bytes for this pass instead of cache.max_bytes (e.g.
    /// to make room now): least recently used unreferenced layers first.
    #[arg(long)]
    pub max_bytes: Option<u64>,
}

async fn client(args: &DaemonSocket) -> Result<AdminClient<Channel>> {
    let address = match &args.address {
        Some(address) => address.clone(),
        None => Config::load(args.config.as_deref())?.snapshotter.address,
    };
    let channel = containerd_client::connect(&address)
        .await
        .with_context(|| format!("connecting to the snapshotter at {}", address.display()))?;
    Ok(AdminClient::new(channel))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub fn status(args: &StatusArgs, out: &mut impl Write) -> Result<()> {
    let json = status_json(&args.daemon)?;
    if args.daemon.json {
        writeln!(out, "{json}")?;
        return Ok(());
    }
    let report: StatusReport = serde_json::from_str(&json).context("the daemon's status")?;
    write_status(&report, out)
}

/// The daemon's status report as it sent it.
pub fn status_json(daemon: &DaemonSocket) -> Result<String> {
    runtime()?.block_on(async {
        let reply = client(daemon)
            .await?
            .status(StatusRequest {})
            .await
            .context("status")?;
        anyhow::Ok(reply.into_inner().json)
    })
}

pub fn gc(args: &GcArgs, out: &mut impl Write) -> Result<()> {
    let json = runtime()?.block_on(async {
        let reply = client(&args.daemon)
            .await?
            .gc(GcRequest {
                dry_run: args.dry_run,
                max_bytes: args.max_bytes,
            })
            .await
            .context("gc")?;
        anyhow::Ok(reply.into_inner().json)
    })?;
    if args.daemon.json {
        writeln!(out, "{json}")?;
        return Ok(());
    }
    let report: GcReport = serde_json::from_str(&json).context("the daemon's gc report")?;
    write_gc(&report, out)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

fn limits_line(limits: &CacheLimits) -> String {
    let max = match limits.max_bytes {
        0 => "no max_bytes".to_owned(),
        max => format!("max_bytes {}", mib(max)),
    };
    format!(
        "{max}, min_free_percent {}, unreferenced_grace {}, gc_interval {}",
        limits.min_free_percent,
        humantime::format_duration(limits.unreferenced_grace),
        humantime::format_duration(limits.gc_interval)
    )
}

fn write_status(r: &StatusReport, out: &mut impl Write) -> Result<()> {
    writeln!(
        out,
        "daemon    lazy-erofs-snapshotter {} pid {} root {}",
        r.version, r.pid, r.root
    )?;
    writeln!(
        out,
        "backend   {} on kernel {}; kernel handles kept by systemd: {}",
        r.backend.name,
        r.backend.kernel,
        if r.backend.kept_by_systemd {
            "yes"
        } else {
            "no"
        }
    )?;
    match &r.fetcher {
        Some(f) => writeln!(
            out,
            "fetcher   pid {} generation {} restarts {}; reads {} served, {} failed; {} fetched",
            f.pid.map_or("-".to_owned(), |p| p.to_string()),
            f.generation,
            f.restarts,
            f.reads_served,
            f.reads_failed,
            mib(f.bytes_fetched)
        )?,
        None => writeln!(out, "fetcher   none (layers are fetched whole)")?,
    }
    match &r.metrics_address {
        Some(address) => writeln!(out, "metrics   http://{address}/metrics")?,
        None => writeln!(out, "metrics   off")?,
    }
    let c = &r.cache;
    writeln!(
        out,
        "cache     {} in {}; filesystem {:.1} % free; layers {} mounted, {} referenced, {} unreferenced",
        mib(c.bytes),
        c.dir,
        c.filesystem_free_percent,
        c.layers_mounted,
        c.layers_referenced,
        c.layers_unreferenced
    )?;
    writeln!(out, "limits    {}", limits_line(&c.limits))?;
    if !r.layers.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "{:<19} {:<12} {:>8} {:>11} {:>11}  IMAGE",
            "LAYER", "STATE", "FETCHED", "CACHED", "SIZE"
        )?;
        for l in &r.layers {
            writeln!(
                out,
                "{:<19} {:<12} {:>7.1}% {:>11} {:>11}  {}",
                short(&l.digest),
                l.state.as_str(),
                l.fetched_percent,
                mib(l.bytes),
                mib(l.size),
                l.image
            )?;
        }
    }
    let unreferenced: Vec<_> = c
        .entries
        .iter()
        .filter(|e| e.state == lazy_erofs_snapshotter::cache::State::Unreferenced)
        .collect();
    if !unreferenced.is_empty() {
        writeln!(out)?;
        writeln!(out, "{:<72} {:>11}  IDLE", "UNREFERENCED CACHE", "CACHED")?;
        for e in unreferenced {
            writeln!(
                out,
                "{:<72} {:>11}  {}",
                e.key,
                mib(e.bytes),
                humantime::format_duration(std::time::Duration::from_secs(e.idle_secs))
            )?;
        }
    }
    if !r.recent_errors.is_empty() {
        writeln!(out)?;
        writeln!(out, "recent errors")?;
        for e in &r.recent_errors {
            let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.at);
            writeln!(
                out,
                "  {} {:<5} {}",
                humantime::format_rfc3339_seconds(at),
                e.level,
                e.message
            )?;
        }
    }
    Ok(())
}

/// `sha256:` and the first 12 hex digits, as `ctr` shows digests.
fn short(digest: &str) -> &str {
    let end = digest.find(':').map_or(0, |i| i + 1) + 12;
    digest.get(..end).unwrap_or(digest)
}

fn write_gc(r: &GcReport, out: &mut impl Write) -> Result<()> {
    let verb = if r.dry_run { "would free" } else { "freed" };
    writeln!(
        out,
        "gc{}: {verb} {} of {} ({} of {} layers evicted, {} kept); cache now {}",
        if r.dry_run { " --dry-run" } else { "" },
        mib(r.bytes_before.saturating_sub(r.bytes_after)),
        mib(r.bytes_before),
        r.evicted.len(),
        r.layers_before,
        r.skipped.len(),
        mib(r.bytes_after)
    )?;
    writeln!(out, "limits: {}", limits_line(&r.limits))?;
    for e in &r.evicted {
        writeln!(
            out,
            "  evicted {} {} ({}, idle {})",
            e.key,
            mib(e.bytes),
            e.reason.as_str(),
            humantime::format_duration(std::time::Duration::from_secs(e.idle_secs))
        )?;
    }
    for s in &r.skipped {
        writeln!(out, "  kept    {}: {}", s.key, s.why)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_shortened_like_ctr_and_odd_ones_kept() {
        assert_eq!(short("sha256:0123456789abcdef0123"), "sha256:0123456789ab");
        assert_eq!(short("sha256:01"), "sha256:01");
        assert_eq!(short("é"), "é");
    }
}
