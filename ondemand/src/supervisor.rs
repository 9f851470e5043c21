//! The failover supervisor: holds the kernel side of a [`Transport`] (the bound
//! `/dev/cachefiles` fd, never read; or the fanotify broker), runs one fetcher child at a
//! time, hands it its fd, and replaces it when it dies.
//!
//! Order matters (see the kernel notes): a new child is spawned only after the old one
//! is reaped, so `restore` is never written while a dead fetcher's fds linger; and the
//! supervisor never blocks waiting for a child that may already be dead.

use std::ffi::OsString;
use std::io::BufReader;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::blob_table::BlobTable;
use crate::cachefiles::device::Device;
use crate::fanotify::Broker;
use crate::fanotify::link;
use crate::handover::{self, Backend, Handover, HandoverError, ToChild, ToParent};
use crate::stats::{Counter, Stats, StatsSummary, monotonic_ns, quantile};

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Directory for the hand-over socket and the fetcher pid file (made 0700).
    pub run_dir: PathBuf,
    /// The fetcher command; `--socket PATH` is appended.
    pub fetcher: Vec<OsString>,
    /// Have each replacement child write `restore`. Off only to prove, in tests, that
    /// failover needs it.
    pub restore: bool,
    /// The kernel holds a previous process's requests (the device outlived it): the
    /// first child restores too.
    pub adopted: bool,
    /// Longest wait between restarts of a child that keeps dying young.
    pub max_backoff: Duration,
    /// How long a starting child may take to connect and report ready.
    pub start_timeout: Duration,
}

impl SupervisorConfig {
    pub fn new(run_dir: PathBuf, fetcher: Vec<OsString>) -> Self {
        Self {
            run_dir,
            fetcher,
            restore: true,
            adopted: false,
            max_backoff: Duration::from_secs(2),
            start_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("run directory {path}: {source}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fetcher command is empty")]
    NoFetcher,
    #[error("shared stats: {0}")]
    Stats(std::io::Error),
}

/// What happened, for the caller's logs and status lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Started {
        pid: u32,
        generation: u64,
        restored: bool,
    },
    Exited {
        pid: u32,
        generation: u64,
        status: String,
        lived: Duration,
    },
    StartFailed {
        generation: u64,
        reason: String,
    },
}

/// Totals over the supervisor's life.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub restarts: u64,
    #[serde(flatten)]
    pub fetcher: StatsSummary,
    /// From a dead child's reaping to the first READ completed by its replacement.
    pub failover_gaps: usize,
    pub failover_p50_ms: Option<f64>,
    pub failover_p99_ms: Option<f64>,
    /// Largest peak RSS (VmHWM) seen of any fetcher child, KiB.
    pub fetcher_peak_rss_kib: u64,
}

/// What the fetcher children serve.
pub enum Transport {
    /// Each child gets the bound device fd and writes `restore` after a predecessor.
    Cachefiles(Device),
    /// Each child gets a fresh link to the broker, which re-sends what a dead child held.
    Fanotify(Arc<Broker>),
}

pub struct Supervisor {
    transport: Transport,
    stats: Stats,
    blobs: BlobTable,
    config: SupervisorConfig,
    socket: PathBuf,
    listener: UnixListener,
}

impl Supervisor {
    pub fn new(device: Device, config: SupervisorConfig) -> Result<Self, SupervisorError> {
        Self::with_transport(Transport::Cachefiles(device), config)
    }

