use super::*;

const VM_CONFIG: &str = "\
CONFIG_CACHEFILES=y
CONFIG_CACHEFILES_ONDEMAND=y
CONFIG_EROFS_FS=y
CONFIG_EROFS_FS_ONDEMAND=y
CONFIG_EROFS_FS_BACKED_BY_FILE=y
CONFIG_OVERLAY_FS=y
";

const HOST_CONFIG: &str = "\
CONFIG_OVERLAY_FS=y
CONFIG_EROFS_FS=y
CONFIG_EROFS_FS_BACKED_BY_FILE=y
# CONFIG_EROFS_FS_ONDEMAND is not set
";

fn facts(release: &str, config: Option<&str>, device: bool, trial: Trial) -> Facts {
    Facts {
        release: release.to_owned(),
        config: config.map(|text| KernelConfig::parse("/proc/config.gz", text)),
        device_node: device,
        misc_registered: device,
        filesystems: vec!["ext4".into(), "overlay".into(), "erofs".into()],
        trial,
        mark_trial: MarkTrial::NotRun("not root".into()),
    }
}

fn bound() -> Trial {
    Trial::Bound {
        dir: "/scratch/x".into(),
        restore: Ok(()),
    }
}

#[test]
fn version_parsing() {
    assert_eq!(
        KernelVersion::parse("6.12.117"),
        Some(KernelVersion(6, 12, 117))
    );
    assert_eq!(
        KernelVersion::parse("6.18.44-fc-v669"),
        Some(KernelVersion(6, 18, 44))
    );
    assert_eq!(
        KernelVersion::parse("6.1.0-28-amd64"),
        Some(KernelVersion(6, 1, 0))
    );
    assert_eq!(
        KernelVersion::parse("7.2-rc1"),
        Some(KernelVersion(7, 2, 0))
    );
    assert_eq!(KernelVersion::parse("garbage"), None);
}

#[test]
fn config_parsing_reads_unset_options_as_n() {
    let c = KernelConfig::parse("x", HOST_CONFIG);
    assert_eq!(c.get("CONFIG_EROFS_FS_ONDEMAND"), "n");
    assert_eq!(c.get("CONFIG_OVERLAY_FS"), "y");
    assert_eq!(c.get("CONFIG_NOT_THERE"), "n");
}

#[test]
fn test_vm_kernel_gets_lazy_with_failover() {
    let mut vm = facts("6.12.117", Some(VM_CONFIG), true, bound());
    // 6.12 has no pre-content events (6.14+): the mark is refused.
    vm.mark_trial = MarkTrial::Failed("EINVAL".into());
    let report = evaluate(&vm);
    assert_eq!(report.mode, Mode::LazyWithFailover);
    assert!(report.lazy_with_failover());
    for (label, f) in report.lines() {
        let expected = if label.contains("removed") || label.contains("pre-content") {
            Answer::No
        } else {
            Answer::Yes
        };
        assert_eq!(f.answer, expected, "{label}: {}", f.why);
    }
    assert!(report.restore.why.contains("trial"));
}

#[test]
fn host_without_ondemand_says_no_and_why() {
    let report = evaluate(&facts(
        "6.18.44-fc-v669",
        Some(HOST_CONFIG),
        false,
        Trial::NotRun("/dev/cachefiles missing".into()),
    ));
    assert_eq!(report.ondemand.answer, Answer::No);
    assert!(
        report.ondemand.why.contains("CONFIG_CACHEFILES_ONDEMAND"),
        "{}",
        report.ondemand.why
    );
    assert_eq!(report.restore.answer, Answer::No);
    assert_eq!(report.file_backed_erofs.answer, Answer::Yes);
    assert_eq!(report.mode, Mode::WholeLayerFileBacked);
    assert!(!report.lazy_with_failover());
}

