//! What the running kernel can do for lazy EROFS (`lazy-erofs check`).
//!
//! [`facts::gather`] reads the system (version, kernel config, device node, a trial
//! bind); [`evaluate`] turns those facts into findings and a verdict. The split keeps the
//! rules unit-testable with fixture facts on any machine.

pub mod facts;

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

pub use facts::gather;

/// A kernel release's numeric part, e.g. `6.12.117` of `6.12.117-amd64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct KernelVersion(pub u32, pub u32, pub u32);

impl KernelVersion {
    /// Parses the leading `major.minor[.patch]` of a release string.
    pub fn parse(release: &str) -> Option<Self> {
        let mut parts = release.split(['.', '-', '+', '_']).map(|p| {
            let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u32>().ok()
        });
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = parts.next().flatten().unwrap_or(0);
        Some(Self(major, minor, patch))
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// Kernel config options: `CONFIG_X` → `y`, `m`, a value, or `n` for "is not set".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelConfig {
    pub source: String,
    pub options: BTreeMap<String, String>,
}

impl KernelConfig {
    pub fn parse(source: &str, text: &str) -> Self {
        let mut options = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ")
                && let Some(name) = rest.strip_suffix(" is not set")
            {
                options.insert(name.to_owned(), "n".to_owned());
            } else if let Some((name, value)) = line.split_once('=')
                && name.starts_with("CONFIG_")
            {
                options.insert(name.to_owned(), value.to_owned());
            }
        }
        Self {
            source: source.to_owned(),
            options,
        }
    }

    /// `y`, `m`, another value, or `n` when unset or absent.
    pub fn get(&self, name: &str) -> &str {
        self.options.get(name).map_or("n", String::as_str)
    }

    fn enabled(&self, name: &str) -> bool {
        matches!(self.get(name), "y" | "m")
    }
}

/// The outcome of binding a scratch cache in ondemand mode and writing `restore`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trial {
    NotRun(String),
    /// `bind ondemand` succeeded; then `restore` was accepted or refused.
    Bound {
        dir: String,
        restore: Result<(), String>,
    },
    /// A command failed; `errno` is the raw error number.
    Failed {
        command: String,
        errno: i32,
        message: String,
    },
}

/// The outcome of marking a scratch file for fanotify pre-content events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MarkTrial {
    NotRun(String),
    /// A pre-content group was created and the file in `dir` marked.
    Marked {
        dir: String,
    },
    /// The group or the mark was refused.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    pub release: String,
    pub config: Option<KernelConfig>,
    /// `/dev/cachefiles` exists.
    pub device_node: bool,
    /// `/proc/misc` lists `cachefiles` (the driver is loaded).
    pub misc_registered: bool,
    /// Filesystem types from `/proc/filesystems`.
    pub filesystems: Vec<String>,
    pub trial: Trial,
    /// The fanotify pre-content trial, in the same scratch directory's filesystem.
    pub mark_trial: MarkTrial,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    Yes,
    No,
    Unknown,
}

impl fmt::Display for Answer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Answer::Yes => "yes",
            Answer::No => "no",
            Answer::Unknown => "unknown",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub answer: Answer,
    pub why: String,
}

fn finding(answer: Answer, why: impl Into<String>) -> Finding {
    Finding {
        answer,
        why: why.into(),
    }
}

/// What the snapshotter will do on this kernel, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Lazy layers through fscache ondemand, fetcher crashes survived with `restore`.
    LazyWithFailover,
    /// Lazy layers as file-backed EROFS filled on fanotify pre-content events, fetcher
    /// crashes survived by the broker's re-send.
    LazyFanotify,
    /// Lazy layers, but a fetcher crash leaves in-flight reads stuck.
    LazyWithoutFailover,
    /// Lazy-format layers fetched whole and mounted as file-backed EROFS.
    WholeLayerFileBacked,
    /// Only ordinary layers, unpacked by containerd onto overlayfs.
    PlainOverlayOnly,
    /// Not even overlayfs: the snapshotter cannot serve containers here.
    Unsupported,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub kernel: String,
    pub config_source: Option<String>,
    pub ondemand: Finding,
    pub restore: Finding,
    pub killable_reads: Finding,
    pub fscache_removed: Finding,
    pub file_backed_erofs: Finding,
    pub pre_content: Finding,
    pub overlayfs: Finding,
    pub mode: Mode,
    pub verdict: String,
}

