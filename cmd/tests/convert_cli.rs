//! `lazy-erofs convert` between OCI image layouts, as a user runs it.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use lazy_erofs_image::blob::BlobReader;
use lazy_erofs_image::manifest::{LAYER_MEDIA_TYPE, LazyLayer, annotation};
use oci_spec::image::{ImageIndex, ImageManifest};

use lazy_erofs_test_support::{make_oci_layout as make_source, sha256_digest as sha};

const REPOSITORY: &str = "registry.test/team/app";

fn convert(src: &Path, dst: &Path) -> Result<(Option<i32>, String, String)> {
    convert_for(src, dst, Some(REPOSITORY))
}

fn convert_for(
    src: &Path,
    dst: &Path,
    repository: Option<&str>,
) -> Result<(Option<i32>, String, String)> {
    convert_with(src, dst, repository, &[])
}

fn convert_with(
    src: &Path,
    dst: &Path,
    repository: Option<&str>,
    args: &[&str],
) -> Result<(Option<i32>, String, String)> {
    let mut command = Command::new(lazy_erofs_test_support::bin_exe!("lazy-erofs"));
    command.arg("convert").arg(src).arg(dst).args(args);
    if let Some(repository) = repository {
        command.args(["--repository", repository]);
    }
    let out = command.output()?;
    Ok((
        out.status.code(),
        String::from_utf8(out.stdout)?,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn converts_every_layer_and_keeps_the_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    let diff_ids = make_source(&src)?;
    let (code, stdout, stderr) = convert(&src, &dst)?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.starts_with(char::is_numeric))
            .count(),
        2,
        "{stdout}"
    );

    let index: ImageIndex = serde_json::from_slice(&fs::read(dst.join("index.json"))?)?;
    let desc = index.manifests().first().context("no manifest")?;
    assert_eq!(
        desc.annotations()
            .as_ref()
            .and_then(|a| a.get("org.opencontainers.image.ref.name"))
            .map(String::as_str),
        Some("test:1")
    );
    let blob = |digest: &str| fs::read(dst.join("blobs/sha256").join(&digest[7..]));
    let manifest_bytes = blob(desc.digest().as_ref())?;
    assert_eq!(sha(&manifest_bytes), desc.digest().to_string());
    let manifest: ImageManifest = serde_json::from_slice(&manifest_bytes)?;
    assert_eq!(
        manifest
            .annotations()
            .as_ref()
            .and_then(|a| a.get(annotation::FORMAT))
            .map(String::as_str),
        Some("1")
    );
    // The config is the source's but for its diff ids, which bind each lazy layer's
    // verified digest to the repository.
    let config_bytes = blob(manifest.config().digest().as_ref())?;
    assert_eq!(manifest.config().digest().to_string(), sha(&config_bytes));
    assert_eq!(manifest.config().size(), config_bytes.len() as u64);
    let mut config: serde_json::Value = serde_json::from_slice(&config_bytes)?;
    let source_config = config_of_layout(&src)?;
    let bound = common::bindings(&manifest, REPOSITORY)?;
    assert_eq!(config["rootfs"]["diff_ids"], serde_json::json!(bound));
    assert_ne!(bound, diff_ids);
    config["rootfs"]["diff_ids"] = source_config["rootfs"]["diff_ids"].clone();
    assert_eq!(config, source_config, "the rest of the config changed");
    let mut tags = Vec::new();
    for (layer, diff_id) in manifest.layers().iter().zip(&diff_ids) {
        assert_eq!(layer.media_type().to_string(), LAYER_MEDIA_TYPE);
        let lazy = LazyLayer::from_descriptor(layer)?.context("not lazy")?;
        assert_eq!(&lazy.source_diff_id, diff_id);
        let bytes = blob(&lazy.digest)?;
        assert_eq!(sha(&bytes), lazy.digest);
        assert_eq!(bytes.len() as u64, lazy.size);
        let reader = BlobReader::open(&bytes[..], &lazy.verified_digest)?;
        assert_eq!(
            &reader.metadata()[1024..1028],
            &0xE0F5_E1E2u32.to_le_bytes(),
            "EROFS superblock"
        );
        assert_eq!(reader.header().data_space_size, lazy.data_space_size);
        // The data device's tag (the fscache cookie the kernel asks for) is in the device
        // table and derivable from the manifest alone.
        let tag = lazy.data_tag();
        if lazy.data_space_size > 0 {
            assert!(
                reader.metadata()[..4096]
                    .windows(tag.len())
                    .any(|w| w == tag.as_bytes()),
                "{tag} not in the device table"
            );
        }
        tags.push(tag);
    }
    tags.dedup();
    assert_eq!(tags.len(), 2, "layers share a data tag: {tags:?}");
    // Converting the converted image copies lazy layers through unchanged, and binds
    // them to the new repository.
    let again = dir.path().join("again");
    let other = "registry.test/other/app";
    let (code, stdout, stderr) = convert_for(&dst, &again, Some(other))?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.matches("already lazy").count(), 2, "{stdout}");
    let rebound = config_of_layout(&again)?;
    let want = common::bindings(&manifest, other)?;
    assert_eq!(rebound["rootfs"]["diff_ids"], serde_json::json!(want));
    Ok(())
}

