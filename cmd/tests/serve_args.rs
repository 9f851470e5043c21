//! `lazy-erofs serve` refuses bad arguments before touching the kernel.

use std::process::Command;

use anyhow::Result;

fn serve(args: &[&str]) -> Result<(Option<i32>, String)> {
    let out = Command::new(lazy_erofs_test_support::bin_exe!("lazy-erofs"))
        .arg("serve")
        .args(args)
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn missing_blob_file_is_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cache = dir.path().to_str().unwrap_or_default();
    let (code, err) = serve(&["--cache-dir", cache, "--blob", "x=/nonexistent/image.erofs"])?;
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("blob x: /nonexistent/image.erofs is not a readable file"),
        "{err}"
    );
    Ok(())
}

#[test]
fn malformed_blob_and_throttle_specs_are_rejected() -> Result<()> {
    let (code, err) = serve(&["--cache-dir", "/tmp", "--blob", "no-equals-sign"])?;
    assert_eq!(code, Some(2));
    assert!(err.contains("expected NAME=PATH"), "{err}");
    let (code, err) = serve(&[
        "--cache-dir",
        "/tmp",
        "--blob",
        "a=/x",
        "--throttle",
        "speed=1",
    ])?;
    assert_eq!(code, Some(2));
    assert!(err.contains("unknown throttle key"), "{err}");
    Ok(())
}

/// An image that was never converted is refused by name, on either backend, before the
/// kernel is touched (no cache bound, no fanotify group made, nothing mounted).
#[test]
fn an_image_not_converted_is_refused_before_the_kernel_is_touched() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let registry = lazy_erofs_test_support::start_docker_registry(dir.path(), None)?;
    let layout = dir.path().join("layout");
    lazy_erofs_test_support::make_oci_layout(&layout)?;
    let image = format!("{}/plain/app:1", registry.host);
    let options = lazy_erofs_image::registry::RegistryOptions::insecure(&registry.host);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(
            lazy_erofs_image::registry::Registry::new(&options).push_layout(&layout, &image),
        )?;
    let cache = dir.path().join("cache");
    let mounts = dir.path().join("mnt");
    for backend in ["cachefiles", "fanotify"] {
        let (code, err) = serve(&[
            "--backend",
            backend,
            "--cache-dir",
            cache.to_str().unwrap_or_default(),
            "--mount-dir",
            mounts.to_str().unwrap_or_default(),
            "--image",
            &image,
            "--insecure",
            &registry.host,
        ])?;
        assert_ne!(code, Some(0), "{backend}: {err}");
        assert!(
            err.contains(&format!("{image}@sha256:"))
                && err.contains("layer 1 is not lazy (convert it first)"),
            "{backend}: {err}"
        );
        for untouched in [&cache, &mounts] {
            assert!(
                !untouched.exists() || std::fs::read_dir(untouched)?.next().is_none(),
                "{backend}: {} was written to",
                untouched.display()
            );
        }
    }
    Ok(())
}
