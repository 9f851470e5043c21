//! Isolation between images, through a real containerd (Debian's 1.7) and two real
//! registries on loopback, on this host's kernel (lazy layers fetched whole and mounted
//! file-backed; the names and sources tested here are the same with ondemand mode):
//! - an image whose config claims another image's layer (its diff ids) is refused at
//!   pull, and the victim's image pulled after it shows the victim's bytes;
//! - the same layer published in two repositories gets a snapshot per repository: the
//!   victim's reads come from the victim's registry, never the other one, and a verbatim
//!   copy of a converted image into another repository is refused.

mod common;
#[path = "snapshotter/containerd.rs"]
mod containerd;
#[path = "snapshotter/daemon.rs"]
mod daemon;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};
use common::{diff_ids, manifest_and_config};
use containerd::Containerd;
use daemon::Daemon;
use lazy_erofs_image::registry::{Registry, RegistryOptions};
use lazy_erofs_test_support::DockerRegistry;

const MOTD: &[u8] = b"victim base\n";

fn tool() -> Vec<u8> {
    lazy_erofs_test_support::pseudo_random(3 << 20, 0x7e4a)
}

/// A two-layer image of `files` (one layer each), converted for `image` into a layout
/// under `work/name`; returns the converted layout.
fn converted(work: &Path, name: &str, files: [(&str, &[u8]); 2], image: &str) -> Result<PathBuf> {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir)?;
    let mut tars = Vec::new();
    for (i, (path, bytes)) in files.iter().enumerate() {
        let tar = dir.join(format!("layer{i}.tar"));
        std::fs::write(&tar, lazy_erofs_test_support::layer_tar(&[(path, bytes)])?)?;
        tars.push(tar);
    }
    let src = common::oci_layout(&dir, &tars, &["sh"], image)?;
    let dst = dir.join("dst");
    common::convert(&src, &dst, image)?;
    Ok(dst)
}

fn push(layout: &Path, image: &str) -> Result<()> {
    let host = image.split('/').next().unwrap_or_default();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(Registry::new(&RegistryOptions::insecure(host)).push_layout(layout, image))?;
    Ok(())
}

/// A read-only view of the image whose top layer containerd calls `chain`, mounted at
/// `mnt` (unmounted on drop).
fn view(
    containerd: &Containerd,
    key: &str,
    chain: &str,
    mnt: &Path,
) -> Result<lazy_erofs_test_support::MountGuard> {
    let out = containerd.ctr(&[
        "snapshots",
        "--snapshotter",
        "lazy-erofs",
        "view",
        "--mounts",
        key,
        chain,
    ])?;
    let mounts: serde_json::Value = serde_json::from_str(&out).context(out.clone())?;
    let mount = &mounts[0];
    let options: Vec<String> = serde_json::from_value(mount["Options"].clone())?;
    std::fs::create_dir_all(mnt)?;
    common::run(
        Command::new("mount")
            .arg("-t")
            .arg(mount["Type"].as_str().context("type")?)
            .arg("-o")
            .arg(options.join(","))
            .arg(mount["Source"].as_str().context("source")?)
            .arg(mnt),
    )?;
    Ok(lazy_erofs_test_support::MountGuard(mnt.to_path_buf()))
}

fn top_chain(layout: &Path) -> Result<String> {
    let (_, config) = manifest_and_config(layout)?;
    lazy_erofs_image::manifest::chain_ids(&diff_ids(&config)?)
        .pop()
        .context("no layers")
}

fn layer_digests(layout: &Path) -> Result<Vec<String>> {
    let (manifest, _) = manifest_and_config(layout)?;
    serde_json::from_value::<Vec<serde_json::Value>>(manifest["layers"].clone())?
        .iter()
        .map(|l| l["digest"].as_str().map(str::to_owned).context("digest"))
        .collect()
}

fn sent(registry: &DockerRegistry, digests: &[String]) -> u64 {
    digests.iter().map(|d| registry.blob_bytes_sent(d).0).sum()
}

struct Node {
    _work: tempfile::TempDir,
    work: PathBuf,
    victim: DockerRegistry,
    other: DockerRegistry,
    daemon: Daemon,
    containerd: Containerd,
}

fn node() -> Result<Node> {
    ensure!(
        !Path::new("/dev/cachefiles").exists(),
        "written for a kernel without ondemand mode (file-backed lazy layers)"
    );
    let tmp = tempfile::tempdir_in("/var/tmp")?;
    let work = tmp.path().to_path_buf();
    let registry = |name: &str| -> Result<DockerRegistry> {
        let dir = work.join(name);
        std::fs::create_dir_all(&dir)?;
        lazy_erofs_test_support::start_docker_registry(&dir, None)
    };
    let (victim, other) = (registry("victim-registry")?, registry("other-registry")?);
    let daemon = Daemon::start_with(
        &work.join("snapshotter"),
        &format!(
            "[registry]\ninsecure_hosts = [\"{}\", \"{}\"]\n",
            victim.host, other.host
        ),
    )?;
    let containerd = Containerd::start(&work.join("containerd"), &daemon.socket)?;
    Ok(Node {
        _work: tmp,
        work,
        victim,
        other,
        daemon,
        containerd,
    })
}