/// The config of the (only) image in layout `dir`.
fn config_of_layout(dir: &Path) -> Result<serde_json::Value> {
    let blob = |digest: &str| fs::read(dir.join("blobs/sha256").join(&digest[7..]));
    let index: ImageIndex = serde_json::from_slice(&fs::read(dir.join("index.json"))?)?;
    let desc = index.manifests().first().context("no manifest")?;
    let manifest: ImageManifest = serde_json::from_slice(&blob(desc.digest().as_ref())?)?;
    Ok(serde_json::from_slice(&blob(
        manifest.config().digest().as_ref(),
    )?)?)
}

#[test]
fn a_layout_destination_needs_a_repository() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    make_source(&src)?;
    let (code, _, stderr) = convert_for(&src, &dst, None)?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("needs --repository HOST/REPO"), "{stderr}");
    assert!(!dst.join("index.json").exists());
    Ok(())
}

#[test]
fn a_corrupt_layer_blob_fails_with_its_digest_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    make_source(&src)?;
    // Flip a byte in the plain tar layer (the smaller blob that is a tar).
    let manifest_dir = src.join("blobs/sha256");
    let mut flipped = None;
    for entry in fs::read_dir(&manifest_dir)? {
        let path = entry?.path();
        let mut bytes = fs::read(&path)?;
        if bytes.len() > 512 && &bytes[257..262] == b"ustar" && bytes.len() < 10_000 {
            bytes[600] ^= 1;
            fs::write(&path, &bytes)?;
            flipped = path.file_name().map(|n| n.to_string_lossy().into_owned());
        }
    }
    let flipped = flipped.context("no plain tar layer found")?;
    let (code, _, stderr) = convert(&src, &dst)?;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains(&flipped) && stderr.contains("does not match its digest"),
        "{stderr}"
    );
    Ok(())
}

/// Same input, same output: every blob, the manifest and the index are byte-identical
/// across runs and thread counts (annotations are maps: written in key order, never in
/// hash order; chunks are stored in data-space order whichever thread sealed them).
#[test]
fn converting_twice_gives_the_same_manifest_digest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("src");
    make_source(&src)?;
    let mut outputs = Vec::new();
    // 64 KiB chunks: the 3 MB file is 46 of them, sealed on every core, on one thread,
    // on three.
    let threads = [&[][..], &["--threads", "1"], &["--threads", "3"]];
    for (run, threads) in threads.iter().enumerate() {
        let dst = dir.path().join(format!("dst{run}"));
        let args = [&["--chunk-kib", "64"][..], threads].concat();
        let (code, _, stderr) = convert_with(&src, &dst, Some(REPOSITORY), &args)?;
        assert_eq!(code, Some(0), "{stderr}");
        let index = fs::read(dst.join("index.json"))?;
        let mut blobs: Vec<(String, Vec<u8>)> = fs::read_dir(dst.join("blobs/sha256"))?
            .map(|e| -> Result<_> {
                let e = e?;
                Ok((
                    e.file_name().to_string_lossy().into_owned(),
                    fs::read(e.path())?,
                ))
            })
            .collect::<Result<_>>()?;
        blobs.sort();
        outputs.push((index, blobs));
    }
    let first = &outputs[0];
    for (run, other) in outputs.iter().enumerate().skip(1) {
        assert_eq!(
            String::from_utf8_lossy(&other.0),
            String::from_utf8_lossy(&first.0),
            "index.json of run {run} differs"
        );
        let names = |o: &(Vec<u8>, Vec<(String, Vec<u8>)>)| -> Vec<String> {
            o.1.iter().map(|(n, _)| n.clone()).collect()
        };
        assert_eq!(
            names(other),
            names(first),
            "blob digests of run {run} differ"
        );
    }
    Ok(())
}
