//! virtio-mmio version 2 (virtio 1.2 §4.2): a [`MutBusDevice`] whose registers decode into calls
//! on the shared [`TransportCore`].
//!
//! Register decoding is a pure function ([`MmioRegister::decode`]) so it can be fuzzed and
//! table-tested apart from its effects. Registers below 0x100 take aligned 32-bit accesses
//! only; anything else is ignored, counted, and reads as 0.
//!
//! Queue notifications arrive either as a trapped write to `QueueNotify` (the plain-exit
//! path) or through an ioeventfd on that address with the queue index as datamatch
//! ([`MmioTransport::notify_addresses`], [`crate::notify`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use vm_memory::GuestMemoryMmap;
use vmkit_devices::{InterruptSource, MutBusDevice};

use crate::core::{Ring, TransportCore, TransportMetrics};
use crate::device::{InterruptCause, VirtioDevice, VirtioInterrupt};
use crate::memory::VirtioMemory;
use crate::persist::{MmioTransportState, StateError};
use crate::spec::*;

/// Size of the register window of one virtio-mmio device.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the device configuration space.
pub const VIRTIO_MMIO_CONFIG: u64 = 0x100;
/// Offset of `QueueNotify`.
pub const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x050;
/// `VendorID` this transport reports.
pub const VIRTIO_MMIO_VENDOR_ID: u32 = VIRTIO_PCI_VENDOR_ID as u32;

/// One virtio-mmio register (virtio 1.2 table 4.1), named as in the spec.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioRegister {
    MagicValue,
    Version,
    DeviceId,
    VendorId,
    DeviceFeatures,
    DeviceFeaturesSel,
    DriverFeatures,
    DriverFeaturesSel,
    QueueSel,
    QueueNumMax,
    QueueNum,
    QueueReady,
    QueueNotify,
    InterruptStatus,
    InterruptAck,
    Status,
    QueueDescLow,
    QueueDescHigh,
    QueueDriverLow,
    QueueDriverHigh,
    QueueDeviceLow,
    QueueDeviceHigh,
    ShmSel,
    ShmLenLow,
    ShmLenHigh,
    ShmBaseLow,
    ShmBaseHigh,
    QueueReset,
    ConfigGeneration,
    /// Device configuration space at this offset from 0x100.
    Config(u64),
}

/// A register access the transport ignores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MmioError {
    /// Not a register offset (or beyond the window).
    #[error("no register at {0:#x}")]
    Offset(u64),
    /// A register below 0x100 accessed with a width other than 4 or misaligned.
    #[error("bad access width {len} at {offset:#x}")]
    Width {
        /// Offset.
        offset: u64,
        /// Access size.
        len: usize,
    },
}

impl MmioRegister {
    /// Decode an access of `len` bytes at `offset` in the window.
    pub fn decode(offset: u64, len: usize) -> Result<Self, MmioError> {
        use MmioRegister::*;
        if offset >= VIRTIO_MMIO_CONFIG {
            let end = offset
                .checked_add(len as u64)
                .ok_or(MmioError::Offset(offset))?;
            if end > MMIO_WINDOW_SIZE {
                return Err(MmioError::Offset(offset));
            }
            return Ok(Config(offset - VIRTIO_MMIO_CONFIG));
        }
        if len != 4 || !offset.is_multiple_of(4) {
            return Err(MmioError::Width { offset, len });
        }
        Ok(match offset {
            0x000 => MagicValue,
            0x004 => Version,
            0x008 => DeviceId,
            0x00c => VendorId,
            0x010 => DeviceFeatures,
            0x014 => DeviceFeaturesSel,
            0x020 => DriverFeatures,
            0x024 => DriverFeaturesSel,
            0x030 => QueueSel,
            0x034 => QueueNumMax,
            0x038 => QueueNum,
            0x044 => QueueReady,
            0x050 => QueueNotify,
            0x060 => InterruptStatus,
            0x064 => InterruptAck,
            0x070 => Status,
            0x080 => QueueDescLow,
            0x084 => QueueDescHigh,
            0x090 => QueueDriverLow,
            0x094 => QueueDriverHigh,
            0x0a0 => QueueDeviceLow,
            0x0a4 => QueueDeviceHigh,
            0x0ac => ShmSel,
            0x0b0 => ShmLenLow,
            0x0b4 => ShmLenHigh,
            0x0b8 => ShmBaseLow,
            0x0bc => ShmBaseHigh,
            0x0c0 => QueueReset,
            0x0fc => ConfigGeneration,
            _ => return Err(MmioError::Offset(offset)),
        })
    }
}

