//! The transport-agnostic device side: [`VirtioDevice`], the [`VirtioInterrupt`] handle it
//! receives at activation, and [`Activation`], which bundles memory, queues and interrupt and
//! runs the shared queue pass ([`crate::queue_pass`]) so a device only supplies per-chain logic.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::events::{EventSource, RetryTimer};
use crate::memory::VirtioMemory;
use crate::queue_pass::{self, ChainOutcome, Completion, PassReport, QueueContext, Retry};
use crate::queue_server::QueueServer;

/// Why a device interrupts the driver (virtio 1.2 §2.3 / §4.1.4.5 ISR bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InterruptCause {
    /// Used buffers were added to this queue.
    Queue(u16),
    /// The device configuration changed.
    Config,
}

/// What a device raises to notify the driver. Transports implement it (virtio-mmio sets
/// `InterruptStatus` and raises its line; virtio-pci picks the MSI-X vector of the queue).
pub trait VirtioInterrupt: Send + Sync {
    /// Signal the driver.
    fn signal(&self, cause: InterruptCause) -> io::Result<()>;

    /// The eventfd behind `cause`, if it has one (irqfd), for devices that signal from a
    /// worker without calling into the transport.
    fn notifier(&self, _cause: InterruptCause) -> Option<&EventFd> {
        None
    }
}

/// The boxed cause a device attaches to [`DeviceError::Activate`] and [`DeviceError::Backend`]:
/// any error type, kept whole (its own `source()` chain included) so a VMM can log or match
/// the real cause (`downcast_ref`) instead of a flattened message.
pub type BoxedCause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors a device reports to its transport; the transport then sets `DEVICE_NEEDS_RESET` and
/// keeps the error readable (`TransportCore::last_device_error`).
#[derive(Debug, Error)]
pub enum DeviceError {
    /// The device could not start (e.g. a ready queue is unusable).
    #[error("activation failed")]
    Activate(#[source] BoxedCause),
    /// A queue's rings are corrupt (e.g. the available index moved too far).
    #[error("queue {index} failed")]
    Queue {
        /// Queue index.
        index: u16,
        /// The ring error.
        #[source]
        source: virtio_queue::Error,
    },
    /// Signalling the driver failed.
    #[error("interrupt failed")]
    Interrupt(#[source] io::Error),
    /// The backend failed in a way the device cannot report in a request status.
    #[error("backend failed")]
    Backend(#[source] BoxedCause),
}

/// Everything a device gets when the driver sets `DRIVER_OK`.
///
/// `queues[i]` is queue `i` as the driver configured it (ready or not; EVENT_IDX already set
/// from the negotiated features).
pub struct Activation<M = GuestMemoryMmap> {
    /// Guest memory the rings and buffers live in.
    pub mem: M,
    /// One entry per queue the device declared.
    pub queues: Vec<Queue>,
    /// How to notify the driver.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Features the driver accepted (a subset of the device's).
    pub acked_features: u64,
    /// One retry timer per queue (see [`Self::retry_after`]); `None` where none could be made.
    pub(crate) retry_timers: Vec<Option<RetryTimer>>,
}

/// What one pass over a queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueWork {
    /// Chains taken from the available ring and returned to the used ring.
    pub chains: u64,
    /// Interrupts raised (fewer than chains with EVENT_IDX / NO_INTERRUPT).
    pub interrupts: u64,
}

impl<M> Activation<M> {
    /// Run queue `index` again after `after` without a driver notification: arms the queue's
    /// retry timer, an event source the transport declared for it (the notify worker then
    /// wakes the queue). [`Self::run_queue`] calls it for `Retry::After`; a device with its own
    /// loop (a throttled virtio-blk queue) calls it directly.
    ///
    /// # Errors
    ///
    /// [`DeviceError::Backend`] when the queue has no timer or arming it failed (the retry
    /// would never come).
    pub fn retry_after(&mut self, index: u16, after: Duration) -> Result<(), DeviceError> {
        match self.retry_timers.get_mut(index as usize) {
            Some(Some(t)) => t.arm(after).map_err(|e| DeviceError::Backend(Box::new(e))),
            _ => Err(DeviceError::Backend("no retry timer for the queue".into())),
        }
    }
}

impl<M: VirtioMemory> Activation<M> {
    /// Whether feature bit `bit` was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.acked_features & (1 << bit) != 0
    }

    /// Run one [`queue_pass::run`] over queue `index` with `handle` deciding each chain
    /// (used / in flight / retry). A queue that is not ready or does not exist is left alone.
    ///
    /// # Errors
    ///
    /// A corrupt ring or a failed interrupt (see [`queue_pass::run`]).
    pub fn run_queue<F>(&mut self, index: u16, handle: F) -> Result<PassReport, DeviceError>
    where
        F: FnMut(DescriptorChain<&M::Memory>) -> ChainOutcome,
    {
        let Some(queue) = self.queues.get_mut(index as usize) else {
            return Ok(PassReport::default());
        };
        let mem = self.mem.memory();
        let ctx = QueueContext {
            index,
            queue,
            mem: &*mem,
            interrupt: &*self.interrupt,
        };
        let report = queue_pass::run(ctx, handle)?;
        drop(mem);
        if let Some(Retry::After(after)) = report.retry {
            self.retry_after(index, after)?;
        }
        Ok(report)
    }

    /// Put chains that were [`ChainOutcome::InFlight`] on queue `index`'s used ring
    /// ([`queue_pass::complete`]).
    ///
    /// # Errors
    ///
    /// A head outside the queue, a used ring outside memory, or a failed interrupt.
    pub fn complete<I>(&mut self, index: u16, done: I) -> Result<PassReport, DeviceError>
    where
        I: IntoIterator<Item = Completion>,
    {
        let Some(queue) = self.queues.get_mut(index as usize) else {
            return Ok(PassReport::default());
        };
        let mem = self.mem.memory();
        let ctx = QueueContext {
            index,
            queue,
            mem: &*mem,
            interrupt: &*self.interrupt,
        };
        queue_pass::complete(ctx, done)
    }

    /// [`Self::run_queue`] for a device that finishes every chain at once: `handle` returns
    /// the number of bytes it wrote into the chain's writable buffers.
    ///
    /// # Errors
    ///
    /// A corrupt ring or a failed interrupt (see [`queue_pass::run`]).
    pub fn process_queue<F>(&mut self, index: u16, mut handle: F) -> Result<QueueWork, DeviceError>
    where
        F: FnMut(DescriptorChain<&M::Memory>) -> u32,
    {
        let report = self.run_queue(index, |chain| ChainOutcome::Used(handle(chain)))?;
        Ok(QueueWork {
            chains: report.used,
            interrupts: report.interrupts,
        })
    }
}

/// A virtio device, independent of the transport (virtio 1.2 §2, §5).
///
/// A device declares its type, features, queues and configuration space, and reacts to
/// activation, queue notifications and reset. Feature negotiation, the device-status state
/// machine and queue configuration are done once, by the transports' shared core
/// ([`crate::TransportCore`]); a device never sees an illegal driver sequence.
///
/// ```
/// use vmkit_virtio::{Activation, DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
///
/// /// A device with one queue that returns every buffer unwritten.
/// #[derive(Default)]
/// struct Sink(Option<Activation>);
///
/// impl VirtioDevice for Sink {
///     fn device_type(&self) -> u32 { 42 }
///     fn device_features(&self) -> u64 { 1 << VIRTIO_F_VERSION_1 }
///     fn queue_max_sizes(&self) -> &[u16] { &[16] }
///     fn activate(&mut self, a: Activation) -> Result<(), DeviceError> {
///         self.0 = Some(a);
///         Ok(())
///     }
///     fn queue_notify(&mut self, queue: u16) -> Result<(), DeviceError> {
///         if let Some(a) = &mut self.0 {
///             a.process_queue(queue, |_chain| 0)?;
///         }
///         Ok(())
///     }
///     fn reset(&mut self) { self.0 = None }
/// }
///
/// let mut h = vmkit_virtio::test_utils::DriverHarness::new(Sink::default());
/// h.activate(1 << VIRTIO_F_VERSION_1).unwrap();
/// let chain = h.add_chain(0, &[vmkit_virtio::test_utils::Desc::Writable(8)]).unwrap();
/// h.kick(0);
/// assert_eq!(h.used(0), [(chain.head, 0)]);
/// ```
pub trait VirtioDevice<M = GuestMemoryMmap>: Send {
    /// Device ID (virtio 1.2 §5, e.g. 4 for an entropy device).
    fn device_type(&self) -> u32;