impl Report {
    /// The findings in display order with their labels.
    pub fn lines(&self) -> [(&'static str, &Finding); 7] {
        [
            ("ondemand mode", &self.ondemand),
            ("restore (failover)", &self.restore),
            ("killable ondemand reads", &self.killable_reads),
            ("EROFS over fscache removed", &self.fscache_removed),
            ("file-backed EROFS", &self.file_backed_erofs),
            ("fanotify pre-content", &self.pre_content),
            ("overlayfs", &self.overlayfs),
        ]
    }

    /// Lazy mode with failover (either backend) is what the project is for; anything
    /// less is a failure of `check`.
    pub fn lazy_with_failover(&self) -> bool {
        matches!(self.mode, Mode::LazyWithFailover | Mode::LazyFanotify)
    }
}

const RESTORE_SINCE: KernelVersion = KernelVersion(6, 8, 0);
const KILLABLE_SINCE: KernelVersion = KernelVersion(6, 10, 0);
const FSCACHE_REMOVED_IN: KernelVersion = KernelVersion(7, 2, 0);
const FILE_BACKED_SINCE: KernelVersion = KernelVersion(6, 12, 0);
const EOPNOTSUPP: i32 = nix::libc::EOPNOTSUPP;
const EBUSY: i32 = nix::libc::EBUSY;

pub fn evaluate(facts: &Facts) -> Report {
    let version = KernelVersion::parse(&facts.release);
    let config = facts.config.as_ref();
    let fscache_removed = fscache_removed(version, config);
    let ondemand = ondemand(facts, config, &fscache_removed);
    let restore = restore(facts, version, &ondemand);
    let killable_reads = by_version(version, KILLABLE_SINCE, "killable ondemand reads");
    let file_backed_erofs = file_backed(version, config, &facts.filesystems);
    let overlayfs = overlayfs(config, &facts.filesystems);
    let pre_content = pre_content(&facts.mark_trial);
    let fanotify_ready =
        pre_content.answer == Answer::Yes && file_backed_erofs.answer == Answer::Yes;

    let (mode, verdict) = match (ondemand.answer, restore.answer) {
        (Answer::Yes, Answer::Yes) => (
            Mode::LazyWithFailover,
            "lazy pulling through EROFS over fscache, with fetcher failover (restore)",
        ),
        _ if fanotify_ready => (
            Mode::LazyFanotify,
            "lazy pulling through fanotify pre-content events on file-backed EROFS, with \
             fetcher failover (the broker re-sends)",
        ),
        (Answer::Yes, _) => (
            Mode::LazyWithoutFailover,
            "lazy pulling, but without restore a fetcher crash leaves reads stuck until killed",
        ),
        _ if file_backed_erofs.answer == Answer::Yes => (
            Mode::WholeLayerFileBacked,
            "no lazy pulling: lazy layers are fetched whole and mounted as file-backed EROFS",
        ),
        _ if overlayfs.answer != Answer::No => (
            Mode::PlainOverlayOnly,
            "no lazy pulling: only ordinary layers, unpacked by containerd onto overlayfs",
        ),
        _ => (Mode::Unsupported, "cannot run containers: no overlayfs"),
    };
    Report {
        kernel: facts.release.clone(),
        config_source: config.map(|c| c.source.clone()),
        ondemand,
        restore,
        killable_reads,
        fscache_removed,
        file_backed_erofs,
        pre_content,
        overlayfs,
        mode,
        verdict: verdict.to_owned(),
    }
}

fn pre_content(trial: &MarkTrial) -> Finding {
    match trial {
        MarkTrial::Marked { dir } => finding(
            Answer::Yes,
            format!("trial pre-content mark on a file in {dir} accepted"),
        ),
        MarkTrial::Failed(why) => finding(Answer::No, why.clone()),
        MarkTrial::NotRun(why) => finding(Answer::Unknown, format!("trial not run: {why}")),
    }
}

fn fscache_removed(version: Option<KernelVersion>, config: Option<&KernelConfig>) -> Finding {
    match version {
        Some(v) if v >= FSCACHE_REMOVED_IN => {
            finding(Answer::Yes, format!("kernel {v} ≥ {FSCACHE_REMOVED_IN}"))
        }
        Some(v) => {
            let still = match config {
                Some(c) if c.enabled("CONFIG_EROFS_FS_ONDEMAND") => ", CONFIG_EROFS_FS_ONDEMAND=y",
                _ => "",
            };
            finding(
                Answer::No,
                format!("kernel {v} < {FSCACHE_REMOVED_IN}{still}"),
            )
        }
        None => finding(Answer::Unknown, "kernel version not recognised"),
    }
}

fn ondemand(facts: &Facts, config: Option<&KernelConfig>, removed: &Finding) -> Finding {
    if removed.answer == Answer::Yes {
        return finding(
            Answer::No,
            format!("EROFS over fscache is gone ({})", removed.why),
        );
    }
    // The kernel config decides the EROFS half; the trial bind proves the cachefiles half.
    let config_says = config.map(|c| {
        let missing: Vec<&str> = ["CONFIG_CACHEFILES_ONDEMAND", "CONFIG_EROFS_FS_ONDEMAND"]
            .into_iter()
            .filter(|name| !c.enabled(name))
            .collect();
        (missing, c.source.as_str())
    });
    if let Some((missing, source)) = &config_says
        && !missing.is_empty()
    {
        return finding(
            Answer::No,
            format!("{} not set ({source})", missing.join(" and ")),
        );
    }
    match &facts.trial {
        Trial::Bound { dir, .. } => {
            let erofs = if config_says.is_some() {
                "; CONFIG_EROFS_FS_ONDEMAND=y"
            } else {
                "; EROFS side unverified (kernel config unreadable)"
            };
            return finding(
                Answer::Yes,
                format!("trial `bind ondemand` succeeded in {dir}{erofs}"),
            );
        }
        Trial::Failed {
            command,
            errno,
            message,
        } if *errno != EBUSY => {
            let hint = if *errno == EOPNOTSUPP && config_says.is_some() {
                " (is the cache directory on tmpfs? it needs a disk filesystem)"
            } else {
                ""
            };
            let answer = if config_says.is_some() {
                Answer::Unknown
            } else {
                Answer::No
            };
            return finding(answer, format!("trial `{command}` failed: {message}{hint}"));
        }
        _ => {}
    }
    let device = if facts.device_node {
        "/dev/cachefiles present"
    } else if facts.misc_registered {
        "cachefiles registered in /proc/misc but /dev/cachefiles missing"
    } else {
        "/dev/cachefiles missing"
    };
    let busy = match &facts.trial {
        Trial::Failed { errno, .. } if *errno == EBUSY => "; device busy (a cache daemon holds it)",
        _ => "",
    };
    match (config_says, facts.device_node) {
        (Some((_, source)), true) => finding(
            Answer::Yes,
            format!(
                "CONFIG_CACHEFILES_ONDEMAND=y, CONFIG_EROFS_FS_ONDEMAND=y ({source}); {device}{busy}"
            ),
        ),
        (Some((_, source)), false) => finding(
            Answer::Unknown,
            format!("enabled in {source}, but {device} (cachefiles module not loaded?)"),
        ),
        (None, false) => finding(
            Answer::No,
            format!("{device} and the kernel config is unreadable (CONFIG_CACHEFILES off?)"),
        ),
        (None, true) => finding(
            Answer::Unknown,
            format!(
                "{device} but the kernel config is unreadable; run as root for a trial bind{busy}"
            ),
        ),
    }
}

fn restore(facts: &Facts, version: Option<KernelVersion>, ondemand: &Finding) -> Finding {
    if ondemand.answer == Answer::No {
        return finding(Answer::No, "needs ondemand mode");
    }
    if let Trial::Bound { restore, .. } = &facts.trial {
        return match restore {
            Ok(()) => finding(Answer::Yes, "trial `restore` accepted by the kernel"),
            Err(message) => finding(Answer::No, format!("trial `restore` refused: {message}")),
        };
    }
    match version {
        Some(v) if v >= RESTORE_SINCE => finding(
            Answer::Yes,
            format!("kernel {v} ≥ {RESTORE_SINCE} (not tried)"),
        ),
        Some(v) => finding(
            Answer::Unknown,
            format!(
                "kernel {v} < {RESTORE_SINCE}: only some stable backports have it; run as root to try"
            ),
        ),
        None => finding(Answer::Unknown, "kernel version not recognised"),
    }
}

fn by_version(version: Option<KernelVersion>, since: KernelVersion, what: &str) -> Finding {
    match version {
        Some(v) if v >= since => finding(Answer::Yes, format!("kernel {v} ≥ {since}")),
        Some(v) => finding(
            Answer::No,
            format!("kernel {v} < {since} (stable backports of {what} may exist)"),
        ),
        None => finding(Answer::Unknown, "kernel version not recognised"),
    }
}

fn file_backed(
    version: Option<KernelVersion>,
    config: Option<&KernelConfig>,
    filesystems: &[String],
) -> Finding {
    if let Some(c) = config {
        return match c.get("CONFIG_EROFS_FS_BACKED_BY_FILE") {
            "y" => finding(
                Answer::Yes,
                format!("CONFIG_EROFS_FS_BACKED_BY_FILE=y ({})", c.source),
            ),
            _ => finding(
                Answer::No,
                format!("CONFIG_EROFS_FS_BACKED_BY_FILE not set ({})", c.source),
            ),
        };
    }
    let erofs = filesystems.iter().any(|f| f == "erofs");
    match version {
        Some(v) if v < FILE_BACKED_SINCE => {
            finding(Answer::No, format!("kernel {v} < {FILE_BACKED_SINCE}"))
        }
        Some(v) if erofs => finding(
            Answer::Unknown,
            format!("kernel {v} ≥ {FILE_BACKED_SINCE} with erofs, but the config is unreadable"),
        ),
        _ => finding(
            Answer::Unknown,
            "kernel config unreadable and erofs not registered",
        ),
    }
}

fn overlayfs(config: Option<&KernelConfig>, filesystems: &[String]) -> Finding {
    if filesystems.iter().any(|f| f == "overlay") {
        return finding(Answer::Yes, "overlay listed in /proc/filesystems");
    }
    match config.map(|c| (c.get("CONFIG_OVERLAY_FS"), &c.source)) {
        Some(("m", source)) => finding(
            Answer::Yes,
            format!("CONFIG_OVERLAY_FS=m ({source}), loads on first mount"),
        ),
        Some((_, source)) => finding(Answer::No, format!("CONFIG_OVERLAY_FS not set ({source})")),
        None => finding(
            Answer::Unknown,
            "not in /proc/filesystems and the kernel config is unreadable",
        ),
    }
}

#[cfg(test)]
mod tests;