/// This host as root: no ondemand mode, but the pre-content mark is accepted, so the
/// fanotify backend serves lazily; a refused mark (tmpfs, old kernel) falls back whole.
#[test]
fn host_with_pre_content_marks_pulls_lazily_through_fanotify() {
    let mut host = facts(
        "6.18.44-fc-v669",
        Some(HOST_CONFIG),
        false,
        Trial::NotRun("/dev/cachefiles missing".into()),
    );
    host.mark_trial = MarkTrial::Marked {
        dir: "/var/tmp".into(),
    };
    let report = evaluate(&host);
    assert_eq!(report.pre_content.answer, Answer::Yes);
    assert_eq!(report.mode, Mode::LazyFanotify);
    assert!(report.lazy_with_failover());
    assert!(report.verdict.contains("fanotify"), "{}", report.verdict);

    host.mark_trial = MarkTrial::Failed("the filesystem refuses pre-content marks".into());
    let report = evaluate(&host);
    assert_eq!(report.pre_content.answer, Answer::No);
    assert_eq!(report.mode, Mode::WholeLayerFileBacked);
}

#[test]
fn kernel_7_2_has_no_fscache_mode() {
    let report = evaluate(&facts("7.2.0", Some(VM_CONFIG), true, bound()));
    assert_eq!(report.fscache_removed.answer, Answer::Yes);
    assert_eq!(report.ondemand.answer, Answer::No);
    assert_eq!(report.mode, Mode::WholeLayerFileBacked);
}

#[test]
fn old_kernel_without_trial_is_unknown_restore_and_refused_restore_is_no() {
    let untried = evaluate(&facts(
        "6.1.0",
        Some(VM_CONFIG),
        true,
        Trial::NotRun("not root".into()),
    ));
    assert_eq!(untried.ondemand.answer, Answer::Yes);
    assert_eq!(untried.restore.answer, Answer::Unknown);
    assert_eq!(untried.killable_reads.answer, Answer::No);
    assert_eq!(untried.mode, Mode::LazyWithoutFailover);

    let refused = Trial::Bound {
        dir: "/x".into(),
        restore: Err("Operation not supported".into()),
    };
    let report = evaluate(&facts("6.1.0", Some(VM_CONFIG), true, refused));
    assert_eq!(report.restore.answer, Answer::No);
    assert!(report.restore.why.contains("Operation not supported"));
}

#[test]
fn trial_on_tmpfs_is_unknown_with_a_hint() {
    let trial = Trial::Failed {
        command: "bind ondemand".into(),
        errno: EOPNOTSUPP,
        message: "Operation not supported".into(),
    };
    let report = evaluate(&facts("6.12.117", Some(VM_CONFIG), true, trial));
    assert_eq!(report.ondemand.answer, Answer::Unknown);
    assert!(report.ondemand.why.contains("tmpfs"));
}

#[test]
fn busy_device_falls_back_to_the_config() {
    let trial = Trial::Failed {
        command: "open".into(),
        errno: EBUSY,
        message: "Device or resource busy".into(),
    };
    let report = evaluate(&facts("6.12.117", Some(VM_CONFIG), true, trial));
    assert_eq!(report.ondemand.answer, Answer::Yes);
    assert!(report.ondemand.why.contains("busy"));
    assert_eq!(report.restore.answer, Answer::Yes);
}

#[test]
fn no_config_no_device_is_no() {
    let report = evaluate(&facts(
        "6.12.0",
        None,
        false,
        Trial::NotRun("not root".into()),
    ));
    assert_eq!(report.ondemand.answer, Answer::No);
    assert_eq!(report.file_backed_erofs.answer, Answer::Unknown);
    assert_eq!(report.mode, Mode::PlainOverlayOnly);
}

#[test]
fn report_serialises_answers_in_lowercase() {
    let report = evaluate(&facts("6.12.117", Some(VM_CONFIG), true, bound()));
    let json = serde_json::to_value(&report).expect("serialise");
    assert_eq!(json["ondemand"]["answer"], "yes");
    assert_eq!(json["mode"], "lazy-with-failover");
}