    pub fn with_transport(
        transport: Transport,
        config: SupervisorConfig,
    ) -> Result<Self, SupervisorError> {
        if config.fetcher.is_empty() {
            return Err(SupervisorError::NoFetcher);
        }
        let run_dir_err = |source| SupervisorError::RunDir {
            path: config.run_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&config.run_dir).map_err(run_dir_err)?;
        std::fs::set_permissions(&config.run_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(run_dir_err)?;
        let socket = config.run_dir.join("fetcher.sock");
        match std::fs::remove_file(&socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(run_dir_err(e)),
        }
        let listener = UnixListener::bind(&socket).map_err(run_dir_err)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(run_dir_err)?;
        listener.set_nonblocking(true).map_err(run_dir_err)?;
        let stats = Stats::create().map_err(SupervisorError::Stats)?;
        Ok(Self {
            transport,
            stats,
            blobs: BlobTable::default(),
            config,
            socket,
            listener,
        })
    }

    pub fn blobs(&self) -> &BlobTable {
        &self.blobs
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn pid_file(&self) -> PathBuf {
        self.config.run_dir.join("fetcher.pid")
    }

    /// Runs children until `stop` is set; then stops the current child and returns.
    pub fn run(&self, stop: &AtomicBool, mut on_event: impl FnMut(&Event)) -> Summary {
        let mut summary = Summary::default();
        let mut gaps: Vec<Duration> = Vec::new();
        let mut backoff = Duration::ZERO;
        let mut generation = 0;
        while !stop.load(Ordering::SeqCst) {
            generation += 1;
            self.stats.set(Counter::FirstReadDoneNs, 0);
            let died_at = monotonic_ns();
            if generation > 1 {
                self.stats.set(Counter::PredecessorDiedNs, died_at);
            }
            let opens_before = self.stats.get(Counter::Opens);
            match self.run_child(generation, stop, &mut on_event, &mut summary) {
                ChildEnd::Stopped => break,
                ChildEnd::Exited => {}
            }
            let first_read = self.stats.get(Counter::FirstReadDoneNs);
            if generation > 1 && first_read > died_at {
                gaps.push(Duration::from_nanos(first_read - died_at));
            }
            summary.restarts += 1;
            self.stats.add(Counter::Restarts, 1);
            // A child that served something is replaced at once: the kernel is waiting.
            // One that died without serving anything (a crash loop at start-up, or on a
            // request that kills every fetcher) is restarted with growing delays.
            let made_progress = first_read != 0 || self.stats.get(Counter::Opens) > opens_before;
            backoff = if made_progress {
                Duration::ZERO
            } else {
                (backoff * 2).clamp(Duration::from_millis(10), self.config.max_backoff)
            };
            sleep_unless(stop, backoff);
        }
        let _ = std::fs::remove_file(self.pid_file());
        summary.fetcher = self.stats.summary();
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        summary.failover_gaps = gaps.len();
        summary.failover_p50_ms = ms(quantile(&gaps, 0.5));
        summary.failover_p99_ms = ms(quantile(&gaps, 0.99));
        summary
    }

    fn run_child(
        &self,
        generation: u64,
        stop: &AtomicBool,
        on_event: &mut impl FnMut(&Event),
        summary: &mut Summary,
    ) -> ChildEnd {
        let mut command = Command::new(&self.config.fetcher[0]);
        for name in crate::fdstore::SYSTEMD_ENV {
            command.env_remove(name);
        }
        let child = match command
            .args(&self.config.fetcher[1..])
            .arg("--socket")
            .arg(&self.socket)
            .spawn()
        {
            Ok(child) => child,
            Err(err) => {
                on_event(&Event::StartFailed {
                    generation,
                    reason: format!("spawn: {err}"),
                });
                return ChildEnd::Exited;
            }
        };
        let pid = child.id();
        let started = Instant::now();
        let mut watch = ChildWatch::new(child);
        match self.handover(generation, &mut watch, stop) {
            Ok(restored) => {
                // Written once the child serves, so whoever reads it finds a fetcher
                // that has already written restore.
                write_pid_file(&self.pid_file(), pid);
                on_event(&Event::Started {
                    pid,
                    generation,
                    restored,
                });
            }
            Err(reason) => on_event(&Event::StartFailed { generation, reason }),
        }
        loop {
            if let Some(status) = watch.wait(Duration::from_millis(100)) {
                let status = describe_exit(status);
                on_event(&Event::Exited {
                    pid,
                    generation,
                    status,
                    lived: started.elapsed(),
                });
                return ChildEnd::Exited;
            }
            summary.fetcher_peak_rss_kib = summary.fetcher_peak_rss_kib.max(peak_rss_kib(pid));
            if stop.load(Ordering::SeqCst) {
                watch.stop();
                return ChildEnd::Stopped;
            }
        }
    }

    /// Waits for the child to connect (watching for its death), sends the fds, waits
    /// for "ready", then answers its questions on a thread. Returns whether it restored.
    fn handover(
        &self,
        generation: u64,
        watch: &mut ChildWatch,
        stop: &AtomicBool,
    ) -> Result<bool, String> {
        let pid = watch.pid;
        let deadline = Instant::now() + self.config.start_timeout;
        let stream = loop {
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("accept: {e}")),
            }
            if stop.load(Ordering::SeqCst) {
                return Err("stopping".into());
            }
            if Instant::now() > deadline {
                watch.signal(nix::sys::signal::Signal::SIGKILL);
                return Err(format!(
                    "fetcher pid {pid} did not connect within {:?}",
                    self.config.start_timeout
                ));
            }
            // The child may die before it connects; it then never will.
            if watch.wait(Duration::from_millis(2)).is_some() {
                return Err(format!("fetcher pid {pid} died before connecting"));
            }
        };
        let setup = |stream: &UnixStream| -> Result<bool, HandoverError> {
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(self.config.start_timeout))?;
            let restore = self.config.restore && (generation > 1 || self.config.adopted);
            match &self.transport {
                Transport::Cachefiles(device) => handover::send_handover(
                    stream,
                    Handover {
                        protocol: handover::PROTOCOL,
                        generation,
                        restore,
                        backend: Backend::Cachefiles,
                    },
                    device.as_fd(),
                    self.stats.fd(),
                )?,
                Transport::Fanotify(broker) => {
                    let (ours, theirs) = link::pair()?;
                    let handover = Handover {
                        protocol: handover::PROTOCOL,
                        generation,
                        restore: false,
                        backend: Backend::Fanotify,
                    };
                    handover::send_handover(stream, handover, theirs.as_fd(), self.stats.fd())?;
                    // Ours before the child can send anything; it holds only its end.
                    drop(theirs);
                    broker
                        .attach(ours)
                        .map_err(|e| HandoverError::Io(std::io::Error::other(e)))?;
                }
            }
            let mut reader = BufReader::new(stream.try_clone()?);
            let ToParent::Ready { restored, .. } = handover::read_line(&mut reader)? else {
                return Err(HandoverError::Closed);
            };
            stream.set_read_timeout(None)?;
            let (blobs, writer) = (self.blobs.clone(), stream.try_clone()?);
            thread::Builder::new()
                .name(format!("fetcher-{generation}-questions"))
                .spawn(move || answer_questions(reader, writer, &blobs))?;
            Ok(restored)
        };
        setup(&stream).map_err(|e| format!("hand-over to fetcher pid {pid}: {e}"))
    }
}