/// The virtio-mmio interrupt: sets `InterruptStatus` bits and raises the device's line.
pub struct MmioInterrupt {
    status: Arc<AtomicU32>,
    line: Arc<dyn InterruptSource>,
}

impl VirtioInterrupt for MmioInterrupt {
    fn signal(&self, cause: InterruptCause) -> std::io::Result<()> {
        let bit = match cause {
            InterruptCause::Queue(_) => VIRTIO_MMIO_INT_VRING,
            InterruptCause::Config => VIRTIO_MMIO_INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.line.trigger()
    }
    fn notifier(&self, _cause: InterruptCause) -> Option<&vmm_sys_util::eventfd::EventFd> {
        self.line.notifier()
    }
}

/// A virtio device behind a virtio-mmio v2 register window. Register it on the MMIO bus inside
/// a `Mutex` (it is a [`MutBusDevice`]) with length [`MMIO_WINDOW_SIZE`].
///
/// ```
/// use std::sync::Arc;
/// use vmkit_devices::{MutBusDevice, interrupt::RecordingInterrupt};
/// use vmkit_virtio::{mmio::MmioTransport, rng::Rng};
///
/// let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
/// let mut t = MmioTransport::new(Rng::default(), mem, Arc::new(RecordingInterrupt::default()));
/// let mut v = [0u8; 4];
/// t.read(0x0, &mut v);
/// assert_eq!(&v, b"virt");
/// t.read(0x8, &mut v);
/// assert_eq!(u32::from_le_bytes(v), 4); // entropy device
/// ```
pub struct MmioTransport<D, M = GuestMemoryMmap> {
    core: TransportCore<D, M>,
    interrupt_status: Arc<AtomicU32>,
}

impl<D, M> MmioTransport<D, M>
where
    D: VirtioDevice<M>,
    M: VirtioMemory,
{
    /// `device` with its queues in `mem`, interrupting through `line`.
    pub fn new(device: D, mem: M, line: Arc<dyn InterruptSource>) -> Self {
        let interrupt_status = Arc::new(AtomicU32::new(0));
        let irq = MmioInterrupt {
            status: interrupt_status.clone(),
            line,
        };
        Self {
            core: TransportCore::new(device, mem, Arc::new(irq)),
            interrupt_status,
        }
    }

    /// The transport state (see [`crate::persist`]); take it from a quiescent device.
    pub fn save(&self) -> MmioTransportState {
        MmioTransportState {
            core: self.core.save(),
            interrupt_status: self.interrupt_status.load(Ordering::Acquire),
        }
    }

    /// Restore `state` into this fresh transport (around a freshly built device).
    ///
    /// # Errors
    ///
    /// See [`TransportCore::restore`].
    pub fn restore(&mut self, state: &MmioTransportState) -> Result<(), StateError> {
        self.core.restore(&state.core)?;
        self.interrupt_status
            .store(state.interrupt_status, Ordering::Release);
        Ok(())
    }

    /// The shared transport core (status, features, queues, device).
    pub fn core(&self) -> &TransportCore<D, M> {
        &self.core
    }

    /// The shared transport core, mutably.
    pub fn core_mut(&mut self) -> &mut TransportCore<D, M> {
        &mut self.core
    }

    /// The device.
    pub fn device(&self) -> &D {
        self.core.device()
    }

    /// Counters.
    pub fn metrics(&self) -> TransportMetrics {
        self.core.metrics()
    }

    /// `InterruptStatus`.
    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status.load(Ordering::Acquire)
    }

    /// Deliver a queue notification (what an ioeventfd worker calls).
    pub fn notify_queue(&mut self, index: u16) {
        self.core.notify(index);
    }

    /// Run queue `index` for the device's own event (a completion eventfd: what
    /// `NotifyWorker::spawn_with_wakeups` calls); not counted as a driver notification.
    pub fn wake_queue(&mut self, index: u16) {
        self.core.wake(index);
    }

    /// Where queue notifications land for a window at `base`: `(address, datamatch, queue)`
    /// for each queue, for ioeventfd registration (4-byte writes of the queue index).
    pub fn notify_addresses(&self, base: u64) -> Vec<(u64, Option<u32>, u16)> {
        (0..self.core.num_queues())
            .map(|q| (base + VIRTIO_MMIO_QUEUE_NOTIFY, Some(q as u32), q))
            .collect()
    }

