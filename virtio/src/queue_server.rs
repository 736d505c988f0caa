//! Queues that run outside the transport lock (the threading model: see virtio/README.md).
//!
//! A device that wants its queues to make progress independently — of each other and of the
//! vCPU's register accesses — takes each queue out of its [`Activation`] as a [`QueueHandle`]
//! ([`Activation::take_queue`]), wraps it in a [`QueueServer`] and hands the servers over in
//! [`VirtioDevice::queue_servers`](crate::VirtioDevice::queue_servers). The transport core
//! keeps them in its [`QueueServers`], one lock per queue:
//!
//! * the notify worker runs a served queue on that queue's own thread, holding only the
//!   queue's lock — never the transport's — so a long request on one queue blocks neither
//!   another queue nor a configuration or ISR read;
//! * a trapped doorbell (no ioeventfd) runs the server on the vCPU thread, as before;
//! * reset and device errors take every queue lock before dropping the servers, so once the
//!   driver reads a status of 0 no server touches the rings (virtio 1.2 §2.4).
//!
//! Queues a device does not serve this way keep the old path: `queue_notify` under the
//! transport lock.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use virtio_queue::{DescriptorChain, Queue};

use crate::device::{Activation, DeviceError, VirtioInterrupt};
use crate::events::RetryTimer;
use crate::memory::VirtioMemory;
use crate::queue_pass::{self, ChainOutcome, Completion, PassReport, QueueContext, Retry};

/// Serves one queue on its own (see the [module docs](self)). A server must not take the
/// transport's lock (directly or through something that does): reset holds it while waiting for
/// a running server.
pub trait QueueServer: Send {
    /// The driver notified the queue, or one of its events fired: run it.
    ///
    /// # Errors
    ///
    /// A device error: the transport sets `DEVICE_NEEDS_RESET` and drops the servers.
    fn serve(&mut self) -> Result<(), DeviceError>;
}

/// One queue taken out of an [`Activation`]: what a [`QueueServer`] runs the queue pass on.
pub struct QueueHandle<M> {
    /// Queue index.
    pub index: u16,
    /// The queue.
    pub queue: Queue,
    /// Guest memory.
    pub mem: M,
    /// How to notify the driver.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    retry_timer: Option<RetryTimer>,
}

impl<M: VirtioMemory> QueueHandle<M> {
    /// [`queue_pass::run`] over this queue; a `Retry::After` arms the queue's retry timer.
    ///
    /// # Errors
    ///
    /// A corrupt ring, a failed interrupt, or a retry timer that cannot be armed.
    pub fn run<F>(&mut self, handle: F) -> Result<PassReport, DeviceError>
    where
        F: FnMut(DescriptorChain<&M::Memory>) -> ChainOutcome,
    {
        let mem = self.mem.memory();
        let ctx = QueueContext {
            index: self.index,
            queue: &mut self.queue,
            mem: &*mem,
            interrupt: &*self.interrupt,
        };
        let report = queue_pass::run(ctx, handle)?;
        drop(mem);
        if let Some(Retry::After(after)) = report.retry {
            self.retry_after(after)?;
        }
        Ok(report)
    }

    /// [`queue_pass::complete`] over this queue.
    ///
    /// # Errors
    ///
    /// A head outside the queue, a used ring outside memory, or a failed interrupt.
    pub fn complete<I>(&mut self, done: I) -> Result<PassReport, DeviceError>
    where
        I: IntoIterator<Item = Completion>,
    {
        let mem = self.mem.memory();
        let ctx = QueueContext {
            index: self.index,
            queue: &mut self.queue,
            mem: &*mem,
            interrupt: &*self.interrupt,
        };
        queue_pass::complete(ctx, done)
    }

