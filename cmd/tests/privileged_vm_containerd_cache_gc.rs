//! Operating a node with containerd on the cachefiles backend (the 6.12 test VM): three
//! images of one repository (a shared busybox base layer and a top layer each) pulled
//! lazily and run; two removed with `ctr image rm` and containerd's GC; `lazy-erofs gc`
//! then culls exactly the two top layers only they used, least recently used first, and
//! neither the shared base nor the layer a third container is reading, whose hash comes
//! out right; an evicted image pulled again reads right. The fanotify backend's run of
//! the same is `privileged_host_fanotify_cache_gc`.

#[path = "snapshotter/admin.rs"]
mod admin;
mod common;
#[path = "snapshotter/containerd.rs"]
mod containerd;
#[path = "snapshotter/daemon.rs"]
mod daemon;
#[path = "lazy_pull/reader.rs"]
mod reader;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use admin::{cli_json, entry, evicted_keys, layer, sample, scrape};
use anyhow::{Context, Result, ensure};
use containerd::Containerd;
use daemon::Daemon;
use lazy_erofs_image::manifest::LazyLayer;
use lazy_erofs_image::registry::{Registry, RegistryOptions};
use lazy_erofs_test_support::DockerRegistry;
use sha2::{Digest, Sha256};

/// The removed images' files; the one read throughout is bigger so that it is still
/// being fetched while the other two are removed and collected.
const SMALL_MIB: usize = 24;
const BIG_MIB: usize = 192;

struct Image {
    reference: String,
    /// `/data/<file>` in its top layer.
    file: &'static str,
    hash: String,
    base: LazyLayer,
    top: LazyLayer,
}