    fn read_register(&self, reg: MmioRegister) -> u32 {
        use MmioRegister::*;
        let c = &self.core;
        match reg {
            MagicValue => VIRTIO_MMIO_MAGIC,
            Version => VIRTIO_MMIO_VERSION_2,
            DeviceId => c.device().device_type(),
            VendorId => VIRTIO_MMIO_VENDOR_ID,
            DeviceFeatures => c.device_features(),
            QueueNumMax => c.queue_max_size() as u32,
            QueueReady => c.queue_ready() as u32,
            InterruptStatus => self.interrupt_status(),
            Status => c.status() as u32,
            QueueDescLow => c.queue_address(Ring::Descriptors) as u32,
            QueueDescHigh => (c.queue_address(Ring::Descriptors) >> 32) as u32,
            QueueDriverLow => c.queue_address(Ring::Driver) as u32,
            QueueDriverHigh => (c.queue_address(Ring::Driver) >> 32) as u32,
            QueueDeviceLow => c.queue_address(Ring::Device) as u32,
            QueueDeviceHigh => (c.queue_address(Ring::Device) >> 32) as u32,
            // No shared memory regions: length reads as all-ones (virtio 1.2 §4.2.2).
            ShmLenLow | ShmLenHigh | ShmBaseLow | ShmBaseHigh => u32::MAX,
            ConfigGeneration => c.config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, reg: MmioRegister, v: u32) -> bool {
        use MmioRegister::*;
        let c = &mut self.core;
        match reg {
            DeviceFeaturesSel => c.set_device_features_select(v),
            DriverFeatures => c.write_driver_features(v),
            DriverFeaturesSel => c.set_driver_features_select(v),
            QueueSel => c.set_queue_select(v as u16),
            QueueNum => match u16::try_from(v) {
                Ok(n) => c.set_queue_size(n),
                Err(_) => c.set_queue_size(0),
            },
            QueueReady => c.set_queue_ready(v == 1),
            QueueNotify => c.trapped_notify(u16::try_from(v).unwrap_or(u16::MAX)),
            InterruptAck => {
                self.interrupt_status.fetch_and(!v, Ordering::AcqRel);
            }
            Status => {
                c.set_status(v as u8);
                if v == 0 {
                    self.interrupt_status.store(0, Ordering::Release);
                }
            }
            QueueDescLow => c.set_queue_address_half(Ring::Descriptors, false, v),
            QueueDescHigh => c.set_queue_address_half(Ring::Descriptors, true, v),
            QueueDriverLow => c.set_queue_address_half(Ring::Driver, false, v),
            QueueDriverHigh => c.set_queue_address_half(Ring::Driver, true, v),
            QueueDeviceLow => c.set_queue_address_half(Ring::Device, false, v),
            QueueDeviceHigh => c.set_queue_address_half(Ring::Device, true, v),
            ShmSel => {}
            _ => return false,
        }
        true
    }
}

impl<D, M> MutBusDevice for MmioTransport<D, M>
where
    D: VirtioDevice<M>,
    M: VirtioMemory,
{
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match MmioRegister::decode(offset, data.len()) {
            Ok(MmioRegister::Config(off)) => self.core.read_config(off, data),
            Ok(reg) => data.copy_from_slice(&self.read_register(reg).to_le_bytes()),
            Err(_) => self.core.count_bad_access(),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match MmioRegister::decode(offset, data.len()) {
            Ok(MmioRegister::Config(off)) => self.core.write_config(off, data),
            Ok(reg) => {
                let mut b = [0u8; 4];
                b.copy_from_slice(data);
                if !self.write_register(reg, u32::from_le_bytes(b)) {
                    self.core.count_bad_access();
                }
            }
            Err(_) => self.core.count_bad_access(),
        }
    }
}

// Notifications from the notify worker (ioeventfds, wake-ups, device events, queue servers).
impl<D, M> crate::notify::QueueNotify for MmioTransport<D, M>
where
    D: VirtioDevice<M>,
    M: VirtioMemory,
{
    fn notify_queue(&mut self, index: u16) {
        MmioTransport::notify_queue(self, index)
    }
    fn wake_queue(&mut self, index: u16) {
        MmioTransport::wake_queue(self, index)
    }
    fn device_event(&mut self, token: u32) {
        self.core_mut().device_event(token)
    }
    fn device_events(&self) -> Option<Arc<crate::events::DeviceEvents>> {
        self.core().device_events()
    }
    fn queue_servers(&self) -> Option<Arc<crate::queue_server::QueueServers>> {
        Some(self.core().queue_servers())
    }
    fn server_error(&mut self, epoch: u64, error: crate::DeviceError) {
        self.core_mut().server_error(epoch, error)
    }
}
