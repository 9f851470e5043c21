//! `lazy-erofs convert` between OCI image layouts, as a user runs it.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use lazy_erofs_image::blob::BlobReader;
use lazy_erofs_image::manifest::{LAYER_MEDIA_TYPE, LazyLayer, annotation};
use oci_spec::image::{ImageIndex, ImageManifest};
use serde_json::json;
use sha2::{Digest, Sha256};

fn sha(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

fn put_blob(layout: &Path, bytes: &[u8]) -> Result<String> {
    let digest = sha(bytes);
    fs::write(layout.join("blobs/sha256").join(&digest[7..]), bytes)?;
    Ok(digest)
}

fn layer_tar(files: &[(&str, &[u8])]) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        builder.append_data(&mut h, name, *data)?;
    }
    Ok(builder.into_inner()?)
}

/// An OCI layout with a gzip layer and a plain one; returns the diff ids.
fn make_source(root: &Path) -> Result<Vec<String>> {
    fs::create_dir_all(root.join("blobs/sha256"))?;
    fs::write(root.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let tar1 = layer_tar(&[("etc/hostname", b"lazy\n"), ("usr/bin/big", &big)])?;
    let tar2 = layer_tar(&[("etc/motd", b"hello\n")])?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar1)?;
    let gz1 = gz.finish()?;
    let (l1, l2) = (put_blob(root, &gz1)?, put_blob(root, &tar2)?);
    let diff_ids = vec![sha(&tar1), sha(&tar2)];
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "config": {"Cmd": ["/bin/sh"]}
    }))?;
    let config_digest = put_blob(root, &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l1, "size": gz1.len()},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l2, "size": tar2.len()}
        ]
    }))?;
    let manifest_digest = put_blob(root, &manifest)?;
    fs::write(
        root.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest.len(),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {"org.opencontainers.image.ref.name": "test:1"}
            }]
        }))?,
    )?;
    Ok(diff_ids)
}

fn convert(src: &Path, dst: &Path) -> Result<(Option<i32>, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_lazy-erofs"))
        .arg("convert")
        .arg(src)
        .arg(dst)
        .output()?;
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
    // The config is the source's, byte for byte.
    assert_eq!(
        manifest.config().digest().to_string(),
        sha(&blob(manifest.config().digest().as_ref())?)
    );
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
    }
    // Converting the converted image copies lazy layers through unchanged.
    let again = dir.path().join("again");
    let (code, stdout, stderr) = convert(&dst, &again)?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.matches("already lazy").count(), 2, "{stdout}");
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

#[test]
fn registry_references_get_a_clear_error() -> Result<()> {
    let (code, _, stderr) = convert(
        Path::new("docker.io/library/debian:12"),
        Path::new("/tmp/out"),
    )?;
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("registry references are not supported yet"),
        "{stderr}"
    );
    Ok(())
}