    /// Run the queue again after `after` (see `Activation::retry_after`).
    ///
    /// # Errors
    ///
    /// The queue has no retry timer or arming it failed.
    pub fn retry_after(&mut self, after: Duration) -> Result<(), DeviceError> {
        match self.retry_timer.as_mut() {
            Some(t) => t.arm(after).map_err(|e| DeviceError::Backend(Box::new(e))),
            None => Err(DeviceError::Backend("no retry timer for the queue".into())),
        }
    }
}

impl<M: Clone> Activation<M> {
    /// Take queue `index` out (with its retry timer, a clone of the memory handle and of the
    /// interrupt) to serve it apart; the activation keeps a default, not-ready queue there.
    pub fn take_queue(&mut self, index: u16) -> Option<QueueHandle<M>> {
        let i = index as usize;
        let queue = std::mem::take(self.queues.get_mut(i)?);
        let retry_timer = self.retry_timers.get_mut(i).and_then(Option::take);
        Some(QueueHandle {
            index,
            queue,
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            retry_timer,
        })
    }
}

/// A queue's server, tagged with the activation it belongs to.
struct Slot {
    epoch: u64,
    server: Box<dyn QueueServer>,
}

/// The queue servers of one device, one lock per queue, shared by the transport core and the
/// notify worker.
pub struct QueueServers {
    slots: Vec<Mutex<Option<Slot>>>,
    installed: Vec<AtomicBool>,
    epoch: AtomicU64,
    notifies: AtomicU64,
}

/// What [`QueueServers::run`] found.
#[derive(Debug)]
pub enum ServeOutcome {
    /// No server for the queue (not served apart, or dropped by a reset meanwhile).
    NotServed,
    /// The server ran.
    Done,
    /// The server failed; report it with [`crate::TransportCore::server_error`] and this epoch.
    Failed {
        /// The activation the server belonged to.
        epoch: u64,
        /// Its error.
        error: DeviceError,
    },
}

impl QueueServers {
    pub(crate) fn new(queues: usize) -> Self {
        Self {
            slots: (0..queues).map(|_| Mutex::new(None)).collect(),
            installed: (0..queues).map(|_| AtomicBool::new(false)).collect(),
            epoch: AtomicU64::new(0),
            notifies: AtomicU64::new(0),
        }
    }

    fn slot(&self, q: u16) -> Option<MutexGuard<'_, Option<Slot>>> {
        let m = self.slots.get(q as usize)?;
        Some(m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Number of queues.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the device has no queues.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether queue `q` is served apart now.
    pub fn serves(&self, q: u16) -> bool {
        self.installed
            .get(q as usize)
            .is_some_and(|b| b.load(Ordering::Acquire))
    }

    /// The current activation's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Count a driver notification delivered straight to a server (the core adds these to
    /// `TransportMetrics::notifies`).
    pub fn count_notify(&self) {
        self.notifies.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn notifies(&self) -> u64 {
        self.notifies.load(Ordering::Relaxed)
    }

    pub(crate) fn install(&self, servers: Vec<(u16, Box<dyn QueueServer>)>) {
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        for (q, server) in servers {
            if let Some(mut slot) = self.slot(q) {
                *slot = Some(Slot { epoch, server });
                if let Some(b) = self.installed.get(q as usize) {
                    b.store(true, Ordering::Release);
                }
            }
        }
    }

    /// Drop every server, waiting for running ones to finish their pass.
    pub(crate) fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for (q, b) in self.installed.iter().enumerate() {
            b.store(false, Ordering::Release);
            if let Some(mut slot) = self.slot(q as u16) {
                *slot = None;
            }
        }
    }

    /// Run queue `q`'s server, holding only that queue's lock.
    pub fn run(&self, q: u16) -> ServeOutcome {
        let Some(mut guard) = self.slot(q) else {
            return ServeOutcome::NotServed;
        };
        let Some(slot) = guard.as_mut() else {
            return ServeOutcome::NotServed;
        };
        match slot.server.serve() {
            Ok(()) => ServeOutcome::Done,
            Err(error) => ServeOutcome::Failed {
                epoch: slot.epoch,
                error,
            },
        }
    }
}