#[test]
fn privileged_vm_containerd_cache_gc_frees_removed_images_and_never_a_mounted_layer() -> Result<()>
{
    let scratch = common::scratch()?;
    let work = scratch.path();
    let registry_dir = work.join("registry");
    std::fs::create_dir_all(&registry_dir)?;
    let registry = lazy_erofs_test_support::start_docker_registry(&registry_dir, None)?;
    let base = busybox_layer(work)?;
    let a = push(work, &registry, &base, "a", SMALL_MIB, 0x9c1)?;
    let b = push(work, &registry, &base, "b", SMALL_MIB, 0x9c2)?;
    let c = push(work, &registry, &base, "c", BIG_MIB, 0x9c3)?;
    // No free-space floor: this test is about grace and max_bytes, not the disk it runs on.
    let config = format!(
        "[registry]\ninsecure_hosts = [\"{}\"]\n\
         [cache]\nunreferenced_grace = \"1h\"\ngc_interval = \"0s\"\nmin_free_percent = 0\n\
         [metrics]\naddress = \"127.0.0.1:0\"\n",
        registry.host
    );
    let daemon = Daemon::start_with(&work.join("snapshotter"), &config)?;
    let containerd = Containerd::start(&work.join("containerd"), &daemon.socket)?;
    let logs = || format!("{}\n{}", containerd.log(), daemon.log());
    ensure!(daemon.log().contains("backend cachefiles"), "{}", logs());
    let hash_of = |out: &str| out.split_whitespace().next().unwrap_or("").to_owned();

    // A and B pulled and hashed whole, one after the other.
    for image in [&a, &b] {
        containerd.lazy_pull(&image.reference).with_context(logs)?;
        let out = containerd
            .ctr(&[
                "run",
                "--rm",
                "--snapshotter",
                "lazy-erofs",
                &image.reference,
                &format!("hash-{}", image.file),
                "sha256sum",
                &format!("/data/{}", image.file),
            ])
            .with_context(logs)?;
        ensure!(hash_of(&out) == image.hash, "{}: {out}", image.file);
    }
    // C's container starts hashing its file: it is still fetching through what follows.
    containerd.lazy_pull(&c.reference).with_context(logs)?;
    let hasher = reader::spawn(
        &containerd,
        &c.reference,
        "hash-c",
        &["sha256sum", "/data/c"],
    )?;
    let c_sent = || registry.blob_bytes_sent(&c.top.digest).0;
    common::wait_until("C's reader to start", Duration::from_secs(60), || {
        c_sent() > 8 << 20
    })?;

    let status = cli_json(&daemon.socket, &["status"])?;
    let key = |layer_digest: &str| -> Result<String> {
        Ok(layer(&status, layer_digest)?["cache_key"]
            .as_str()
            .context("cache_key")?
            .to_owned())
    };
    let (key_a, key_b, key_c) = (
        key(&a.top.digest)?,
        key(&b.top.digest)?,
        key(&c.top.digest)?,
    );
    ensure!(a.base.digest == c.base.digest, "the base layers differ");
    let base_key = key(&a.base.digest)?;
    ensure!(entry(&status, &key_c)?["state"] == "mounted", "{status:#}");
    ensure!(
        entry(&status, &base_key)?["state"] == "mounted",
        "{status:#}"
    );
    let metrics = status["metrics_address"]
        .as_str()
        .context("no metrics address")?
        .to_owned();

    // containerd forgets A, then B (a second later: last uses are kept in seconds).
    let gc_started = Instant::now();
    for (image, key) in [(&a, &key_a), (&b, &key_b)] {
        containerd.ctr(&["image", "rm", "--sync", &image.reference])?;
        common::wait_until(
            "containerd's GC to remove the image's snapshots",
            Duration::from_secs(30),
            || entry_state(&daemon, key).as_deref() == Some("unreferenced"),
        )?;
        std::thread::sleep(Duration::from_millis(1100));
    }
    // Counted now: a mounted layer's cachefiles objects are the kernel's unlinked
    // tmpfiles until the layer is unmounted, when they are linked into the volume.
    let before = cli_json(&daemon.socket, &["status"])?;
    let cache_before = before["cache"]["bytes"].as_u64().context("cache bytes")?;
    let bytes_of = |key: &str| -> Result<u64> {
        entry(&before, key)?["bytes"]
            .as_u64()
            .context("entry bytes")
    };
    let (bytes_a, bytes_b) = (bytes_of(&key_a)?, bytes_of(&key_b)?);
    let listing = || {
        common::run(Command::new("find").arg(daemon.root.join("cache")).args([
            "-type",
            "f",
            "-printf",
            "%p %s %b\n",
        ]))
        .unwrap_or_default()
    };
    ensure!(
        bytes_a >= (SMALL_MIB as u64) << 20 && bytes_b >= (SMALL_MIB as u64) << 20,
        "A's cache: {bytes_a} bytes, B's {bytes_b}; {before:#}\n{}",
        listing()
    );
    for (key, state) in [
        (&key_a, "unreferenced"),
        (&key_b, "unreferenced"),
        (&key_c, "mounted"),
        (&base_key, "mounted"),
    ] {
        ensure!(entry(&before, key)?["state"] == state, "{key}: {before:#}");
    }

    // The configured limits (grace 1 h) free nothing; a limit of one byte frees A, then
    // B, and nothing a snapshot still uses; the dry run says so first.
    let configured = cli_json(&daemon.socket, &["gc"])?;
    ensure!(evicted_keys(&configured).is_empty(), "{configured:#}");
    let dry = cli_json(&daemon.socket, &["gc", "--dry-run", "--max-bytes", "1"])?;
    ensure!(
        evicted_keys(&dry) == [key_a.clone(), key_b.clone()],
        "{dry:#}"
    );
    let gc = cli_json(&daemon.socket, &["gc", "--max-bytes", "1"])?;
    println!("gc with max_bytes 1: {gc:#}");
    ensure!(
        evicted_keys(&gc) == [key_a.clone(), key_b.clone()],
        "{gc:#}"
    );
    let gc_time = gc_started.elapsed();
    let after = cli_json(&daemon.socket, &["status"])?;
    let cache_after = after["cache"]["bytes"].as_u64().context("cache bytes")?;
    println!(
        "cache: {cache_before} bytes before, {cache_after} after; A {bytes_a}, B {bytes_b}; \
         image rm + containerd GC + lazy-erofs gc took {:.2} s",
        gc_time.as_secs_f64()
    );
    ensure!(
        cache_after == cache_before - bytes_a - bytes_b,
        "the cache shrank by {} bytes, A and B held {}",
        cache_before - cache_after,
        bytes_a + bytes_b
    );
    for key in [&key_a, &key_b] {
        ensure!(entry(&after, key).is_err(), "{key} still cached: {after:#}");
    }
    let scraped = scrape(&metrics)?;
    ensure!(
        sample(
            &scraped,
            "lazyerofs_cache_evictions_total",
            Some(("reason", "over_max_bytes"))
        ) == 2.0
    );
    ensure!(
        sample(&scraped, "lazyerofs_cache_evicted_bytes_total", None) == (bytes_a + bytes_b) as f64
    );

    // C's reader was still fetching through all of it, and hashes right.
    let c_sent_at_gc = c_sent();
    let (out, took) = reader::wait_bounded(hasher, Duration::from_secs(300), logs)?;
    ensure!(out.status.success(), "C's reader: {out:?}");
    let out = String::from_utf8_lossy(&out.stdout);
    ensure!(hash_of(&out) == c.hash, "C: {out}");
    println!(
        "C's reader: right hash after {:.1} s; {c_sent_at_gc} of its {} bytes fetched when the GC ended",
        took.as_secs_f64(),
        c.top.size
    );
    ensure!(
        c_sent_at_gc < c.top.size,
        "C's file was fetched whole before the GC ended: the test proves nothing; make it bigger"
    );

    // A evicted comes back: pulled again, its layer fetched again, right bytes.
    let sent = registry.blob_bytes_sent(&a.top.digest).0;
    containerd.lazy_pull(&a.reference).with_context(logs)?;
    let out = containerd.ctr(&[
        "run",
        "--rm",
        "--snapshotter",
        "lazy-erofs",
        &a.reference,
        "hash-a-again",
        "sha256sum",
        "/data/a",
    ])?;
    ensure!(hash_of(&out) == a.hash, "A again: {out}");
    ensure!(
        registry.blob_bytes_sent(&a.top.digest).0 > sent,
        "A was not fetched again"
    );
    Ok(())
}