enum ChildEnd {
    Exited,
    Stopped,
}

/// Answers the child's questions until it goes away (EOF when it dies).
fn answer_questions(mut reader: BufReader<UnixStream>, writer: UnixStream, blobs: &BlobTable) {
    loop {
        let answer = match handover::read_line::<ToParent>(&mut reader) {
            Ok(ToParent::Resolve { cookie, domain }) => match blobs.get(domain.as_deref(), &cookie)
            {
                Some(spec) => ToChild::Blob {
                    credentials: blobs.credentials_for(&spec),
                    spec,
                },
                None => ToChild::Unknown,
            },
            Ok(ToParent::Ready { .. }) => continue,
            Err(HandoverError::Closed) => return,
            Err(err) => {
                tracing::error!(%err, "bad message from the fetcher; dropping its connection");
                return;
            }
        };
        if handover::write_line(&writer, &answer).is_err() {
            return;
        }
    }
}

/// A child being waited for on a thread, so its death is noticed at once.
struct ChildWatch {
    pid: u32,
    rx: mpsc::Receiver<Option<ExitStatus>>,
    status: Option<Option<ExitStatus>>,
}

impl ChildWatch {
    fn new(mut child: Child) -> Self {
        let pid = child.id();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(child.wait().ok());
        });
        Self {
            pid,
            rx,
            status: None,
        }
    }

    /// The exit status if the child has been reaped within `timeout`.
    fn wait(&mut self, timeout: Duration) -> Option<Option<ExitStatus>> {
        if self.status.is_none() {
            match self.rx.recv_timeout(timeout) {
                Ok(status) => self.status = Some(status),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => self.status = Some(None),
            }
        }
        self.status
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        if self.status.is_none() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX));
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }

    /// SIGTERM, then SIGKILL if it lingers; returns once it is reaped.
    fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if self.wait(Duration::from_secs(2)).is_none() {
            self.signal(nix::sys::signal::Signal::SIGKILL);
            while self.wait(Duration::from_secs(1)).is_none() {}
        }
    }
}

