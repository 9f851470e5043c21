//! `lazy-erofs check`: what this kernel can do for the snapshotter.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use lazy_erofs_ondemand::reach::{self, Report};

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Where to create the scratch cache for the trial `bind ondemand` (as root). Must be
    /// on a disk filesystem: cachefiles refuses tmpfs.
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    pub scratch_dir: PathBuf,
}

/// Prints the report; returns whether lazy mode with failover is possible here.
pub fn run(args: &CheckArgs, out: &mut impl Write) -> Result<bool> {
    let report = reach::evaluate(&reach::gather(&args.scratch_dir));
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &report)?;
        writeln!(out)?;
    } else {
        render(&report, out)?;
    }
    Ok(report.lazy_with_failover())
}

fn render(report: &Report, out: &mut impl Write) -> Result<()> {
    let config = report
        .config_source
        .as_deref()
        .unwrap_or("kernel config unreadable");
    writeln!(out, "kernel {} ({config})", report.kernel)?;
    for (label, finding) in report.lines() {
        writeln!(
            out,
            "{label:<28} {:<8} {}",
            finding.answer.to_string(),
            finding.why
        )?;
    }
    writeln!(out, "{:<28} {}", "verdict", report.verdict)?;
    Ok(())
}
