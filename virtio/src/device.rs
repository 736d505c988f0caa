//! The transport-agnostic device side: [`VirtioDevice`], the [`VirtioInterrupt`] handle it
//! receives at activation, and [`Activation`], which bundles memory, queues and interrupt and
//! runs the queue-processing loop (EVENT_IDX aware) so a device only supplies per-chain logic.

use std::io;
use std::num::Wrapping;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use thiserror::Error;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

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
}

/// What one pass over a queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueWork {
    /// Chains taken from the available ring and returned to the used ring.
    pub chains: u64,
    /// Interrupts raised (fewer than chains with EVENT_IDX / NO_INTERRUPT).
    pub interrupts: u64,
}

impl<M: GuestMemory> Activation<M> {
    /// Whether feature bit `bit` was negotiated.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.acked_features & (1 << bit) != 0
    }

    /// Take every available chain of queue `index`, hand it to `handle` (which returns the
    /// number of bytes it wrote into the chain's writable buffers), put it on the used ring and
    /// signal the driver when the ring's suppression rules (EVENT_IDX or NO_INTERRUPT) ask for
    /// it. A queue that is not ready or does not exist is left alone.
    pub fn process_queue<F>(&mut self, index: u16, mut handle: F) -> Result<QueueWork, DeviceError>
    where
        F: FnMut(DescriptorChain<&M>) -> u32,
    {
        let mut work = QueueWork::default();
        let Some(queue) = self.queues.get_mut(index as usize) else {
            return Ok(work);
        };
        if !queue.ready() {
            return Ok(work);
        }
        let qerr = |source| DeviceError::Queue { index, source };
        let mem = &self.mem;
        let mut idle_passes = 0;
        loop {
            queue.disable_notification(mem).map_err(qerr)?;
            // A driver that moved `avail.idx` more than a ring ahead corrupted the queue
            // (virtio-queue would just yield nothing, forever).
            let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(qerr)?;
            if (avail - Wrapping(queue.next_avail())).0 > queue.size() {
                return Err(qerr(virtio_queue::Error::InvalidAvailRingIndex));
            }
            let mut added = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = handle(chain);
                queue.add_used(mem, head, len).map_err(qerr)?;
                work.chains += 1;
                added = true;
            }
            if added && queue.needs_notification(mem).map_err(qerr)? {
                self.interrupt
                    .signal(InterruptCause::Queue(index))
                    .map_err(DeviceError::Interrupt)?;
                work.interrupts += 1;
            }
            // Re-enable notifications; if the driver added chains meanwhile, go again. Two
            // passes in a row that find nothing to pop (a head the ring cannot yield) end it.
            idle_passes = if added { 0 } else { idle_passes + 1 };
            if !queue.enable_notification(mem).map_err(qerr)? || idle_passes > 1 {
                break;
            }
        }
        Ok(work)
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
}
