//! The broker: owns the fanotify group in the long-lived process, reads every event,
//! answers at once what is present, hands the rest to the current fetcher child over
//! its [`link`](super::link), and answers when the child is done.
//!
//! The promise is cachefiles' `restore`, kept in user space: an event handed to a child
//! that dies stays pending and is sent again to the next child, so the reader pauses and
//! never fails. An event is let through only if every page it reads is in the
//! present-page record; anything else is denied with EIO, never allowed onto zeros.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::group::{Group, GroupError};
use state::State;

mod state;

/// One lazy layer's files on local disk.
#[derive(Debug, Clone)]
pub struct LayerFiles {
    /// The name the layer's data view is registered under in the supervisor's blob
    /// table: the fetcher resolves it like a cachefiles cookie.
    pub name: String,
    /// The sparse data file the mount reads through.
    pub data: PathBuf,
    /// Its present-page record.
    pub present: PathBuf,
}

#[derive(Debug, Clone, Copy)]
pub struct BrokerConfig {
    /// Send unanswered events again to a new child. Off only to prove, in tests, that
    /// failover needs it (readers then hang).
    pub resend: bool,
    /// How often present-page records of changed layers are synced to disk.
    pub save_every: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            resend: true,
            save_every: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("broker thread: {0}")]
    Thread(std::io::Error),
    #[error("the broker has stopped")]
    Stopped,
}

/// Counts over the broker's life, for the caller's stats line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BrokerSummary {
    pub events: u64,
    /// Answered at once: every page already present.
    pub answered_present: u64,
    /// Answered after a child fetched the range.
    pub answered_fetched: u64,
    /// Denied with EIO (fetch failed, layer unknown, or stopped with the range missing).
    pub denied: u64,
    /// Events sent again to a new child after the one holding them died.
    pub resent: u64,
    pub children: u64,
}

enum Control {
    /// Replies with the layer's object id and whether it is complete already.
    Add(LayerFiles, mpsc::Sender<Result<(u32, bool), BrokerError>>),
    Attach(OwnedFd),
    /// Drops the layer whose data file has this inode (its cache is being removed):
    /// later events on it are held like any unowned file's, never allowed.
    Forget((u64, u64), mpsc::Sender<bool>),
    /// Replies once no event is pending or at the deadline, with how many still are.
    Drain(Instant, mpsc::Sender<usize>),
    /// Stop reading events: they stay queued in the group for whoever serves it next.
    Quiesce,
    Stop,
}

/// Handle to the broker thread.
pub struct Broker {
    group: Arc<Group>,
    control: mpsc::Sender<Control>,
    wake: OwnedFd,
    thread: std::sync::Mutex<Option<JoinHandle<BrokerSummary>>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl Broker {
    pub fn start(group: Group, config: BrokerConfig) -> Result<Self, BrokerError> {
        let group = Arc::new(group);
        let (control, rx) = mpsc::channel();
        let (wake_rx, wake) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(|e| BrokerError::Thread(e.into()))?;
        let mut state = State::new(group.clone(), config, rx, wake_rx);
        let thread = std::thread::Builder::new()
            .name("fanotify-broker".into())
            .spawn(move || state.run())
            .map_err(BrokerError::Thread)?;
        Ok(Self {
            group,
            control,
            wake,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// The group, for marking files and for handing its fd on.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// Registers a layer and marks its data file unless it is complete (then no event
    /// ever comes for it). Returns the layer's object id.
    pub fn add_layer(&self, files: LayerFiles) -> Result<u32, BrokerError> {
        let (reply, answer) = mpsc::channel();
        let data = files.data.clone();
        self.send(Control::Add(files, reply))?;
        let (object_id, complete) = answer.recv().map_err(|_| BrokerError::Stopped)??;
        if !complete {
            self.group.mark(&data)?;
        }
        Ok(object_id)
    }

    /// Forgets the layer of data file `data` before its cache is removed; returns whether
    /// the broker had it.
    pub fn forget_layer(&self, data: &std::path::Path) -> Result<bool, BrokerError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(data).map_err(|source| BrokerError::File {
            path: data.to_owned(),
            source,
        })?;
        let (reply, answer) = mpsc::channel();
        self.send(Control::Forget((meta.dev(), meta.ino()), reply))?;
        answer.recv().map_err(|_| BrokerError::Stopped)
    }

    /// Hands the broker the link to a new fetcher child.
    pub fn attach(&self, link: OwnedFd) -> Result<(), BrokerError> {
        self.send(Control::Attach(link))
    }

    /// Stops reading new events (a planned stop under systemd: the group outlives us and
    /// the next process reads them); pending ones are still served.
    pub fn quiesce(&self) {
        let _ = self.send(Control::Quiesce);
    }

    /// Waits until no event is pending or `timeout` passes; returns how many still are.
    pub fn drain(&self, timeout: Duration) -> usize {
        let (reply, answer) = mpsc::channel();
        if self
            .send(Control::Drain(Instant::now() + timeout, reply))
            .is_err()
        {
            return 0;
        }
        answer.recv().unwrap_or(0)
    }

    /// Answers what is still pending (present: allowed; missing: EIO), saves the
    /// present-page records and stops the thread. The group fd stays open until the
    /// broker is dropped. Later calls return an empty summary.
    pub fn stop(&self) -> BrokerSummary {
        let _ = self.send(Control::Stop);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        thread.and_then(|t| t.join().ok()).unwrap_or_default()
    }

    fn send(&self, control: Control) -> Result<(), BrokerError> {
        self.control
            .send(control)
            .map_err(|_| BrokerError::Stopped)?;
        let _ = nix::unistd::write(&self.wake, &[1]);
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}
