//! The fast notification paths: queue notifications through **ioeventfd** (a guest doorbell
//! write signals an eventfd inside KVM — no exit to the VMM's vCPU thread) and used-ring
//! interrupts through **irqfd** (the device writes an eventfd that KVM turns into an interrupt).
//!
//! Without ioeventfds the doorbell write traps to the transport's bus handler (the plain-exit
//! fallback) and reaches the device the same way. irqfds are attached to the MSI-X vectors by
//! vmkit-devices (`KvmIrqRouter::attach_msix`); the transports then use them automatically.
//!
//! ```no_run
//! use std::sync::{Arc, Condvar, Mutex, PoisonError};
//! use vmkit_virtio::notify::{NotifyWorker, register_ioeventfds};
//! # fn f(vm: &kvm_ioctls::VmFd, t: Arc<Mutex<vmkit_virtio::pci::VirtioPciTransport<vmkit_virtio::rng::Rng>>>) -> Result<(), Box<dyn std::error::Error>> {
//! let bar = t.lock().unwrap().bar_address().unwrap_or(0);
//! let addrs = t.lock().unwrap().notify_addresses(bar);
//! let fds = register_ioeventfds(vm, &addrs)?;
//! let worker = NotifyWorker::spawn(t.clone(), fds)?; // serves kicks until dropped
//! # drop(worker); Ok(()) }
//! ```

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use thiserror::Error;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::device::DeviceError;
use crate::events::{DeviceEvents, EventAction, EventPoller};
use crate::queue_server::{QueueServers, ServeOutcome};

