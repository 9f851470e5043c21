//! Prefetch lists in the test VM: an image converted with `lazy-erofs convert
//! --prefetch FILE` is pulled lazily into a real containerd. The listed files are laid
//! out first in their layer, the fetcher fetches that region as the layer is opened and
//! the snapshotter reads the listed paths as soon as the top layer is mounted; a
//! container reading them later gets the right bytes without a single registry request.
//! `lazy-erofs record-startup` then names what the containers read.

mod common;
#[path = "snapshotter/containerd.rs"]
mod containerd;
#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use containerd::Containerd;
use daemon::Daemon;
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::{Registry, RegistryOptions};
use sha2::{Digest, Sha256};

#[test]
fn privileged_vm_lazy_prefetch_listed_paths_are_cached_before_the_container_reads_them()
-> Result<()> {
    let scratch = common::scratch()?;
    let work = scratch.path();
    let registry_dir = work.join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    let image = format!("{}/lazy/prefetch:1", registry.host);

    let debian = lazy_erofs_test_support::debian_layers()?;
    let tars = [debian.join("base.tar"), debian.join("packages.tar")];
    let src = common::oci_layout(work, &tars, &["sh"], &image)?;
    let dst = work.join("dst");
    let list = work.join("prefetch.txt");
    std::fs::write(
        &list,
        "# what the container below reads\n/usr/share/zoneinfo\n/usr/bin/bash\n/usr/share/no-such-thing\n",
    )?;
    common::run(
        Command::new(lazy_erofs_test_support::bin_exe!("lazy-erofs"))
            .arg("convert")
            .arg(&src)
            .arg(&dst)
            .arg("--prefetch")
            .arg(&list)
            .args(["--repository", &image]),
    )?;
    let client = Registry::new(&RegistryOptions::insecure(&registry.host));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(client.push_layout(&dst, &image))?;
    let (manifest, _) = runtime.block_on(client.pull_manifest(&image))?;
    let layers: Vec<LazyLayer> = manifest
        .layers()
        .iter()
        .map(|d| LazyLayer::from_descriptor(d)?.context("layer not lazy"))
        .collect::<Result<_>>()?;
    ensure!(
        layers[0].startup_size > 0 && layers[1].startup_size == 0,
        "start-up sizes {:?}: bash and zoneinfo are in the base layer only",
        layers.iter().map(|l| l.startup_size).collect::<Vec<_>>()
    );
    let sent = || -> u64 {
        layers
            .iter()
            .map(|l| registry.blob_bytes_sent(&l.digest).0)
            .sum()
    };

    let config = format!("[registry]\ninsecure_hosts = [\"{}\"]\n", registry.host);
    let daemon = Daemon::start_with(&work.join("snapshotter"), &config)?;
    let containerd = Containerd::start(&work.join("containerd"), &daemon.socket)?;
    containerd.lazy_pull(&image)?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let report = loop {
        if let Some(line) = daemon.log().lines().find(|l| l.contains("prefetch done")) {
            break line.to_owned();
        }
        ensure!(
            Instant::now() < deadline,
            "no prefetch after 180 s\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let after_prefetch = sent();
    println!("after the pull: {after_prefetch} bytes fetched; {report}");
    ensure!(
        report.contains("missing=1") && report.contains("failed=0"),
        "{report}"
    );
    let log = daemon.log();
    let region = log
        .lines()
        .find(|l| l.contains("start-up region fetched"))
        .with_context(|| format!("the fetcher never fetched the start-up region\n{log}"))?;
    ensure!(region.contains("failed=0"), "{region}");
    println!("{region}");

    let ctr_run = |id: &str, script: &str| -> Result<String> {
        containerd
            .ctr(&[
                "run",
                "--rm",
                "--snapshotter",
                "lazy-erofs",
                &image,
                id,
                "sh",
                "-c",
                script,
            ])
            .with_context(|| daemon.log())
    };
    // Control: reading files not listed does reach the registry (and brings in sh,
    // find and cat for the next container).
    ctr_run(
        "unlisted",
        "find /usr/share/info -type f -exec cat {} + | wc -c",
    )?;
    let after_control = sent();
    ensure!(
        after_control > after_prefetch,
        "reading unlisted files fetched nothing: the measure is blind"
    );
    let output = ctr_run(
        "listed",
        "sha256sum /usr/bin/bash; find /usr/share/zoneinfo -type f -exec cat {} + | wc -c",
    )?;
    let extra = sent() - after_control;
    println!("reading the listed paths in a container: {extra} more bytes fetched\n{output}");
    let bash = Command::new("tar")
        .arg("-xOf")
        .arg(&tars[0])
        .arg("./usr/bin/bash")
        .output()?
        .stdout;
    ensure!(bash.len() > 100_000, "no /usr/bin/bash in base.tar");
    let bash = lazy_erofs_image::blob::hex(&Sha256::digest(&bash));
    ensure!(output.starts_with(&bash), "bash hashes wrong: {output}");
    ensure!(
        extra == 0,
        "{extra} bytes fetched for paths the prefetch had read"
    );

    // What was read: the listed files, the unlisted ones the control container read,
    // not a file nobody opened.
    let recorded = Command::new(lazy_erofs_test_support::bin_exe!("lazy-erofs"))
        .args(["record-startup", "--image", &image, "--address"])
        .arg(&daemon.socket)
        .output()?;
    let (list, summary) = (
        String::from_utf8_lossy(&recorded.stdout),
        String::from_utf8_lossy(&recorded.stderr),
    );
    ensure!(recorded.status.success(), "record-startup: {summary}");
    println!("{}", summary.trim());
    let listed: Vec<&str> = list.lines().collect();
    ensure!(
        listed.contains(&"/usr/bin/bash")
            && listed.iter().any(|p| p.starts_with("/usr/share/info/"))
            && listed.iter().any(|p| p.starts_with("/usr/share/zoneinfo/")),
        "record-startup missed what was read: {} paths\n{list}",
        listed.len()
    );
    ensure!(
        !listed.contains(&"/usr/bin/perl"),
        "record-startup lists /usr/bin/perl, which nothing read"
    );
    Ok(())
}