/// The cache entry `key`'s state now.
fn entry_state(daemon: &Daemon, key: &str) -> Option<String> {
    let status = cli_json(&daemon.socket, &["status"]).ok()?;
    Some(entry(&status, key).ok()?["state"].as_str()?.to_owned())
}

/// `registry/lazy/gc:<file>`: the base layer and a top layer holding `/data/<file>` of
/// `mib` pseudo-random MiB, converted and pushed.
fn push(
    work: &Path,
    registry: &DockerRegistry,
    base: &Path,
    file: &'static str,
    mib: usize,
    seed: u64,
) -> Result<Image> {
    let reference = format!("{}/lazy/gc:{file}", registry.host);
    let dir = work.join(format!("top-{file}"));
    std::fs::create_dir_all(dir.join("data"))?;
    let bytes = lazy_erofs_test_support::pseudo_random(mib << 20, seed);
    std::fs::write(dir.join("data").join(file), &bytes)?;
    let hash = lazy_erofs_image::blob::hex(&Sha256::digest(&bytes));
    drop(bytes);
    let top = tar(&dir, &work.join(format!("top-{file}.tar")), "./data")?;
    let src = common::oci_layout(
        work,
        &[base.to_path_buf(), top.clone()],
        &["sh"],
        &reference,
    )?;
    let dst = work.join("dst");
    common::convert(&src, &dst, &reference)?;
    std::fs::remove_dir_all(&src)?;
    std::fs::remove_file(&top)?;
    let client = Registry::new(&RegistryOptions::insecure(&registry.host));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(client.push_layout(&dst, &reference))?;
    std::fs::remove_dir_all(&dst)?;
    let (manifest, _) = runtime.block_on(client.pull_manifest(&reference))?;
    let mut layers = manifest
        .layers()
        .iter()
        .map(|d| LazyLayer::from_descriptor(d)?.context("layer not lazy"));
    let (base, top) = (
        layers.next().context("no base layer")??,
        layers.next().context("no top layer")??,
    );
    Ok(Image {
        reference,
        file,
        hash,
        base,
        top,
    })
}

/// A base layer of the host's static busybox, with `sh` and `sha256sum` linked to it.
fn busybox_layer(work: &Path) -> Result<PathBuf> {
    let dir = work.join("busybox");
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))?;
    for applet in ["sh", "sha256sum", "cat"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))?;
    }
    tar(&dir, &work.join("busybox.tar"), "./bin")
}

/// `dir/what` archived as `tar` (numeric owners); `dir` removed.
fn tar(dir: &Path, tar: &Path, what: &str) -> Result<PathBuf> {
    common::tar_of(dir, what, tar)?;
    std::fs::remove_dir_all(dir)?;
    Ok(tar.to_path_buf())
}
