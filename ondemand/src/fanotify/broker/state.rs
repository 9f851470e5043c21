//! The broker thread's event loop: which events are pending, which child holds them,
//! and when each may be answered.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::super::group::{AccessEvent, Answer, Group};
use super::super::link::{self, ToBroker, ToFetcher};
use super::super::present::Present;
use super::{BrokerConfig, BrokerError, BrokerSummary, Control, LayerFiles};

/// How long an event on a file no layer owns waits for its layer to be registered.
const ORPHAN_WAIT: Duration = Duration::from_secs(60);

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

pub(super) struct State {
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
    /// No more events are read (see [`Control::Quiesce`]).
    quiet: bool,
    /// Events on files no layer owns yet, by file, since when: after a restart the
    /// group (kept by systemd or the keeper) reports reads of old mounts before the
    /// snapshotter has registered their layers again.
    orphans: Vec<(Instant, (u64, u64), AccessEvent)>,
    summary: BrokerSummary,
}

impl State {
    pub(super) fn new(
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
            quiet: false,
            orphans: Vec::new(),
            summary: BrokerSummary::default(),
        }
    }

    pub(super) fn run(&mut self) -> BrokerSummary {
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
            self.expire_orphans();
            if Instant::now() >= next_save {
                self.save_present();
                next_save = Instant::now() + self.config.save_every;
            }
        }
    }

    /// Polls the group, the link and the wake pipe; returns (group, link) readiness.
    fn wait(&mut self, timeout: Duration) -> (bool, bool) {
        let group_events = if self.quiet {
            PollFlags::empty()
        } else {
            PollFlags::POLLIN
        };
        let mut fds = vec![
            PollFd::new(self.group.as_fd(), group_events),
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
        let group = !self.quiet && ready(&fds[0]);
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
            Control::Forget(key, reply) => {
                let known = self.by_inode.remove(&key).inspect(|&id| {
                    let layer = &mut self.layers[id as usize];
                    layer.fd = None;
                    layer.present = Present::new(0);
                    tracing::info!(layer = %layer.files.name, "fanotify layer forgotten");
                });
                let _ = reply.send(known.is_some());
            }
            Control::Drain(deadline, reply) => self.drains.push((deadline, reply)),
            Control::Quiesce => self.quiet = true,
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
        self.adopt_orphans(key, id);
        Ok((id, self.layers[id as usize].present.is_complete()))
    }

    fn on_event(&mut self, event: AccessEvent) {
        self.summary.events += 1;
        let key = std::fs::File::from(match event.fd.try_clone() {
            Ok(fd) => fd,
            Err(err) => {
                tracing::error!(%err, "cannot dup an event fd; denied");
                return self.deny(event);
            }
        })
        .metadata()
        .map(|m| (m.dev(), m.ino()));
        let Ok(key) = key else {
            tracing::error!(pid = event.pid, "cannot stat an event's file; denied");
            return self.deny(event);
        };
        match self.by_inode.get(&key).copied() {
            Some(id) => self.route(event, id),
            None => {
                tracing::debug!(pid = event.pid, "event on a file no layer owns yet; held");
                self.orphans.push((Instant::now(), key, event));
            }
        }
    }

    /// Answers an event of layer `id` at once if its range is present, else queues it
    /// for the child.
    fn route(&mut self, event: AccessEvent, id: u32) {
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

    /// Routes the held events of a file that just became layer `id`'s.
    fn adopt_orphans(&mut self, key: (u64, u64), id: u32) {
        let (mine, rest) = std::mem::take(&mut self.orphans)
            .into_iter()
            .partition(|(_, k, _)| *k == key);
        self.orphans = rest;
        for (_, _, event) in mine {
            self.route(event, id);
        }
    }

    /// Denies events held longer than [`ORPHAN_WAIT`]: no layer claimed their file.
    fn expire_orphans(&mut self) {
        let now = Instant::now();
        if self
            .orphans
            .iter()
            .all(|(since, _, _)| now - *since < ORPHAN_WAIT)
        {
            return;
        }
        let (old, rest) = std::mem::take(&mut self.orphans)
            .into_iter()
            .partition(|(since, _, _)| now - *since >= ORPHAN_WAIT);
        self.orphans = rest;
        for (_, _, event) in old {
            tracing::error!(pid = event.pid, wait = ?ORPHAN_WAIT, "event on a file no layer owns; denied");
            self.deny(event);
        }
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
        for (_, _, event) in std::mem::take(&mut self.orphans) {
            self.deny(event);
        }
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
