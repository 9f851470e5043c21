//! A lazy pull's checks that come before containerd is asked: against a real
//! `docker-registry` on loopback, with containerd's socket absent, a plain image is
//! refused naming its first plain layer, and a converted one gets as far as connecting.

use std::path::Path;

use anyhow::Result;
use lazy_erofs_image::convert::{ConvertOptions, convert_layout};
use lazy_erofs_image::registry::{Registry, RegistryOptions};
use lazy_erofs_snapshotter::pull::{PullError, PullOptions, pull};
use lazy_erofs_test_support::{make_oci_layout, start_docker_registry};

fn pull_from(layout: &Path, registry_dir: &Path) -> Result<Result<(), PullError>> {
    let registry_proc = start_docker_registry(registry_dir, None)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let registry = Registry::new(&RegistryOptions::insecure(&registry_proc.host));
    let image = format!("{}/lazy/pull:1", registry_proc.host);
    runtime.block_on(registry.push_layout(layout, &image))?;
    let options = PullOptions {
        image,
        address: registry_dir.join("no-containerd.sock"),
        namespace: "default".into(),
        snapshotter: "lazy-erofs".into(),
        platform: "linux/amd64".into(),
    };
    Ok(runtime.block_on(pull(&options, &registry)).map(|_| ()))
}

#[test]
fn a_plain_image_is_refused_before_containerd_is_asked() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let layout = dir.path().join("plain");
    make_oci_layout(&layout)?;
    let error = pull_from(&layout, dir.path())?.expect_err("a plain image was pulled");
    assert!(
        matches!(error, PullError::NotLazy { index: 1, .. }),
        "{error}"
    );
    let message = error.to_string();
    assert!(
        message.contains("layer 1 (sha256:") && message.contains("ctr image pull"),
        "{message}"
    );
    Ok(())
}

#[test]
fn a_converted_image_is_checked_then_containerd_connected() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    make_oci_layout(&src)?;
    let options = ConvertOptions {
        repository: Some("registry.test/lazy".into()),
        ..ConvertOptions::default()
    };
    convert_layout(&src, &dst, "linux/amd64", &options, &mut |_, _, r| r)?;
    let error = pull_from(&dst, dir.path())?.expect_err("pulled without containerd");
    let message = error.to_string();
    assert!(matches!(error, PullError::Connect { .. }), "{message}");
    assert!(message.contains("no-containerd.sock"), "{message}");
    Ok(())
}
