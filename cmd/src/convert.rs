//! `lazy-erofs convert SRC DST`: an OCI image to a lazily pullable one.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use lazy_erofs_image::blob::Compression;
use lazy_erofs_image::convert::{ConvertOptions, LayerReport, convert_layout};
use lazy_erofs_image::registry::Registry;

use crate::registry_args::RegistryArgs;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CompressionArg {
    Zstd,
    None,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source image: an OCI image layout directory (`oci:DIR`, or any existing path or
    /// one starting with `/` or `.`) or a registry reference (`docker://REF` or just
    /// `host/repo:tag`).
    pub src: String,
    /// Destination, written the same way: a layout directory is created; a registry
    /// gets the blobs, then the manifest.
    pub dst: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Platform to take from a multi-platform index (os/arch[/variant]).
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// How each data chunk is compressed.
    #[arg(long, value_enum, default_value = "zstd")]
    pub compression: CompressionArg,
    /// zstd level (1–22).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=22))]
    pub level: i32,
    /// Data chunk size in KiB (a multiple of 4): the unit of fetching and verification.
    #[arg(long, default_value_t = 1024)]
    pub chunk_kib: u32,
    /// File listing paths the image reads as it starts (one absolute path per line,
    /// `#` comments; a directory means everything under it): stored on the manifest,
    /// the snapshotter fetches them right after a lazy pull.
    #[arg(long, value_name = "FILE")]
    pub prefetch: Option<PathBuf>,
    /// Registry and repository (`HOST/REPO`) the image will be pulled from; the config
    /// binds its lazy layers to it. Default: the destination's when it is a registry,
    /// else the source's when that is one; required from layout to layout.
    #[arg(long, value_name = "HOST/REPO")]
    pub repository: Option<String>,
    /// Threads hashing and compressing chunks (0: every core, at most 8); the output is
    /// byte-for-byte the same for any count.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// What a conversion from or to a registry needs.
struct Remote {
    registry: Registry,
    runtime: tokio::runtime::Runtime,
    /// Scratch layouts for pulled and converted images.
    work: tempfile::TempDir,
}

/// Where an image is read from or written to.
#[derive(Debug, PartialEq, Eq)]
pub enum Location {
    Layout(PathBuf),
    Registry(String),
}

impl Location {
    pub fn parse(text: &str) -> Self {
        if let Some(dir) = text.strip_prefix("oci:") {
            return Self::Layout(PathBuf::from(dir));
        }
        if let Some(reference) = text.strip_prefix("docker://") {
            return Self::Registry(reference.to_owned());
        }
        if text.starts_with('/') || text.starts_with('.') || Path::new(text).exists() {
            Self::Layout(PathBuf::from(text))
        } else {
            Self::Registry(text.to_owned())
        }
    }
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    let (src, dst) = (Location::parse(&args.src), Location::parse(&args.dst));
    if let Location::Layout(dir) = &src
        && !dir.is_dir()
    {
        bail!("source {}: not a directory", dir.display());
    }
    if let Location::Layout(dir) = &dst {
        let parent = dir.parent().unwrap_or(Path::new(""));
        if !parent.as_os_str().is_empty() && !parent.is_dir() {
            bail!("destination parent {}: not a directory", parent.display());
        }
    }
    if args.chunk_kib == 0 || !args.chunk_kib.is_multiple_of(4) || args.chunk_kib > 64 * 1024 {
        bail!("--chunk-kib must be a multiple of 4 between 4 and 65536");
    }
    let repository = match (&args.repository, &dst, &src) {
        (Some(given), _, _) => Some(given.as_str()),
        (None, Location::Registry(reference), _) | (None, _, Location::Registry(reference)) => {
            Some(reference.as_str())
        }
        (None, Location::Layout(_), Location::Layout(_)) => None,
    }
    .map(|r| lazy_erofs_image::registry::repository_of(r).context("--repository"))
    .transpose()?;
    if repository.is_none() {
        bail!(
            "a layout destination needs --repository HOST/REPO: the converted config binds \
             each lazy layer to the repository the image is pulled from"
        );
    }
    let options = ConvertOptions {
        repository,
        compression: match args.compression {
            CompressionArg::Zstd => Compression::Zstd { level: args.level },
            CompressionArg::None => Compression::None,
        },
        chunk_size: args.chunk_kib * 1024,
        threads: args.threads,
        prefetch: match &args.prefetch {
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?;
                lazy_erofs_image::manifest::parse_prefetch_list(&text)
                    .with_context(|| file.display().to_string())?
            }
            None => Vec::new(),
        },
        ..ConvertOptions::default()
    };
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "layer {msg:>3} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut wrap =
        |index: usize, size: u64, reader: Box<dyn Read + Send>| -> Box<dyn Read + Send> {
            let bar = bars.add(
                ProgressBar::new(size)
                    .with_style(style.clone())
                    .with_message((index + 1).to_string()),
            );
            Box::new(bar.wrap_read(reader))
        };

    // Layout to layout needs no registry client, configuration or scratch space.
    let remote = match (&src, &dst) {
        (Location::Layout(_), Location::Layout(_)) => None,
        _ => Some(Remote {
            registry: args.registry.registry()?,
            runtime: tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?,
            work: tempfile::tempdir().context("scratch directory for registry images")?,
        }),
    };
    let remote = || remote.as_ref().context("registry client");

    let src_dir = match &src {
        Location::Layout(dir) => dir.clone(),
        Location::Registry(reference) => {
            let remote = remote()?;
            let dir = remote.work.path().join("source");
            let started = std::time::Instant::now();
            let bytes = remote
                .runtime
                .block_on(
                    remote
                        .registry
                        .pull_to_layout(reference, &args.platform, &dir),
                )
                .with_context(|| format!("pulling {reference}"))?;
            eprintln!(
                "pulled {reference}: {} in {:.1} s",
                mib(bytes),
                started.elapsed().as_secs_f64()
            );
            dir
        }
    };
    let dst_dir = match &dst {
        Location::Layout(dir) => dir.clone(),
        Location::Registry(_) => remote()?.work.path().join("converted"),
    };
    let reports = convert_layout(&src_dir, &dst_dir, &args.platform, &options, &mut wrap)?;
    print_summary(&reports);
    if let Location::Registry(reference) = &dst {
        let remote = remote()?;
        let started = std::time::Instant::now();
        let digest = remote
            .runtime
            .block_on(remote.registry.push_layout(&dst_dir, reference))
            .with_context(|| format!("pushing {reference}"))?;
        println!(
            "pushed {reference}@{digest} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

fn print_summary(reports: &[LayerReport]) {
    println!(
        "{:<5} {:<21} {:>11} {:>11} {:>11} {:>8}",
        "layer", "source", "source size", "lazy blob", "metadata", "seconds"
    );
    for (i, r) in reports.iter().enumerate() {
        let short = r.source_digest.get(..19).unwrap_or(&r.source_digest);
        let note = if r.converted { "" } else { " (already lazy)" };
        println!(
            "{:<5} {short:<21} {:>11} {:>11} {:>11} {:>8.2}{note}",
            i + 1,
            mib(r.source_size),
            mib(r.blob_size),
            mib(r.metadata_size),
            r.seconds
        );
    }
    let (src, dst): (u64, u64) = reports
        .iter()
        .fold((0, 0), |(a, b), r| (a + r.source_size, b + r.blob_size));
    println!("{:<5} {:<21} {:>11} {:>11}", "all", "", mib(src), mib(dst));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_told_apart() {
        assert_eq!(Location::parse("oci:img"), Location::Layout("img".into()));
        assert_eq!(Location::parse("./img"), Location::Layout("./img".into()));
        assert_eq!(Location::parse("/tmp"), Location::Layout("/tmp".into()));
        assert_eq!(
            Location::parse("docker://127.0.0.1:5000/a:1"),
            Location::Registry("127.0.0.1:5000/a:1".into())
        );
        assert_eq!(
            Location::parse("127.0.0.1:5000/a:1"),
            Location::Registry("127.0.0.1:5000/a:1".into())
        );
    }
}
