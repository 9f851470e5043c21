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
