//! `lazy-erofs check` as a user runs it.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

fn check(args: &[&str]) -> Result<(Option<i32>, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_lazy-erofs"))
        .arg("check")
        .args(args)
        .output()
        .context("run lazy-erofs check")?;
    Ok((out.status.code(), String::from_utf8(out.stdout)?))
}

/// On any machine: the JSON report is complete, and a kernel without /dev/cachefiles is
/// never reported as able to pull lazily (this project's build hosts are such machines).
#[test]
fn check_report_is_complete_and_consistent_with_this_machine() -> Result<()> {
    let (code, json) = check(&["--json"])?;
    let report: serde_json::Value = serde_json::from_str(&json)?;
    for key in [
        "ondemand",
        "restore",
        "killable_reads",
        "fscache_removed",
        "file_backed_erofs",
        "overlayfs",
    ] {
        let answer = report[key]["answer"]
            .as_str()
            .with_context(|| format!("{key} missing"))?;
        assert!(
            ["yes", "no", "unknown"].contains(&answer),
            "{key}: {answer}"
        );
        assert!(
            !report[key]["why"].as_str().unwrap_or_default().is_empty(),
            "{key} without a reason"
        );
    }
    let lazy = report["mode"] == "lazy-with-failover";
    assert_eq!(
        code,
        Some(if lazy { 0 } else { 1 }),
        "exit code must follow the verdict"
    );
    if !Path::new("/dev/cachefiles").exists() {
        assert_ne!(report["ondemand"]["answer"], "yes");
        let (code, text) = check(&[])?;
        assert_eq!(code, Some(1));
        let line = text
            .lines()
            .find(|l| l.starts_with("ondemand mode"))
            .context("no ondemand line")?;
        assert!(!line.contains(" yes "), "{line}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("verdict") && l.contains("no lazy pulling")),
            "{text}"
        );
    }
    Ok(())
}

/// In the test VM (root, ondemand kernel): every capability present, proven by a trial
/// bind and restore, exit 0.
#[test]
fn privileged_vm_check_says_lazy_with_failover() -> Result<()> {
    let scratch = std::env::var("LAZY_EROFS_SCRATCH").context("run in the test VM")?;
    let (code, text) = check(&["--scratch-dir", &scratch])?;
    print!("{text}");
    assert_eq!(code, Some(0), "{text}");
    for label in [
        "ondemand mode",
        "restore (failover)",
        "killable ondemand reads",
        "file-backed EROFS",
        "overlayfs",
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(label))
            .with_context(|| format!("no line {label}"))?;
        assert!(line.contains(" yes "), "{line}");
    }
    assert!(text.contains("trial `bind ondemand` succeeded"), "{text}");
    assert!(text.contains("trial `restore` accepted"), "{text}");
    let removed = text
        .lines()
        .find(|l| l.starts_with("EROFS over fscache removed"))
        .context("no removed line")?;
    assert!(removed.contains(" no "), "{removed}");
    Ok(())
}