fn describe_exit(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) if s.signal().is_some() => {
            let signal = s.signal().unwrap_or(0);
            let name = nix::sys::signal::Signal::try_from(signal).map_or("?", |s| s.as_str());
            format!("killed by signal {signal} ({name})")
        }
        Some(s) => format!("exit code {}", s.code().unwrap_or(-1)),
        None => "status unknown".into(),
    }
}

/// Peak RSS (VmHWM) of a live process, KiB; 0 when unreadable.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

fn write_pid_file(path: &Path, pid: u32) {
    let tmp = path.with_extension("pid.tmp");
    let result =
        std::fs::write(&tmp, format!("{pid}\n")).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(err) = result {
        tracing::warn!(path = %path.display(), %err, "cannot write the fetcher pid file");
    }
}

fn sleep_unless(stop: &AtomicBool, duration: Duration) {
    let end = Instant::now() + duration;
    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
        thread::sleep(Duration::from_millis(5).min(end.saturating_duration_since(Instant::now())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fetcher that dies at once is restarted with growing delays, not in a hot loop,
    /// and each death is reported with its exit status.
    #[test]
    fn crash_looping_fetcher_is_restarted_with_backoff() {
        let dir = tempfile::tempdir().expect("tempdir");
        let devnull = std::fs::File::open("/dev/null").expect("/dev/null");
        let config = SupervisorConfig::new(
            dir.path().join("run"),
            vec!["/bin/sh".into(), "-c".into(), "exit 3".into()],
        );
        let supervisor =
            Supervisor::new(Device::from_fd(devnull.into()), config).expect("supervisor");
        let mode = std::fs::metadata(dir.path().join("run"))
            .expect("run dir")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // Stop after six deaths, however long they take; then look at their spacing.
        let stop = AtomicBool::new(false);
        let mut events = Vec::new();
        let mut deaths: Vec<Instant> = Vec::new();
        let summary = supervisor.run(&stop, |event| {
            if matches!(event, Event::StartFailed { .. }) {
                deaths.push(Instant::now());
                if deaths.len() == 6 {
                    stop.store(true, Ordering::SeqCst);
                }
            }
            events.push(event.clone());
        });
        assert_eq!(summary.restarts, 6, "{events:?}");
        // Backoff 10, 20, 40, 80, 160 ms between the deaths: each wait at least the
        // backoff before it (the child's own start-up only adds to it).
        let gaps: Vec<Duration> = deaths.windows(2).map(|w| w[1] - w[0]).collect();
        for (gap, backoff) in gaps.iter().zip([10u64, 20, 40, 80, 160]) {
            assert!(
                *gap >= Duration::from_millis(backoff),
                "a restart came sooner than its {backoff} ms backoff: {gaps:?}"
            );
        }
        assert!(events.iter().any(|e| matches!(e, Event::StartFailed { reason, .. } if reason.contains("died before connecting"))), "{events:?}");
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Exited { status, .. } if status == "exit code 3")),
            "{events:?}"
        );
        assert!(
            !supervisor.pid_file().exists(),
            "pid file of a fetcher that never served"
        );
    }
}
