//! `lazy-erofs record-startup`: the files an image read as it started, as a prefetch
//! list for `lazy-erofs convert --prefetch` (which lays them out first). Run it after a
//! container of the lazily pulled image has started once on freshly mounted layers.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use lazy_erofs_snapshotter::admin::StatusReport;
use lazy_erofs_snapshotter::lazy::record::startup_set;

use crate::admin::{DaemonSocket, status_json};

#[derive(Debug, Args)]
pub struct RecordArgs {
    #[command(flatten)]
    pub daemon: DaemonSocket,
    /// The image as pulled (`registry/repository[:tag|@digest]`): the running
    /// snapshotter's mounted layers of that repository are walked.
    #[arg(long, required_unless_present = "dir")]
    pub image: Option<String>,
    /// Walk this directory (a mounted layer) instead of asking the snapshotter;
    /// repeatable.
    #[arg(long, conflicts_with = "image")]
    pub dir: Vec<PathBuf>,
    /// Write the list to this file instead of stdout.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// `registry/repository` of a reference: without its digest or tag.
fn repository(reference: &str) -> &str {
    let name = reference
        .split_once('@')
        .map_or(reference, |(name, _)| name);
    match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => name,
    }
}

/// The mount points of `image`'s lazy layers the daemon has mounted.
fn layer_mounts(daemon: &DaemonSocket, image: &str) -> Result<Vec<PathBuf>> {
    let report: StatusReport =
        serde_json::from_str(&status_json(daemon)?).context("the daemon's status")?;
    let wanted = repository(image);
    let mut mounts: Vec<PathBuf> = report
        .layers
        .iter()
        .filter(|layer| repository(&layer.image) == wanted)
        .filter_map(|layer| layer.mount.as_ref().map(PathBuf::from))
        .collect();
    mounts.sort();
    mounts.dedup();
    if mounts.is_empty() {
        bail!(
            "the snapshotter has no mounted lazy layer of {wanted} (pull it lazily and run a \
             container of it first)"
        );
    }
    Ok(mounts)
}

pub fn run(args: &RecordArgs) -> Result<()> {
    let roots = match &args.image {
        Some(image) => layer_mounts(&args.daemon, image)?,
        None => args.dir.clone(),
    };
    let set = startup_set(&roots)?;
    if set.paths.is_empty() {
        bail!(
            "no file of {} layer(s) has been read (run the container first, on layers \
             mounted since the last page-cache drop)",
            roots.len()
        );
    }
    let mut list = String::new();
    for path in &set.paths {
        list.push_str(path);
        list.push('\n');
    }
    match &args.output {
        Some(path) => {
            std::fs::write(path, &list).with_context(|| format!("writing {}", path.display()))?
        }
        None => std::io::stdout().lock().write_all(list.as_bytes())?,
    }
    // One line a script can read: what the run read, to compare with what was fetched.
    eprintln!(
        "recorded layers={} files={} read_bytes={} file_bytes={} walked={} failed={}",
        roots.len(),
        set.paths.len(),
        set.bytes,
        set.file_bytes,
        set.files_walked,
        set.failed
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::repository;

    #[test]
    fn repositories_lose_tags_and_digests_but_not_ports() {
        assert_eq!(
            repository("127.0.0.1:5000/python:3"),
            "127.0.0.1:5000/python"
        );
        assert_eq!(
            repository("127.0.0.1:5000/python@sha256:ab"),
            "127.0.0.1:5000/python"
        );
        assert_eq!(repository("127.0.0.1:5000/python"), "127.0.0.1:5000/python");
        assert_eq!(repository("r.io/a/b:1@sha256:ab"), "r.io/a/b");
    }
}
