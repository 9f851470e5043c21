//! `lazy-erofs check` as a user runs it.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

fn check(args: &[&str]) -> Result<(Option<i32>, String)> {
    let out = Command::new(lazy_erofs_test_support::bin_exe!("lazy-erofs"))
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
        "pre_content",
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
    let lazy = report["mode"] == "lazy-with-failover" || report["mode"] == "lazy-fanotify";
    assert_eq!(
        code,
        Some(if lazy { 0 } else { 1 }),
        "exit code must follow the verdict"
    );
    if !Path::new("/dev/cachefiles").exists() {
        assert_ne!(report["ondemand"]["answer"], "yes");
        let (code, text) = check(&[])?;
        let line = text
            .lines()
            .find(|l| l.starts_with("ondemand mode"))
            .context("no ondemand line")?;
        assert!(!line.contains(" yes "), "{line}");
        // Without ondemand mode, lazy pulling needs the fanotify backend.
        let verdict = if report["pre_content"]["answer"] == "yes" {
            "fanotify pre-content"
        } else {
            "no lazy pulling"
        };
        assert!(
            text.lines()
                .any(|l| l.starts_with("verdict") && l.contains(verdict)),
            "{text}"
        );
        assert_eq!(code, Some(if verdict == "no lazy pulling" { 1 } else { 0 }));
    }
    Ok(())
}

/// This host as root (6.18, no ondemand): the pre-content mark is tried on a file in the
/// scratch directory — accepted on ext4, so the verdict is the fanotify backend and the
/// exit 0; refused on tmpfs, with the reason, and the verdict falls back to whole layers.
#[test]
fn privileged_host_check_tries_a_pre_content_mark() -> Result<()> {
    let (code, text) = check(&["--scratch-dir", "/var/tmp"])?;
    print!("{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("fanotify pre-content"))
        .context("no pre-content line")?;
    assert!(
        line.contains(" yes ") && line.contains("/var/tmp"),
        "{line}"
    );
    assert!(
        text.contains("verdict") && text.contains("fanotify"),
        "{text}"
    );
    assert_eq!(code, Some(0), "{text}");

    let (code, text) = check(&["--scratch-dir", "/dev/shm"])?;
    print!("{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("fanotify pre-content"))
        .context("no pre-content line")?;
    assert!(
        line.contains(" no ") && line.contains("refuses fanotify pre-content marks"),
        "{line}"
    );
    assert_eq!(code, Some(1), "{text}");
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

/// In the 7.x test VM (root, no fscache): EROFS over fscache is reported removed, the
/// pre-content mark is accepted on the scratch disk, and the verdict is the fanotify
/// backend, exit 0.
#[test]
fn privileged_vm7_check_says_lazy_through_fanotify() -> Result<()> {
    let scratch = std::env::var("LAZY_EROFS_SCRATCH").context("run in the test VM")?;
    let (code, text) = check(&["--scratch-dir", &scratch])?;
    print!("{text}");
    let line = |label: &str| -> Result<String> {
        text.lines()
            .find(|l| l.starts_with(label))
            .map(str::to_owned)
            .with_context(|| format!("no line {label}"))
    };
    assert!(
        line("EROFS over fscache removed")?.contains(" yes "),
        "{text}"
    );
    assert!(line("ondemand mode")?.contains(" no "), "{text}");
    assert!(line("fanotify pre-content")?.contains(" yes "), "{text}");
    assert!(line("verdict")?.contains("fanotify pre-content"), "{text}");
    assert_eq!(code, Some(0), "{text}");
    Ok(())
}