impl Node {
    fn victim_image(&self) -> Result<(String, PathBuf)> {
        let image = format!("{}/victim/app:1", self.victim.host);
        let tool = tool();
        let layout = converted(
            &self.work,
            "victim",
            [("etc/motd", MOTD), ("usr/bin/tool", &tool)],
            &image,
        )?;
        push(&layout, &image)?;
        Ok((image, layout))
    }

    /// Checks that the view of `layout`'s image holds the victim's files.
    fn assert_victim_bytes(&self, layout: &Path, key: &str) -> Result<()> {
        let mnt = self.work.join(key);
        let _mounted = view(&self.containerd, key, &top_chain(layout)?, &mnt)?;
        let motd = std::fs::read(mnt.join("etc/motd"))?;
        ensure!(
            motd == MOTD,
            "the victim's /etc/motd reads {:?}",
            String::from_utf8_lossy(&motd)
        );
        ensure!(
            std::fs::read(mnt.join("usr/bin/tool"))? == tool(),
            "the victim's /usr/bin/tool differs"
        );
        Ok(())
    }
}

#[test]
fn privileged_host_containerd_refuses_an_image_claiming_another_images_layers() -> Result<()> {
    let node = node()?;
    let (victim, victim_layout) = node.victim_image()?;
    let (_, victim_config) = manifest_and_config(&victim_layout)?;

    // The hostile image: its own files, the victim's diff ids, its own registry.
    let hostile = format!("{}/evil/app:1", node.other.host);
    let hostile_layout = converted(
        &node.work,
        "hostile",
        [("etc/motd", b"EVIL\n"), ("usr/bin/tool", b"evil tool\n")],
        &hostile,
    )?;
    // What a hostile publisher does: claims the victim's diff ids (public: anyone can
    // read a config), so containerd names its layers' snapshots after the victim's.
    let claimed = diff_ids(&victim_config)?;
    common::edit_image(&hostile_layout, |_, config| {
        config["rootfs"]["diff_ids"] = serde_json::json!(claimed);
    })?;
    push(&hostile_layout, &hostile)?;

    let hostile_pull = node.containerd.lazy_pull(&hostile);
    node.containerd.lazy_pull(&victim)?;
    // What the victim's user sees first; then why.
    node.assert_victim_bytes(&victim_layout, "victim-view")?;
    let err = hostile_pull.expect_err("the hostile image was pulled");
    let text = format!("{err:#}");
    let claimed = diff_ids(&victim_config)?.remove(0);
    ensure!(
        text.contains("containerd names its snapshot") && text.contains(&claimed),
        "the refusal does not say why: {text}\n{}",
        node.daemon.log()
    );
    println!(
        "hostile pull refused: {}",
        text.lines().last().unwrap_or("")
    );
    Ok(())
}

#[test]
fn privileged_host_containerd_reads_a_shared_layer_from_each_images_own_repository() -> Result<()> {
    let node = node()?;
    let (victim, victim_layout) = node.victim_image()?;
    let digests = layer_digests(&victim_layout)?;

    // A verbatim copy of the converted image in another repository: bound to the
    // victim's repository, so refused (checked last, after what the victim sees).
    let verbatim = format!("{}/copy/verbatim:1", node.other.host);
    push(&victim_layout, &verbatim)?;
    let verbatim_pull = node.containerd.lazy_pull(&verbatim);

    // The same files converted for another registry's repository: the same layer
    // blobs, pulled first.
    let copy = format!("{}/copy/app:1", node.other.host);
    let tool = tool();
    let copy_layout = converted(
        &node.work,
        "copy",
        [("etc/motd", MOTD), ("usr/bin/tool", &tool)],
        &copy,
    )?;
    ensure!(
        layer_digests(&copy_layout)? == digests,
        "not the same layers"
    );
    push(&copy_layout, &copy)?;
    node.containerd.lazy_pull(&copy)?;
    let other_before = sent(&node.other, &digests);
    ensure!(other_before > 0, "the copy was not read from its registry");

    let victim_before = sent(&node.victim, &digests);
    node.containerd.lazy_pull(&victim)?;
    node.assert_victim_bytes(&victim_layout, "victim-view")?;
    let victim_sent = sent(&node.victim, &digests) - victim_before;
    let other_sent = sent(&node.other, &digests) - other_before;
    println!(
        "victim pull and read: victim registry sent {victim_sent} B, the other registry {other_sent} B"
    );
    ensure!(
        victim_sent > 0,
        "the victim's layers were not read from the victim's registry"
    );
    ensure!(
        other_sent == 0,
        "the other registry served {other_sent} B of the victim's reads"
    );
    let err = verbatim_pull.expect_err("a copy bound to another repository was pulled");
    ensure!(
        format!("{err:#}").contains("converted for another repository"),
        "{err:#}"
    );
    Ok(())
}
