//! Device-owned events: what a device waits on besides the driver's doorbells.
//!
//! A device declares its [`EventSource`]s once it is active
//! ([`VirtioDevice::event_sources`](crate::VirtioDevice::event_sources)): any pollable file
//! descriptor — an asynchronous engine's completion eventfd, a tap device, a timerfd — with
//! what its readiness means ([`EventAction`]: run a queue, or call the device's
//! `handle_event`). The transport core adds one retry timer per queue
//! ([`crate::Activation::retry_after`], armed by the queue pass when a chain answers
//! `Retry::After`), publishes everything in its [`DeviceEvents`] and empties it on reset. The
//! notify worker ([`crate::notify::NotifyWorker`]) watches that registry through an
//! [`EventPoller`] and serves the sources itself, so no VMM wires a device's events by hand;
//! the test harness serves them with the same poller.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
use vmm_sys_util::timerfd::TimerFd;

/// What a declared source's readiness asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventAction {
    /// Run a pass over this queue (a wake-up: not counted as a driver notification).
    Queue(u16),
    /// Call the device's `handle_event` with this token.
    Device(u32),
}

/// How the worker treats a source's readiness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// An eventfd or timerfd: the worker reads (and so clears) its 8-byte count before acting;
    /// the descriptor is switched to non-blocking.
    Counter,
    /// Any other pollable descriptor (a tap fd): edge-triggered; the device consumes what is
    /// readable when it acts (and must expect no new event until it has drained it — except
    /// once after the device's sources are re-registered, at activation).
    Edge,
}

/// A descriptor a device wants watched. It holds its own duplicate of the descriptor, so the
/// device may close its copy at any time.
#[derive(Debug)]
pub struct EventSource {
    fd: File,
    kind: EventKind,
    action: EventAction,
}

impl EventSource {
    /// An eventfd or timerfd (any descriptor read as an 8-byte counter).
    ///
    /// # Errors
    ///
    /// Duplicating the descriptor or making it non-blocking failed.
    pub fn counter(fd: &impl AsRawFd, action: EventAction) -> io::Result<Self> {
        let owned = dup(fd)?;
        set_nonblocking(&owned)?;
        Ok(Self::from_owned(owned, EventKind::Counter, action))
    }

    /// Any pollable descriptor the device drains itself, watched edge-triggered.
    ///
    /// # Errors
    ///
    /// Duplicating the descriptor failed.
    pub fn edge(fd: &impl AsRawFd, action: EventAction) -> io::Result<Self> {
        let owned = dup(fd)?;
        Ok(Self::from_owned(owned, EventKind::Edge, action))
    }

    fn from_owned(fd: OwnedFd, kind: EventKind, action: EventAction) -> Self {
        Self {
            fd: File::from(fd),
            kind,
            action,
        }
    }

    /// What readiness asks for.
    pub fn action(&self) -> EventAction {
        self.action
    }

    /// How readiness is treated.
    pub fn kind(&self) -> EventKind {
        self.kind
    }

    /// Consume a counter's value; whether the event is real (a counter read 0 or
    /// would-block: someone else consumed it, nothing to do).
    fn consume(&self) -> bool {
        match self.kind {
            EventKind::Edge => true,
            EventKind::Counter => {
                let mut b = [0u8; 8];
                matches!((&self.fd).read(&mut b), Ok(8)) && u64::from_ne_bytes(b) != 0
            }
        }
    }
}

/// Our own duplicate of `fd` (`EventFd` and `TimerFd` lend their descriptors through
/// `AsRawFd` only).
fn dup(fd: &impl AsRawFd) -> io::Result<OwnedFd> {
    // SAFETY: `fd` is borrowed for this call, so the descriptor it names stays open while the
    // borrowed handle lives (only inside this function, long enough to duplicate it).
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) };
    borrowed.try_clone_to_owned()
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: `raw` is an open descriptor owned by `fd` for the duration of both calls;
    // F_GETFL/F_SETFL only read and set its file status flags.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A queue's retry timer: a timerfd the queue pass arms when a chain answers
/// `Retry::After`; its source wakes the queue.
#[derive(Debug)]
pub struct RetryTimer {
    timer: TimerFd,
}

impl RetryTimer {
    /// A disarmed timer and the source that wakes `queue` when it fires.
    ///
    /// # Errors
    ///
    /// Creating the timerfd or its source failed.
    pub fn new(queue: u16) -> io::Result<(Self, EventSource)> {
        let timer = TimerFd::new().map_err(io::Error::from)?;
        let source = EventSource::counter(&timer, EventAction::Queue(queue))?;
        Ok((Self { timer }, source))
    }