    /// Feature bits the device offers (device-specific and transport bits such as
    /// `VIRTIO_F_VERSION_1`, which modern transports require).
    fn device_features(&self) -> u64;

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The device configuration space as bytes (little-endian fields), if the device keeps it
    /// as a byte image. The default [`VirtioDevice::read_config`] serves reads from it.
    fn config_space(&self) -> &[u8] {
        &[]
    }

    /// A driver read of the configuration space at `offset`. Bytes outside the space read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let space = self.config_space();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = space.get(start..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    /// A driver write to the configuration space. The default ignores it (read-only config).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// The driver set `DRIVER_OK`: start serving the queues.
    fn activate(&mut self, activation: Activation<M>) -> Result<(), DeviceError>;

    /// The driver notified queue `queue` (available buffers). Called only after activation and
    /// only for existing queues. An error makes the transport set `DEVICE_NEEDS_RESET`.
    fn queue_notify(&mut self, queue: u16) -> Result<(), DeviceError>;

    /// The driver reset the device: drop the activation and return to the initial state.
    fn reset(&mut self);

    /// The device's own event sources (completion eventfds, tap fds, timers), asked once right
    /// after a successful [`Self::activate`]; the transport publishes them, with a retry timer
    /// per queue, for the notify worker to serve (see [`crate::events`]) and drops them at
    /// reset. The default declares none.
    fn event_sources(&self) -> Vec<EventSource> {
        Vec::new()
    }

    /// Queues the device serves apart from the transport lock (see [`crate::queue_server`]),
    /// asked once right after a successful [`Self::activate`] (take each queue out with
    /// [`Activation::take_queue`]). Notifications of these queues go to their server instead
    /// of [`Self::queue_notify`]. The default serves none apart.
    fn queue_servers(&mut self) -> Vec<(u16, Box<dyn QueueServer>)> {
        Vec::new()
    }

    /// A declared source with `EventAction::Device(token)` fired. Called only while active.
    /// An error makes the transport set `DEVICE_NEEDS_RESET`. The default ignores it.
    fn handle_event(&mut self, _token: u32) -> Result<(), DeviceError> {
        Ok(())
    }
}