/// Errors setting up notification paths.
#[derive(Debug, Error)]
pub enum NotifyError {
    /// Creating an eventfd or epoll instance, or spawning the worker, failed.
    #[error("notification setup failed")]
    Io(#[source] io::Error),
    /// KVM_IOEVENTFD failed.
    #[error("KVM_IOEVENTFD at {addr:#x} failed")]
    Ioeventfd {
        /// Doorbell address.
        addr: u64,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Something that accepts queue notifications (both transports).
pub trait QueueNotify: Send {
    /// The driver notified queue `index`.
    fn notify_queue(&mut self, index: u16);

    /// The device's own event (not the driver's) asks for a pass over queue `index`, e.g. an
    /// asynchronous engine's completion eventfd. The default treats it as a notification; the
    /// transports run the pass without counting a driver notification.
    fn wake_queue(&mut self, index: u16) {
        self.notify_queue(index);
    }

    /// A device event source with `EventAction::Device(token)` fired. The default ignores it.
    fn device_event(&mut self, _token: u32) {}

    /// The device's event sources, which a [`NotifyWorker`] serves itself (the transports
    /// return their core's registry). The default has none.
    fn device_events(&self) -> Option<Arc<DeviceEvents>> {
        None
    }

    /// The queues the device serves apart from the transport lock; a [`NotifyWorker`] runs
    /// each on a thread of its own (see [`crate::queue_server`]). The default has none.
    fn queue_servers(&self) -> Option<Arc<QueueServers>> {
        None
    }

    /// A queue server of activation `epoch` failed while the worker ran it.
    fn server_error(&mut self, _epoch: u64, _error: DeviceError) {}
}

/// A queue's doorbell eventfd.
#[derive(Debug)]
pub struct QueueEventFd {
    /// Queue index.
    pub queue: u16,
    /// Doorbell address it is registered for.
    pub addr: u64,
    /// The eventfd KVM signals.
    pub fd: EventFd,
}

/// Register an ioeventfd for each `(address, datamatch, queue)` doorbell (as returned by the
/// transports' `notify_addresses`). A datamatch is a 4-byte value; without one any write width
/// matches.
pub fn register_ioeventfds(
    vm: &VmFd,
    doorbells: &[(u64, Option<u32>, u16)],
) -> Result<Vec<QueueEventFd>, NotifyError> {
    let mut out = Vec::with_capacity(doorbells.len());
    for &(addr, datamatch, queue) in doorbells {
        let fd = EventFd::new(EFD_NONBLOCK).map_err(NotifyError::Io)?;
        let a = IoEventAddress::Mmio(addr);
        let r = match datamatch {
            Some(d) => vm.register_ioevent(&fd, &a, d),
            None => vm.register_ioevent(&fd, &a, NoDatamatch),
        };
        r.map_err(|source| NotifyError::Ioeventfd { addr, source })?;
        out.push(QueueEventFd { queue, addr, fd });
    }
    Ok(out)
}

/// Unregister what [`register_ioeventfds`] registered.
pub fn unregister_ioeventfds(
    vm: &VmFd,
    fds: &[QueueEventFd],
    datamatch: bool,
) -> Result<(), NotifyError> {
    for q in fds {
        let a = IoEventAddress::Mmio(q.addr);
        let r = if datamatch {
            vm.unregister_ioevent(&q.fd, &a, q.queue as u32)
        } else {
            vm.unregister_ioevent(&q.fd, &a, NoDatamatch)
        };
        r.map_err(|source| NotifyError::Ioeventfd {
            addr: q.addr,
            source,
        })?;
    }
    Ok(())
}

const STOP_TOKEN: u64 = u64::MAX;
/// Tokens of the device's event sources start here (doorbells and wake-ups are below).
const DEVICE_EVENT_BASE: u64 = 1 << 32;

/// A thread that waits on queue eventfds and delivers each kick to the transport.
pub struct NotifyWorker {
    stop: EventFd,
    thread: Option<JoinHandle<Vec<QueueEventFd>>>,
}

impl NotifyWorker {
    /// Serve `fds` for `target` until dropped (or [`NotifyWorker::stop`]), together with the
    /// device's own event sources (`VirtioDevice::event_sources`, retry timers), which the
    /// worker finds in the transport's registry ([`QueueNotify::device_events`]) and follows
    /// across activations and resets, and the queues the device serves apart
    /// ([`QueueNotify::queue_servers`]), each run on a thread of its own.
    pub fn spawn<T: QueueNotify + 'static>(
        target: Arc<Mutex<T>>,
        fds: Vec<QueueEventFd>,
    ) -> Result<Self, NotifyError> {
        Self::spawn_with_wakeups(target, fds, Vec::new())
    }

    /// [`NotifyWorker::spawn`], and also run queue `q` whenever a `(q, fd)` of `wakeups` is
    /// signalled — for devices that do not declare their events themselves (a device that
    /// declares them needs no `wakeups`; declaring and passing both is harmless: one of the
    /// two readers finds the count already taken). A wake-up is a device's own event, such as
    /// an asynchronous engine's completion eventfd (vmkit-block's `Block::completion_eventfds`),
    /// whose pass over the queue puts finished requests on the used ring as well as taking new
    /// ones. A wake-up reaches the target as
    /// [`QueueNotify::wake_queue`], which the transports do not count as a driver
    /// notification. [`NotifyWorker::stop`] returns only the doorbells; the wake-up eventfds
    /// are closed.
    pub fn spawn_with_wakeups<T: QueueNotify + 'static>(
        target: Arc<Mutex<T>>,
        fds: Vec<QueueEventFd>,
        wakeups: Vec<(u16, EventFd)>,
    ) -> Result<Self, NotifyError> {
        let stop = EventFd::new(EFD_NONBLOCK).map_err(NotifyError::Io)?;
        let epoll = Epoll::new().map_err(NotifyError::Io)?;
        let all = fds
            .iter()
            .map(|q| &q.fd)
            .chain(wakeups.iter().map(|(_, fd)| fd));
        for (token, fd) in all.enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token as u64),
                )
                .map_err(NotifyError::Io)?;
        }
        epoll
            .ctl(
                ControlOperation::Add,
                stop.as_raw_fd(),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .map_err(NotifyError::Io)?;
        // The device's own events: served from the transport's registry, which follows
        // activation and reset.
        let (registry, servers) = {
            let t = target.lock().unwrap_or_else(|e| e.into_inner());
            (t.device_events(), t.queue_servers())
        };
        let poller = registry
            .map(|r| EventPoller::new(r, &epoll, DEVICE_EVENT_BASE))
            .transpose()
            .map_err(NotifyError::Io)?;
        let thread = std::thread::Builder::new()
            .name("virtio-notify".into())
            .spawn(move || {
                let runners = Runners::new(servers, target.clone());
                serve(epoll, fds, wakeups, poller, runners, target)
            })
            .map_err(NotifyError::Io)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stop the thread and get the eventfds back (e.g. to unregister them).
    pub fn stop(mut self) -> Vec<QueueEventFd> {
        self.halt()
    }

    fn halt(&mut self) -> Vec<QueueEventFd> {
        let _ = self.stop.write(1);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for NotifyWorker {
    fn drop(&mut self) {
        self.halt();
    }
}

fn serve<T: QueueNotify + 'static>(
    epoll: Epoll,
    fds: Vec<QueueEventFd>,
    wakeups: Vec<(u16, EventFd)>,
    mut poller: Option<EventPoller>,
    mut runners: Runners<T>,
    target: Arc<Mutex<T>>,
) -> Vec<QueueEventFd> {
    let mut events = vec![EpollEvent::default(); fds.len() + wakeups.len() + 2];
    loop {
        // Room for every source the device declared since the last wait.
        let want = fds.len() + wakeups.len() + 2 + poller.as_ref().map_or(0, EventPoller::watched);
        if events.len() < want {
            events.resize(want, EpollEvent::default());
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return fds,
        };
        for ev in events.iter().take(n) {
            let token = ev.data();
            if token == STOP_TOKEN {
                return fds;
            }
            if token >= DEVICE_EVENT_BASE {
                let action = match poller.as_mut().map(|p| p.handle(&epoll, token)) {
                    Some(Ok(a)) => a,
                    // Re-registering failed: stop serving device events, keep the doorbells.
                    Some(Err(_)) => {
                        poller = None;
                        None
                    }
                    None => None,
                };
                match action {
                    Some(EventAction::Queue(q)) => runners.deliver(q, true),
                    Some(EventAction::Device(token)) => target
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .device_event(token),
                    None => {}
                }
                continue;
            }
            // Tokens number the doorbells first, then the wake-ups.
            let token = token as usize;
            let (queue, fd, wake) = match fds.get(token) {
                Some(q) => (q.queue, &q.fd, false),
                None => match token.checked_sub(fds.len()).and_then(|i| wakeups.get(i)) {
                    Some((queue, fd)) => (*queue, fd, true),
                    None => continue,
                },
            };
            // Coalesced kicks read as one count; one pass over the queue serves them all.
            if fd.read().is_ok() {
                runners.deliver(queue, wake);
            }
        }
    }
}

/// Whether a queue's runner has work, or must stop.
#[derive(Default)]
struct RunnerState {
    pending: bool,
    stop: bool,
}

/// A thread that runs one served queue whenever it is kicked (kicks coalesce).
struct QueueRunner {
    state: Arc<(Mutex<RunnerState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl QueueRunner {
    fn spawn<T: QueueNotify + 'static>(
        q: u16,
        servers: Arc<QueueServers>,
        target: Arc<Mutex<T>>,
    ) -> io::Result<Self> {
        let state = Arc::new((Mutex::new(RunnerState::default()), Condvar::new()));
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("virtio-queue-{q}"))
            .spawn(move || {
                loop {
                    {
                        let (m, cv) = &*st;
                        let mut g = m.lock().unwrap_or_else(PoisonError::into_inner);
                        while !g.pending && !g.stop {
                            g = cv.wait(g).unwrap_or_else(PoisonError::into_inner);
                        }
                        if g.stop {
                            return;
                        }
                        g.pending = false;
                    }
                    match servers.run(q) {
                        ServeOutcome::Done => {}
                        ServeOutcome::Failed { epoch, error } => target
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .server_error(epoch, error),
                        // Reset since the kick: the device's own path decides (uncounted).
                        ServeOutcome::NotServed => target
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .wake_queue(q),
                    }
                }
            })?;
        Ok(Self {
            state,
            thread: Some(thread),
        })
    }

    fn kick(&self) {
        let (m, cv) = &*self.state;
        m.lock().unwrap_or_else(PoisonError::into_inner).pending = true;
        cv.notify_one();
    }
}

impl Drop for QueueRunner {
    fn drop(&mut self) {
        let (m, cv) = &*self.state;
        m.lock().unwrap_or_else(PoisonError::into_inner).stop = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where the worker delivers a queue's kick: its runner thread when the device serves the
/// queue apart, the transport (under its lock) otherwise.
struct Runners<T> {
    servers: Option<Arc<QueueServers>>,
    runners: Vec<Option<QueueRunner>>,
    target: Arc<Mutex<T>>,
}

impl<T: QueueNotify + 'static> Runners<T> {
    fn new(servers: Option<Arc<QueueServers>>, target: Arc<Mutex<T>>) -> Self {
        let n = servers.as_ref().map_or(0, |s| s.len());
        Self {
            servers,
            runners: (0..n).map(|_| None).collect(),
            target,
        }
    }

    /// A doorbell (`wake == false`) or the device's own event for queue `q`.
    fn deliver(&mut self, q: u16, wake: bool) {
        if let Some(servers) = self.servers.as_ref().filter(|s| s.serves(q))
            && let Some(slot) = self.runners.get_mut(q as usize)
        {
            if slot.is_none() {
                // A thread per served queue, started at its first kick; if that fails the
                // queue runs on this thread (through the transport) instead.
                *slot = QueueRunner::spawn(q, servers.clone(), self.target.clone()).ok();
            }
            if let Some(r) = slot {
                if !wake {
                    servers.count_notify();
                }
                r.kick();
                return;
            }
        }
        let mut t = self.target.lock().unwrap_or_else(PoisonError::into_inner);
        if wake {
            t.wake_queue(q);
        } else {
            t.notify_queue(q);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Records the queues it is told about.
    #[derive(Default)]
    struct Recorder(Vec<u16>);

    impl QueueNotify for Recorder {
        fn notify_queue(&mut self, index: u16) {
            self.0.push(index);
        }
        /// Wake-ups recorded as `100 + index`.
        fn wake_queue(&mut self, index: u16) {
            self.0.push(100 + index);
        }
    }

    fn wait_for(t: &Mutex<Recorder>, n: usize) -> Vec<u16> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = t.lock().unwrap().0.clone();
            if seen.len() >= n || Instant::now() > deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn doorbells_and_wakeups_run_their_queues() {
        let target = Arc::new(Mutex::new(Recorder::default()));
        let doorbells: Vec<QueueEventFd> = (0..2)
            .map(|q| QueueEventFd {
                queue: q,
                addr: 0x1000 + 4 * u64::from(q),
                fd: EventFd::new(EFD_NONBLOCK).unwrap(),
            })
            .collect();
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick1 = doorbells[1].fd.try_clone().unwrap();
        let worker = NotifyWorker::spawn_with_wakeups(
            target.clone(),
            doorbells,
            vec![(7, wake.try_clone().unwrap())],
        )
        .unwrap();
        wake.write(1).unwrap();
        assert_eq!(wait_for(&target, 1), [107], "a wake-up, not a notification");
        kick1.write(3).unwrap(); // coalesced kicks: one pass
        assert_eq!(wait_for(&target, 2), [107, 1]);
        let back = worker.stop();
        assert_eq!(
            back.iter().map(|q| (q.queue, q.addr)).collect::<Vec<_>>(),
            [(0, 0x1000), (1, 0x1004)],
            "stop returns the doorbells only"
        );
        assert_eq!(target.lock().unwrap().0, [107, 1]);
    }
}