    /// Fire once after `after` (a zero duration fires at once; re-arming replaces the
    /// previous deadline).
    ///
    /// # Errors
    ///
    /// `timerfd_settime` failed.
    pub fn arm(&mut self, after: Duration) -> io::Result<()> {
        // A zero it_value would disarm the timer: fire after a nanosecond instead.
        let after = after.max(Duration::from_nanos(1));
        self.timer.reset(after, None).map_err(io::Error::from)
    }
}

/// The event sources of one device, shared between its transport (which fills and empties
/// it at activation and reset) and the notify worker (which watches them).
#[derive(Debug)]
pub struct DeviceEvents {
    sources: Mutex<Vec<Arc<EventSource>>>,
    changed: EventFd,
}

impl DeviceEvents {
    /// An empty registry.
    ///
    /// # Errors
    ///
    /// Creating its change eventfd failed.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            sources: Mutex::new(Vec::new()),
            changed: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Replace the sources (activation) and tell the watchers.
    pub fn set(&self, sources: Vec<EventSource>) {
        *self.lock() = sources.into_iter().map(Arc::new).collect();
        // A full counter (u64::MAX - 1 pending changes) still wakes the watcher.
        let _ = self.changed.write(1);
    }

    /// Drop every source (reset).
    pub fn clear(&self) {
        self.set(Vec::new());
    }

    /// The current sources.
    pub fn sources(&self) -> Vec<Arc<EventSource>> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<EventSource>>> {
        self.sources.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Tokens at and above this are the poller's own.
const CHANGED_TOKEN: u64 = u64::MAX - 1;

/// Watches one [`DeviceEvents`] on an epoll instance: what the notify worker and the test
/// harness use to serve a device's events.
#[derive(Debug)]
pub struct EventPoller {
    events: Arc<DeviceEvents>,
    watched: Vec<Arc<EventSource>>,
    /// Token of the first watched source on the epoll instance.
    base: u64,
}

impl EventPoller {
    /// Watch `events` on `epoll`; the sources get tokens `base..`. Call
    /// [`Self::handle`] with every token the epoll instance returns.
    ///
    /// # Errors
    ///
    /// Registering the change eventfd or a source failed.
    pub fn new(events: Arc<DeviceEvents>, epoll: &Epoll, base: u64) -> io::Result<Self> {
        epoll.ctl(
            ControlOperation::Add,
            events.changed.as_raw_fd(),
            EpollEvent::new(EventSet::IN, CHANGED_TOKEN),
        )?;
        // Changes published before now are covered by the first sync (read first: a change
        // after the read still wakes the poller).
        let _ = events.changed.read();
        let mut p = Self {
            events,
            watched: Vec::new(),
            base,
        };
        p.resync(epoll)?;
        Ok(p)
    }

    /// Number of sources watched now.
    pub fn watched(&self) -> usize {
        self.watched.len()
    }

    fn resync(&mut self, epoll: &Epoll) -> io::Result<()> {
        for s in self.watched.drain(..) {
            // Already gone if the last copy closed; nothing else can fail here.
            let _ = epoll.ctl(
                ControlOperation::Delete,
                s.fd.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        let sources = self.events.sources();
        for (i, s) in sources.iter().enumerate() {
            let set = match s.kind {
                EventKind::Counter => EventSet::IN,
                EventKind::Edge => EventSet::IN | EventSet::EDGE_TRIGGERED,
            };
            epoll.ctl(
                ControlOperation::Add,
                s.fd.as_raw_fd(),
                EpollEvent::new(set, self.base + i as u64),
            )?;
        }
        self.watched = sources;
        Ok(())
    }

    /// Handle one token from `epoll`: a registry change re-registers the sources; a source's
    /// readiness yields its action. Other tokens yield nothing.
    ///
    /// # Errors
    ///
    /// Re-registering the sources after a change failed.
    pub fn handle(&mut self, epoll: &Epoll, token: u64) -> io::Result<Option<EventAction>> {
        if token == CHANGED_TOKEN {
            let _ = self.events.changed.read();
            self.resync(epoll)?;
            return Ok(None);
        }
        let Some(i) = token.checked_sub(self.base) else {
            return Ok(None);
        };
        let Some(s) = usize::try_from(i).ok().and_then(|i| self.watched.get(i)) else {
            return Ok(None);
        };
        Ok(s.consume().then_some(s.action))
    }

    /// Wait up to `timeout` on a private epoll instance for the next actions (what the test
    /// harness calls; the notify worker shares its own epoll instead). Returns the actions of
    /// every ready source; empty after the timeout.
    ///
    /// # Errors
    ///
    /// epoll failed.
    pub fn wait_once(&mut self, epoll: &Epoll, timeout: Duration) -> io::Result<Vec<EventAction>> {
        let mut evs = vec![EpollEvent::default(); self.watched.len() + 1];
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let n = match epoll.wait(ms, &mut evs) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for ev in evs.iter().take(n) {
            if let Some(a) = self.handle(epoll, ev.data())? {
                out.push(a);
            }
        }
        Ok(out)
    }
}
