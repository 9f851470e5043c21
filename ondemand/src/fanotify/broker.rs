//! The broker: owns the fanotify group in the long-lived process, reads every event,
//! answers at once what is present, hands the rest to the current fetcher child over
//! its [`link`](super::link), and answers when the child is done.
//!
//! The promise is cachefiles' `restore`, kept in user space: an event handed to a child
//! that dies stays pending and is sent again to the next child, so the reader pauses and
//! never fails. An event is let through only if every page it reads is in the
//! present-page record; anything else is denied with EIO, never allowed onto zeros.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde::Serialize;

use super::group::{AccessEvent, Answer, Group, GroupError};
use super::link::{self, ToBroker, ToFetcher};
use super::present::Present;

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
    /// Replies once no event is pending or at the deadline, with how many still are.
    Drain(Instant, mpsc::Sender<usize>),
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

    /// Hands the broker the link to a new fetcher child.
    pub fn attach(&self, link: OwnedFd) -> Result<(), BrokerError> {
        self.send(Control::Attach(link))
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenState {
    Closed,
    Opening(u32),
    Open,
}

struct Layer {
    files: LayerFiles,
    present: Present,
    /// A dup of the first event's fd: opened without notification, handed to each child
    /// to write through.
    fd: Option<OwnedFd>,
    open: OpenState,
}

struct Pending {
    event: AccessEvent,
    layer: u32,
    sent: bool,
}

struct State {
    group: Arc<Group>,
    config: BrokerConfig,
    control: mpsc::Receiver<Control>,
    wake: OwnedFd,
    layers: Vec<Layer>,
    by_inode: HashMap<(u64, u64), u32>,
    pending: BTreeMap<u32, Pending>,
    link: Option<OwnedFd>,
    next_msg: u32,
    drains: Vec<(Instant, mpsc::Sender<usize>)>,
    summary: BrokerSummary,
}

impl State {
    fn new(
        group: Arc<Group>,
        config: BrokerConfig,
        control: mpsc::Receiver<Control>,
        wake: OwnedFd,
    ) -> Self {
        Self {
            group,
            config,
            control,
            wake,
            layers: Vec::new(),
            by_inode: HashMap::new(),
            pending: BTreeMap::new(),
            link: None,
            next_msg: 1,
            drains: Vec::new(),
            summary: BrokerSummary::default(),
        }
    }

    fn run(&mut self) -> BrokerSummary {
        let mut next_save = Instant::now() + self.config.save_every;
        loop {
            let (group_ready, link_ready) = self.wait(Duration::from_millis(200));
            if group_ready {
                match self.group.read_events() {
                    Ok(outcome) => {
                        if outcome.overflowed {
                            tracing::error!("fanotify queue overflowed: events were lost");
                        }
                        for event in outcome.events {
                            self.on_event(event);
                        }
                    }
                    Err(err) => tracing::error!(%err, "reading fanotify events"),
                }
            }
            if link_ready {
                self.on_link();
            }
            while let Ok(control) = self.control.try_recv() {
                if !self.on_control(control) {
                    self.shutdown();
                    return std::mem::take(&mut self.summary);
                }
            }
            self.answer_drains();
            if Instant::now() >= next_save {
                self.save_present();
                next_save = Instant::now() + self.config.save_every;
            }
        }
    }

    /// Polls the group, the link and the wake pipe; returns (group, link) readiness.
    fn wait(&mut self, timeout: Duration) -> (bool, bool) {
        let mut fds = vec![
            PollFd::new(self.group.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
        ];
        if let Some(link) = &self.link {
            fds.push(PollFd::new(link.as_fd(), PollFlags::POLLIN));
        }
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        if poll(&mut fds, PollTimeout::from(ms)).is_err() {
            return (false, false);
        }
        let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
        let group = ready(&fds[0]);
        let link = fds.get(2).is_some_and(ready);
        if ready(&fds[1]) {
            let mut sink = [0u8; 64];
            while matches!(nix::unistd::read(self.wake.as_fd(), &mut sink), Ok(n) if n > 0) {}
        }
        (group, link)
    }

    fn on_control(&mut self, control: Control) -> bool {
        match control {
            Control::Add(files, reply) => {
                let _ = reply.send(self.add(files));
            }
            Control::Attach(link) => {
                self.detach();
                self.link = Some(link);
                self.summary.children += 1;
                for id in 0..self.layers.len() {
                    self.dispatch(id as u32);
                }
            }
            Control::Drain(deadline, reply) => self.drains.push((deadline, reply)),
            Control::Stop => return false,
        }
        true
    }

    fn add(&mut self, files: LayerFiles) -> Result<(u32, bool), BrokerError> {
        let file_err = |source| BrokerError::File {
            path: files.data.clone(),
            source,
        };
        let meta = std::fs::metadata(&files.data).map_err(file_err)?;
        let key = (meta.dev(), meta.ino());
        if let Some(&id) = self.by_inode.get(&key) {
            return Ok((id, self.layers[id as usize].present.is_complete()));
        }
        let present = Present::load(&files.present, meta.len());
        let id =
            u32::try_from(self.layers.len()).map_err(|e| file_err(std::io::Error::other(e)))?;
        tracing::info!(layer = %files.name, data = %files.data.display(), present_bytes = present.bytes(), size = meta.len(), "fanotify layer added");
        self.layers.push(Layer {
            files,
            present,
            fd: None,
            open: OpenState::Closed,
        });
        self.by_inode.insert(key, id);
        Ok((id, self.layers[id as usize].present.is_complete()))
    }

    fn on_event(&mut self, event: AccessEvent) {
        self.summary.events += 1;
        let layer = std::fs::File::from(match event.fd.try_clone() {
            Ok(fd) => fd,
            Err(err) => {
                tracing::error!(%err, "cannot dup an event fd; denied");
                return self.deny(event);
            }
        })
        .metadata()
        .ok()
        .and_then(|m| self.by_inode.get(&(m.dev(), m.ino())).copied());
        let Some(id) = layer else {
            tracing::error!(pid = event.pid, "event on a file no layer owns; denied");
            return self.deny(event);
        };
        let layer = &mut self.layers[id as usize];
        if layer.present.contains(event.offset, event.len) {
            self.summary.answered_present += 1;
            return self.answer(event, Answer::Allow);
        }
        if layer.fd.is_none() {
            layer.fd = event.fd.try_clone().ok();
        }
        let msg_id = self.next_msg;
        self.next_msg = self.next_msg.wrapping_add(1).max(1);
        self.pending.insert(
            msg_id,
            Pending {
                event,
                layer: id,
                sent: false,
            },
        );
        self.dispatch(id);
    }

    /// Moves layer `id` forward with the current child: open it, or send its reads.
    fn dispatch(&mut self, id: u32) {
        let Some(link) = self.link.as_ref().map(|l| l.as_fd()) else {
            return;
        };
        let layer = &mut self.layers[id as usize];
        let waiting = self.pending.values().any(|p| p.layer == id && !p.sent);
        match layer.open {
            OpenState::Opening(_) => {}
            OpenState::Closed if !waiting => {}
            OpenState::Closed => {
                let Some(fd) = &layer.fd else { return };
                let msg_id = self.next_msg;
                self.next_msg = self.next_msg.wrapping_add(1).max(1);
                let open = ToFetcher::Open {
                    msg_id,
                    object_id: id,
                    name: layer.files.name.clone(),
                };
                if let Err(err) = link::send(link, &open, Some(fd.as_fd())) {
                    tracing::warn!(%err, "cannot send an Open to the fetcher");
                    return;
                }
                layer.open = OpenState::Opening(msg_id);
            }
            OpenState::Open => {
                for (&msg_id, pending) in self.pending.iter_mut() {
                    if pending.layer != id || pending.sent {
                        continue;
                    }
                    let read = ToFetcher::Read {
                        msg_id,
                        object_id: id,
                        offset: pending.event.offset,
                        len: pending.event.len.min(layer.present.size()),
                    };
                    if let Err(err) = link::send(link, &read, None) {
                        tracing::warn!(%err, "cannot send a Read to the fetcher");
                        return;
                    }
                    pending.sent = true;
                }
            }
        }
    }

    fn on_link(&mut self) {
        loop {
            let Some(link) = self.link.as_ref().map(|l| l.as_fd()) else {
                return;
            };
            if !link::wait_readable(link, Duration::ZERO).unwrap_or(false) {
                return;
            }
            match link::recv::<ToBroker>(link) {
                Ok(Some((message, _))) => self.on_message(message),
                Ok(None) => return self.detach(),
                Err(err) => {
                    tracing::warn!(%err, "fetcher link failed");
                    return self.detach();
                }
            }
        }
    }

    fn on_message(&mut self, message: ToBroker) {
        match message {
            ToBroker::Copen { msg_id, result } => {
                let Some(id) = self
                    .layers
                    .iter()
                    .position(|l| l.open == OpenState::Opening(msg_id))
                else {
                    return;
                };
                let layer = &mut self.layers[id];
                match result {
                    Ok(size) if size == layer.present.size() => {
                        layer.open = OpenState::Open;
                        self.dispatch(id as u32);
                    }
                    result => {
                        tracing::error!(layer = %layer.files.name, ?result, size = layer.present.size(), "the fetcher cannot serve this layer; its readers see EIO");
                        layer.open = OpenState::Closed;
                        let failed: Vec<u32> = self
                            .pending
                            .iter()
                            .filter(|(_, p)| p.layer == id as u32)
                            .map(|(&m, _)| m)
                            .collect();
                        for msg_id in failed {
                            if let Some(p) = self.pending.remove(&msg_id) {
                                self.deny(p.event);
                            }
                        }
                    }
                }
            }
            ToBroker::Written {
                object_id,
                offset,
                len,
            } => {
                if let Some(layer) = self.layers.get_mut(object_id as usize) {
                    layer.present.insert(offset, len);
                }
            }
            ToBroker::Done { msg_id } => {
                let Some(pending) = self.pending.remove(&msg_id) else {
                    return;
                };
                let layer = &self.layers[pending.layer as usize];
                if layer
                    .present
                    .contains(pending.event.offset, pending.event.len)
                {
                    self.summary.answered_fetched += 1;
                    self.answer(pending.event, Answer::Allow);
                } else {
                    self.deny(pending.event);
                }
            }
        }
    }

    /// The child is gone: what it held goes to the next one (unless re-sending is off).
    fn detach(&mut self) {
        if self.link.take().is_none() {
            return;
        }
        for layer in &mut self.layers {
            layer.open = OpenState::Closed;
        }
        if self.config.resend {
            for pending in self.pending.values_mut() {
                if pending.sent {
                    pending.sent = false;
                    self.summary.resent += 1;
                }
            }
        }
    }

    fn answer_drains(&mut self) {
        let pending = self.pending.len();
        let now = Instant::now();
        self.drains.retain(|(deadline, reply)| {
            if pending == 0 || now >= *deadline {
                let _ = reply.send(pending);
                false
            } else {
                true
            }
        });
    }

    fn shutdown(&mut self) {
        for (_, pending) in std::mem::take(&mut self.pending) {
            let layer = &self.layers[pending.layer as usize];
            if layer
                .present
                .contains(pending.event.offset, pending.event.len)
            {
                self.answer(pending.event, Answer::Allow);
            } else {
                self.deny(pending.event);
            }
        }
        self.save_present();
        for (_, reply) in self.drains.drain(..) {
            let _ = reply.send(0);
        }
    }

    /// Syncs each changed data file, then its record; drops the mark of a complete one.
    fn save_present(&mut self) {
        for layer in &mut self.layers {
            if !layer.present.is_dirty() {
                continue;
            }
            let Some(fd) = &layer.fd else { continue };
            let saved = nix::unistd::fdatasync(fd.as_fd())
                .map_err(std::io::Error::from)
                .and_then(|()| layer.present.save(&layer.files.present));
            if let Err(err) = saved {
                tracing::warn!(path = %layer.files.present.display(), %err, "cannot save the present-page record");
                continue;
            }
            if layer.present.is_complete() {
                match self.group.unmark(&layer.files.data) {
                    Ok(()) => {
                        tracing::info!(layer = %layer.files.name, "layer fully fetched; mark dropped")
                    }
                    Err(err) => tracing::warn!(%err, "cannot drop the mark of a complete layer"),
                }
            }
        }
    }

    fn deny(&mut self, event: AccessEvent) {
        self.summary.denied += 1;
        self.answer(event, Answer::Deny(Errno::EIO));
    }

    fn answer(&self, event: AccessEvent, answer: Answer) {
        let fd = event.fd.as_raw_fd();
        if let Err(err) = self.group.answer(event, answer) {
            tracing::error!(fd, %err, "cannot answer a fanotify event");
        }
    }
}
