//! `lazy-erofs convert SRC DST`: an OCI image to a lazily pullable one.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use lazy_erofs_image::blob::Compression;
use lazy_erofs_image::convert::{ConvertOptions, LayerReport, convert_layout};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CompressionArg {
    Zstd,
    None,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source image: an OCI image layout directory.
    pub src: PathBuf,
    /// Destination: an OCI image layout directory (created).
    pub dst: PathBuf,
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
}

pub fn run(args: &ConvertArgs) -> Result<()> {
    for (what, path) in [("source", &args.src), ("destination parent", &args.dst)] {
        let dir = if what == "source" {
            path.clone()
        } else {
            path.parent().map(PathBuf::from).unwrap_or_default()
        };
        if !dir.as_os_str().is_empty() && !dir.is_dir() {
            bail!(
                "{what} {}: not a directory (registry references are not supported yet: \
                 use OCI image layout directories, e.g. from `skopeo copy docker://… oci:DIR`)",
                path.display()
            );
        }
    }
    if args.chunk_kib == 0 || !args.chunk_kib.is_multiple_of(4) || args.chunk_kib > 64 * 1024 {
        bail!("--chunk-kib must be a multiple of 4 between 4 and 65536");
    }
    let options = ConvertOptions {
        compression: match args.compression {
            CompressionArg::Zstd => Compression::Zstd { level: args.level },
            CompressionArg::None => Compression::None,
        },
        chunk_size: args.chunk_kib * 1024,
        ..ConvertOptions::default()
    };
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "layer {msg:>3} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    let mut wrap = |index: usize, size: u64, reader: Box<dyn Read>| -> Box<dyn Read> {
        let bar = bars.add(
            ProgressBar::new(size)
                .with_style(style.clone())
                .with_message((index + 1).to_string()),
        );
        Box::new(bar.wrap_read(reader))
    };
    let reports = convert_layout(&args.src, &args.dst, &args.platform, &options, &mut wrap)?;
    print_summary(&reports);
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
