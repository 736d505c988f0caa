//! virtio-pci, modern interface (virtio 1.2 §4.1), on vmkit-devices' [`PciFunction`].
//!
//! BAR 0 (64-bit memory, [`VIRTIO_PCI_BAR_SIZE`]) holds every structure, each announced by a
//! vendor-specific capability:
//!
//! | offset | structure | capability |
//! |---|---|---|
//! | 0x0000 | common configuration | `VIRTIO_PCI_CAP_COMMON_CFG` |
//! | 0x1000 | ISR status (read clears) | `VIRTIO_PCI_CAP_ISR_CFG` |
//! | 0x2000 | device configuration | `VIRTIO_PCI_CAP_DEVICE_CFG` |
//! | 0x3000 | notify doorbells, queue *n* at `n * 4` | `VIRTIO_PCI_CAP_NOTIFY_CFG` (multiplier 4) |
//! | 0x4000 / 0x6000 | MSI-X table / PBA | MSI-X capability |
//! | — (config space) | window into BAR 0 | `VIRTIO_PCI_CAP_PCI_CFG` |
//!
//! The `VIRTIO_PCI_CAP_PCI_CFG` capability (virtio 1.2 §4.1.4.9, `struct virtio_pci_cfg_cap`)
//! reaches BAR 0 through configuration space, whether or not the BAR is programmed or
//! decoded: the driver writes `cap.bar`, `cap.offset` and `cap.length`, then a read of
//! `pci_cfg_data` performs a BAR read of `cap.length` bytes at `cap.offset` and stores them in
//! `pci_cfg_data`, and a write to it performs a BAR write of its first `cap.length` bytes — the
//! same [`PciFunction::bar_read`] / [`PciFunction::bar_write`] a memory access takes, with the
//! same side effects (ISR read clears, doorbells, MSI-X table). A driver access of any width to
//! any byte of `pci_cfg_data` triggers one whole `cap.length` access (as QEMU does). The window
//! acts only for `cap.bar == 0`, `cap.length` 1, 2 or 4, `cap.offset` a multiple of it and the
//! range inside the BAR; otherwise `pci_cfg_data` is a plain register (a read returns what it
//! holds, a write only stores) and the access counts in
//! [`TransportMetrics::bad_register_accesses`]. (QEMU instead rounds a misaligned offset down,
//! ignores `cap.bar` and only reaches the virtio structures, not the MSI-X table; the spec
//! forbids drivers all of these cases, §4.1.4.9.2.)
//!
//! Common-configuration accesses decode through the pure [`CommonCfgField::decode`] into calls on
//! the shared [`TransportCore`]. Queue and configuration interrupts go to the MSI-X vectors the
//! driver assigned (an irqfd when the [`Msix`] has one attached, `KVM_SIGNAL_MSI` otherwise);
//! doorbells arrive as trapped BAR writes or through ioeventfds on
//! [`VirtioPciTransport::notify_addresses`].
//!
//! ## INTx (legacy interrupt line)
//!
//! With a line wired ([`VirtioPciTransport::with_intx`], e.g. an I/O APIC pin through
//! [`IoapicLine`](vmkit_devices::ioapic::IoapicLine)) the function reports INTA# in the
//! Interrupt Pin register (0x3d; 0 without a line) and, while MSI-X is disabled, notifies
//! through it (virtio 1.2 §4.1.5.3, §4.1.5.4): a used-buffer notification sets ISR bit 0
//! (`VIRTIO_PCI_ISR_QUEUE`), a configuration change bit 1 (`VIRTIO_PCI_ISR_CONFIG`), and the
//! line is asserted. A driver read of the ISR byte returns the bits, clears them and
//! deasserts the line (§4.1.4.5); a device reset deasserts it. PCI 3.0 rules: the Interrupt
//! Line register (0x3c) is a scratch byte for the driver; the command register's Interrupt
//! Disable bit (bit 10) holds the line low while set, the status register's Interrupt Status
//! bit (bit 3) still showing the pending interrupt, and clearing it raises the line again if
//! the interrupt is still pending; enabling MSI-X ends INTx use and drops the line (§6.8.3.3).
//! With MSI-X enabled a notification goes to its vector only (none for
//! `VIRTIO_MSI_NO_VECTOR`); the ISR bit is set in every mode, as QEMU does. Only a 1-byte
//! read of the ISR byte is an ISR access: other widths or offsets in the ISR structure read 0,
//! clear nothing and count in [`TransportMetrics::bad_register_accesses`], as do writes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use vm_memory::GuestMemoryMmap;
use vmkit_devices::pci::{
    BarKind, ConfigSpace, Msix, MsixConfig, MsixVector, PciError, PciFunction, PciHeader, cap_id,
    command, reg, status,
};
use vmkit_devices::{InterruptSource, IrqLine};
use vmm_sys_util::eventfd::EventFd;

use crate::core::{Ring, TransportCore, TransportMetrics};
use crate::device::{InterruptCause, VirtioDevice, VirtioInterrupt};
use crate::intx::Intx;
use crate::memory::VirtioMemory;
use crate::persist::{PciTransportState, StateError};
use crate::spec::common_cfg::*;
use crate::spec::*;

/// The BAR holding all virtio structures and the MSI-X table.
pub const VIRTIO_PCI_BAR: u8 = 0;
/// Its size.
pub const VIRTIO_PCI_BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration structure.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Length of the common configuration structure (virtio 1.2 §4.1.4.3, up to `queue_reset`).
pub const COMMON_CFG_LEN: u64 = VIRTIO_PCI_COMMON_CFG_LEN;

/// Last byte of each 64-bit ring address field (its high half starts 4 bytes in).
const VIRTIO_PCI_COMMON_Q_DESCHI_END: u64 = VIRTIO_PCI_COMMON_Q_DESCHI + 3;
const VIRTIO_PCI_COMMON_Q_AVAILHI_END: u64 = VIRTIO_PCI_COMMON_Q_AVAILHI + 3;
const VIRTIO_PCI_COMMON_Q_USEDHI_END: u64 = VIRTIO_PCI_COMMON_Q_USEDHI + 3;
/// Offset of the ISR status byte.
pub const ISR_CFG_OFFSET: u64 = 0x1000;
/// Offset of the device configuration.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Length of the device configuration window.
pub const DEVICE_CFG_LEN: u64 = 0x1000;
/// Offset of the notification doorbells.
pub const NOTIFY_CFG_OFFSET: u64 = 0x3000;
/// `notify_off_multiplier`: each queue has its own 4-byte doorbell.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table.
pub const MSIX_TABLE_OFFSET: u32 = 0x4000;
/// Offset of the MSI-X PBA.
pub const MSIX_PBA_OFFSET: u32 = 0x6000;

/// `cap_len` of `struct virtio_pci_cfg_cap`: a `struct virtio_pci_cap` plus `pci_cfg_data[4]`.
const PCI_CFG_CAP_LEN: u8 = 20;
/// Offsets in `struct virtio_pci_cap` (from `cap_vndr`) of the fields the driver may write in
/// the `VIRTIO_PCI_CAP_PCI_CFG` capability, and of `pci_cfg_data` after it (virtio 1.2 §4.1.4).
const CAP_BAR: u16 = 4;
const CAP_OFFSET: u16 = 8;
const CAP_LENGTH: u16 = 12;
const CAP_PCI_CFG_DATA: u16 = 16;

/// The BAR access a `VIRTIO_PCI_CAP_PCI_CFG` window describes (virtio 1.2 §4.1.4.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PciCfgWindow {
    /// `cap.bar`.
    pub bar: u8,
    /// `cap.offset`.
    pub offset: u32,
    /// `cap.length`.
    pub length: u32,
}

impl PciCfgWindow {
    /// `(offset, len)` of the BAR 0 access, or `None` when the window does not act: a BAR other
    /// than [`VIRTIO_PCI_BAR`], a length other than 1, 2 or 4, an offset not a multiple of the
    /// length, or a range not inside the BAR.
    pub fn target(self) -> Option<(u64, usize)> {
        let len = match self.length {
            1 | 2 | 4 => self.length as usize,
            _ => return None,
        };
        if self.bar != VIRTIO_PCI_BAR || !self.offset.is_multiple_of(self.length) {
            return None;
        }
        let offset = u64::from(self.offset);
        let end = offset.checked_add(len as u64)?;
        (end <= VIRTIO_PCI_BAR_SIZE).then_some((offset, len))
    }
}

/// A field of `struct virtio_pci_common_cfg` (virtio 1.2 §4.1.4.3), with the part accessed.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommonCfgField {
    DeviceFeatureSelect,
    DeviceFeature,
    DriverFeatureSelect,
    DriverFeature,
    ConfigMsixVector,
    NumQueues,
    DeviceStatus,
    ConfigGeneration,
    QueueSelect,
    QueueSize,
    QueueMsixVector,
    QueueEnable,
    QueueNotifyOff,
    /// A ring address; `high` for the upper 32 bits, `whole` for a 64-bit access.
    QueueAddress {
        ring: Ring,
        high: bool,
        whole: bool,
    },
    QueueNotifyData,
    QueueReset,
}

/// A common-configuration access the transport ignores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad common-config access of {len} bytes at {offset:#x}")]
pub struct CommonCfgError {
    /// Offset in the structure.
    pub offset: u64,
    /// Access size.
    pub len: usize,
}

impl CommonCfgField {
    /// Decode an access of `len` bytes at `offset`: it must cover exactly one field (64-bit
    /// ring addresses may also be accessed as two 32-bit halves).
    pub fn decode(offset: u64, len: usize) -> Result<Self, CommonCfgError> {
        use CommonCfgField::*;
        let err = CommonCfgError { offset, len };
        let addr = |ring, base: u64| match (offset - base, len) {
            (0, 8) => Ok(QueueAddress {
                ring,
                high: false,
                whole: true,
            }),
            (0, 4) => Ok(QueueAddress {
                ring,
                high: false,
                whole: false,
            }),
            (4, 4) => Ok(QueueAddress {
                ring,
                high: true,
                whole: false,
            }),
            _ => Err(err),
        };
        let (field, width) = match offset {
            VIRTIO_PCI_COMMON_DFSELECT => (DeviceFeatureSelect, 4),
            VIRTIO_PCI_COMMON_DF => (DeviceFeature, 4),
            VIRTIO_PCI_COMMON_GFSELECT => (DriverFeatureSelect, 4),
            VIRTIO_PCI_COMMON_GF => (DriverFeature, 4),
            VIRTIO_PCI_COMMON_MSIX => (ConfigMsixVector, 2),
            VIRTIO_PCI_COMMON_NUMQ => (NumQueues, 2),
            VIRTIO_PCI_COMMON_STATUS => (DeviceStatus, 1),
            VIRTIO_PCI_COMMON_CFGGENERATION => (ConfigGeneration, 1),
            VIRTIO_PCI_COMMON_Q_SELECT => (QueueSelect, 2),
            VIRTIO_PCI_COMMON_Q_SIZE => (QueueSize, 2),
            VIRTIO_PCI_COMMON_Q_MSIX => (QueueMsixVector, 2),
            VIRTIO_PCI_COMMON_Q_ENABLE => (QueueEnable, 2),
            VIRTIO_PCI_COMMON_Q_NOFF => (QueueNotifyOff, 2),
            VIRTIO_PCI_COMMON_Q_DESCLO..=VIRTIO_PCI_COMMON_Q_DESCHI_END => {
                return addr(Ring::Descriptors, VIRTIO_PCI_COMMON_Q_DESCLO);
            }
            VIRTIO_PCI_COMMON_Q_AVAILLO..=VIRTIO_PCI_COMMON_Q_AVAILHI_END => {
                return addr(Ring::Driver, VIRTIO_PCI_COMMON_Q_AVAILLO);
            }
            VIRTIO_PCI_COMMON_Q_USEDLO..=VIRTIO_PCI_COMMON_Q_USEDHI_END => {
                return addr(Ring::Device, VIRTIO_PCI_COMMON_Q_USEDLO);
            }
            VIRTIO_PCI_COMMON_Q_NDATA => (QueueNotifyData, 2),
            VIRTIO_PCI_COMMON_Q_RESET => (QueueReset, 2),
            _ => return Err(err),
        };
        if len != width {
            return Err(err);
        }
        Ok(field)
    }
}

/// MSI-X vector assignments (virtio 1.2 §4.1.5.1.2), shared with the interrupt handle.
struct Vectors {
    config: AtomicU16,
    queues: Vec<AtomicU16>,
}

impl Vectors {
    fn reset(&self) {
        self.config.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for q in &self.queues {
            q.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
    }
}

/// The virtio-pci interrupt: sets the ISR bit and asserts INTx (MSI-X disabled, a line wired)
/// or signals the assigned MSI-X vector.
struct PciInterrupt {
    intx: Arc<Intx>,
    vectors: Arc<Vectors>,
    msix: Vec<MsixVector>,
    msix_state: Msix,
}

impl PciInterrupt {
    fn vector(&self, cause: InterruptCause) -> u16 {
        match cause {
            InterruptCause::Config => self.vectors.config.load(Ordering::Acquire),
            InterruptCause::Queue(q) => self
                .vectors
                .queues
                .get(q as usize)
                .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire)),
        }
    }
}

impl VirtioInterrupt for PciInterrupt {
    fn signal(&self, cause: InterruptCause) -> std::io::Result<()> {
        let bit = match cause {
            InterruptCause::Queue(_) => VIRTIO_PCI_ISR_QUEUE,
            InterruptCause::Config => VIRTIO_PCI_ISR_CONFIG,
        };
        if self.intx.notify(bit, || self.msix_state.enabled()) {
            return Ok(());
        }
        match self.msix.get(self.vector(cause) as usize) {
            Some(v) => v.trigger(),
            // No vector (or no line with MSI-X disabled): the ISR bit stays set.
            None => Ok(()),
        }
    }
    /// The vector's irqfd; none while notifications go out as INTx (the device must then call
    /// [`VirtioInterrupt::signal`]), so ask again for each notification.
    fn notifier(&self, cause: InterruptCause) -> Option<&EventFd> {
        if self.intx.wired() && !self.msix_state.enabled() {
            return None;
        }
        self.msix.get(self.vector(cause) as usize)?.notifier()
    }
}

/// A virtio device as a PCI function (modern virtio-pci). Add it to a
/// [`PciRoot`](vmkit_devices::pci::PciRoot) inside a `Mutex`.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use vmkit_devices::{IoBuses, msi::RecordingMsiSink, pci::{PciFunction, PciRoot}};
/// use vmkit_virtio::{pci::VirtioPciTransport, rng::Rng};
///
/// let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
/// let msix = VirtioPciTransport::<Rng>::msix_for(&Rng::default(), Arc::new(RecordingMsiSink::default())).unwrap();
/// let mut f = VirtioPciTransport::new(Rng::default(), mem, msix).unwrap();
/// let mut id = [0u8; 4];
/// f.config_read(0, &mut id);
/// assert_eq!(u32::from_le_bytes(id), 0x1044_1af4); // virtio-rng
/// ```
pub struct VirtioPciTransport<D, M = GuestMemoryMmap> {
    core: TransportCore<D, M>,
    cfg: ConfigSpace,
    msix: Msix,
    intx: Arc<Intx>,
    vectors: Arc<Vectors>,
    /// Where the `VIRTIO_PCI_CAP_PCI_CFG` capability is in configuration space.
    pci_cfg_cap: u16,
}

impl<D, M> VirtioPciTransport<D, M>
where
    D: VirtioDevice<M>,
    M: VirtioMemory,
{
    /// The MSI-X layout for `device` (one vector per queue plus one for configuration changes),
    /// delivering through `sink`. Attach irqfds to it (e.g. `KvmIrqRouter::attach_msix`) before
    /// passing it to [`Self::new`].
    pub fn msix_for(
        device: &D,
        sink: Arc<dyn vmkit_devices::msi::MsiSink>,
    ) -> Result<Msix, PciError> {
        let vectors = (device.queue_max_sizes().len() + 1).min(256) as u16;
        Msix::new(
            MsixConfig {
                vectors,
                table_bar: VIRTIO_PCI_BAR,
                table_offset: MSIX_TABLE_OFFSET,
                pba_bar: VIRTIO_PCI_BAR,
                pba_offset: MSIX_PBA_OFFSET,
            },
            sink,
        )
    }

    /// `device` with its queues in `mem`, interrupting through `msix` (see [`Self::msix_for`]).
    pub fn new(device: D, mem: M, msix: Msix) -> Result<Self, PciError> {
        let ty = device.device_type();
        let num_queues = device.queue_max_sizes().len();
        let header = PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(ty as u16),
            revision_id: 1,
            class_code: 0xff,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x40,
            ..Default::default()
        };
        let mut cfg = ConfigSpace::conventional(&header);
        cfg.add_bar(
            VIRTIO_PCI_BAR,
            BarKind::Memory64 {
                prefetchable: false,
            },
            VIRTIO_PCI_BAR_SIZE,
        )?;
        let notify_len = (num_queues as u64 * NOTIFY_OFF_MULTIPLIER as u64).max(4);
        for (ty, offset, len) in [
            (VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_LEN),
            (VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, 4),
            (VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN),
            (VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_CFG_OFFSET, notify_len),
        ] {
            cfg.add_capability(
                cap_id::VENDOR_SPECIFIC,
                &virtio_pci_cap(ty, offset, len),
                &[],
            )?;
        }
        // `struct virtio_pci_cfg_cap`: bar/offset/length 0 until the driver sets them;
        // `cap.bar`, `cap.offset`, `cap.length` and `pci_cfg_data` are read-write.
        let mut wmask = [0u8; PCI_CFG_CAP_LEN as usize - 2];
        wmask[CAP_BAR as usize - 2] = 0xff;
        wmask[CAP_OFFSET as usize - 2..].fill(0xff);
        let pci_cfg_cap = cfg.add_capability(
            cap_id::VENDOR_SPECIFIC,
            &virtio_pci_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0),
            &wmask,
        )?;
        cfg.add_msix(&msix)?;
        let vectors = Arc::new(Vectors {
            config: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queues: (0..num_queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
        });
        let intx = Arc::new(Intx::default());
        let interrupt = PciInterrupt {
            intx: intx.clone(),
            vectors: vectors.clone(),
            msix: (0..msix.config().vectors).map(|v| msix.vector(v)).collect(),
            msix_state: msix.clone(),
        };
        Ok(Self {
            core: TransportCore::new(device, mem, Arc::new(interrupt)),
            cfg,
            msix,
            intx,
            vectors,
            pci_cfg_cap,
        })
    }

    /// Wire the function's INTA# to `line` (e.g. an
    /// [`IoapicLine`](vmkit_devices::ioapic::IoapicLine)): the Interrupt Pin register reads 1
    /// and notifications use the line while MSI-X is disabled (see the
    /// [module docs](self#intx-legacy-interrupt-line)). Calling it again moves the interrupt to
    /// the new line (the old one is released low).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vmkit_devices::{interrupt::RecordingIrqLine, msi::RecordingMsiSink, pci::PciFunction};
    /// use vmkit_virtio::{pci::VirtioPciTransport, rng::Rng};
    ///
    /// let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
    /// let msix = VirtioPciTransport::<Rng>::msix_for(&Rng::default(), Arc::new(RecordingMsiSink::default())).unwrap();
    /// let line = Arc::new(RecordingIrqLine::default());
    /// let mut f = VirtioPciTransport::new(Rng::default(), mem, msix).unwrap().with_intx(line.clone());
    /// let mut pin = [0u8; 1];
    /// f.config_read(0x3d, &mut pin);
    /// assert_eq!(pin, [1]); // INTA#
    /// f.core_mut().config_changed(); // MSI-X is disabled: ISR bit 1, line up
    /// assert!(line.level());
    /// let mut isr = [0u8; 1];
    /// f.bar_read(0, vmkit_virtio::pci::ISR_CFG_OFFSET, &mut isr);
    /// assert_eq!((isr, line.level()), ([2], false)); // read clears and deasserts
    /// ```
    pub fn with_intx(mut self, line: Arc<dyn IrqLine>) -> Self {
        self.cfg.set_u8(reg::INTERRUPT_PIN, 1);
        self.intx.wire(line, self.intx_disabled());
        self.sync_intx();
        self
    }

    /// Whether the command register's Interrupt Disable bit is set.
    fn intx_disabled(&self) -> bool {
        self.cfg.get_u16(reg::COMMAND) & command::INTX_DISABLE != 0
    }

    /// Tell the INTx state about the MSI-X enable and Interrupt Disable bits (after a
    /// configuration write; a no-op without a line).
    fn sync_intx(&self) {
        self.intx
            .config_changed(self.msix.enabled(), self.intx_disabled());
    }

    /// Whether the INTx line is asserted now (always false without a line).
    pub fn intx_asserted(&self) -> bool {
        self.intx.level()
    }

    /// Whether an INTx interrupt is pending: the status register's Interrupt Status bit
    /// (always false without a line).
    pub fn intx_pending(&self) -> bool {
        self.intx.pending()
    }

    /// The ISR status byte, without the read-clears side effect of a driver read.
    pub fn isr_status(&self) -> u8 {
        self.intx.peek_isr()
    }

    /// The transport state (see [`crate::persist`]): core, configuration space, MSI-X and the
    /// virtio vector assignments. Take it from a quiescent device.
    pub fn save(&self) -> PciTransportState {
        PciTransportState {
            core: self.core.save(),
            config_space: self.cfg.state(),
            msix: self.msix.state(),
            config_vector: self.vectors.config.load(Ordering::Acquire),
            queue_vectors: self
                .vectors
                .queues
                .iter()
                .map(|v| v.load(Ordering::Acquire))
                .collect(),
        }
    }

    /// Restore `state` into this fresh transport (around a freshly built device with the same
    /// MSI-X layout): configuration space first (BARs, command
    /// register, MSI-X enable), the MSI-X table and PBA, the vector assignments, then the core
    /// (which activates the device if it was active). Then call the root's
    /// `PciRoot::resync` for the function so its BARs (and their observers, such as a
    /// doorbell binding) follow the restored configuration space.
    ///
    /// # Errors
    ///
    /// [`StateError::Pci`] for a configuration space or MSI-X state that does not fit,
    /// [`StateError::Mismatch`] for a vector count that differs, and see
    /// [`TransportCore::restore`].
    pub fn restore(&mut self, state: &PciTransportState) -> Result<(), StateError> {
        if state.queue_vectors.len() != self.vectors.queues.len() {
            return Err(StateError::Mismatch("queue vector count"));
        }
        self.cfg
            .restore(&state.config_space)
            .map_err(StateError::Pci)?;
        self.msix.restore(&state.msix).map_err(StateError::Pci)?;
        let valid = |v: u16| self.valid_vector(v);
        self.vectors
            .config
            .store(valid(state.config_vector), Ordering::Release);
        for (slot, &v) in self.vectors.queues.iter().zip(&state.queue_vectors) {
            slot.store(valid(v), Ordering::Release);
        }
        self.sync_intx();
        self.core.restore(&state.core)
    }

    /// The shared transport core.
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

    /// The MSI-X state.
    pub fn msix(&self) -> &Msix {
        &self.msix
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

    /// Doorbell addresses once BAR 0 is at `bar_base`: `(address, datamatch, queue)` for
    /// ioeventfd registration (any write width, no datamatch).
    pub fn notify_addresses(&self, bar_base: u64) -> Vec<(u64, Option<u32>, u16)> {
        (0..self.core.num_queues())
            .map(|q| {
                let off = NOTIFY_CFG_OFFSET + q as u64 * NOTIFY_OFF_MULTIPLIER as u64;
                (bar_base + off, None, q)
            })
            .collect()
    }

    /// Where BAR 0 currently is, if programmed and enabled.
    pub fn bar_address(&self) -> Option<u64> {
        self.cfg
            .bars()
            .iter()
            .find(|b| b.index == VIRTIO_PCI_BAR)
            .map(|b| b.address)
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        use CommonCfgField::*;
        let f = match CommonCfgField::decode(offset, data.len()) {
            Ok(f) => f,
            Err(_) => return self.core.count_bad_access(),
        };
        let c = &self.core;
        let v: u64 = match f {
            DeviceFeatureSelect => c.device_features_select() as u64,
            DeviceFeature => c.device_features() as u64,
            DriverFeatureSelect => c.driver_features_select() as u64,
            DriverFeature => c.driver_features() as u64,
            ConfigMsixVector => self.vectors.config.load(Ordering::Acquire) as u64,
            NumQueues => c.num_queues() as u64,
            DeviceStatus => c.status() as u64,
            ConfigGeneration => c.config_generation() as u8 as u64,
            QueueSelect => c.queue_select() as u64,
            QueueSize => c.queue_size() as u64,
            QueueMsixVector => self
                .vectors
                .queues
                .get(c.queue_select() as usize)
                .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire))
                as u64,
            QueueEnable => c.queue_ready() as u64,
            QueueNotifyOff => c.queue_select() as u64,
            QueueAddress { ring, high, .. } => {
                let a = c.queue_address(ring);
                if high { a >> 32 } else { a }
            }
            QueueNotifyData | QueueReset => 0,
        };
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        use CommonCfgField::*;
        let f = match CommonCfgField::decode(offset, data.len()) {
            Ok(f) => f,
            Err(_) => return self.core.count_bad_access(),
        };
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let v = u64::from_le_bytes(b);
        let c = &mut self.core;
        match f {
            DeviceFeatureSelect => c.set_device_features_select(v as u32),
            DriverFeatureSelect => c.set_driver_features_select(v as u32),
            DriverFeature => c.write_driver_features(v as u32),
            ConfigMsixVector => {
                let vec = self.valid_vector(v as u16);
                self.vectors.config.store(vec, Ordering::Release);
            }
            DeviceStatus => {
                c.set_status(v as u8);
                if v == 0 {
                    self.intx.reset();
                    self.vectors.reset();
                }
            }
            QueueSelect => c.set_queue_select(v as u16),
            QueueSize => c.set_queue_size(v as u16),
            QueueMsixVector => {
                let vec = self.valid_vector(v as u16);
                match self.vectors.queues.get(self.core.queue_select() as usize) {
                    Some(slot) => slot.store(vec, Ordering::Release),
                    None => self.core.count_bad_access(),
                }
            }
            QueueEnable => c.set_queue_ready(v == 1),
            QueueAddress {
                ring, whole: true, ..
            } => c.set_queue_address(ring, v),
            QueueAddress { ring, high, .. } => c.set_queue_address_half(ring, high, v as u32),
            DeviceFeature | NumQueues | ConfigGeneration | QueueNotifyOff | QueueNotifyData
            | QueueReset => c.count_bad_access(),
        }
    }

    /// Whether a configuration access of `len` bytes at `offset` is one the configuration space
    /// serves (1, 2 or 4 bytes, aligned, inside it) and touches `pci_cfg_data`.
    fn touches_pci_cfg_data(&self, offset: u16, len: usize) -> bool {
        let (start, len) = (u32::from(offset), len as u32);
        let data = u32::from(self.pci_cfg_cap) + u32::from(CAP_PCI_CFG_DATA);
        matches!(len, 1 | 2 | 4)
            && start.is_multiple_of(len)
            && start + len <= u32::from(self.cfg.size())
            && start < data + 4
            && start + len > data
    }

    /// The window the driver set up in the `VIRTIO_PCI_CAP_PCI_CFG` capability.
    fn pci_cfg_window(&self) -> PciCfgWindow {
        let at = self.pci_cfg_cap;
        let mut bar = [0u8; 1];
        let (mut offset, mut length) = ([0u8; 4], [0u8; 4]);
        self.cfg.read(at + CAP_BAR, &mut bar);
        self.cfg.read(at + CAP_OFFSET, &mut offset);
        self.cfg.read(at + CAP_LENGTH, &mut length);
        PciCfgWindow {
            bar: bar[0],
            offset: u32::from_le_bytes(offset),
            length: u32::from_le_bytes(length),
        }
    }

    /// A driver read of `pci_cfg_data`: a BAR read through the window, stored in
    /// `pci_cfg_data` (virtio 1.2 §4.1.4.9.1).
    fn pci_cfg_read(&mut self) {
        let mut b = [0u8; 4];
        let Some((offset, bytes)) = self
            .pci_cfg_window()
            .target()
            .and_then(|(offset, len)| Some((offset, b.get_mut(..len)?)))
        else {
            return self.core.count_bad_access();
        };
        PciFunction::bar_read(self, VIRTIO_PCI_BAR, offset, bytes);
        self.cfg.write(self.pci_cfg_cap + CAP_PCI_CFG_DATA, bytes);
    }

    /// A driver write to `pci_cfg_data` (already stored): a BAR write of its first
    /// `cap.length` bytes through the window (virtio 1.2 §4.1.4.9.1).
    fn pci_cfg_write(&mut self) {
        let mut b = [0u8; 4];
        self.cfg.read(self.pci_cfg_cap + CAP_PCI_CFG_DATA, &mut b);
        let Some((offset, bytes)) = self
            .pci_cfg_window()
            .target()
            .and_then(|(offset, len)| Some((offset, b.get(..len)?)))
        else {
            return self.core.count_bad_access();
        };
        PciFunction::bar_write(self, VIRTIO_PCI_BAR, offset, bytes);
    }

    /// A vector the device can use, or `VIRTIO_MSI_NO_VECTOR` (which the driver reads back as
    /// the refusal, virtio 1.2 §4.1.5.1.2).
    fn valid_vector(&self, v: u16) -> u16 {
        if v < self.msix.config().vectors {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }
}

/// The body of a `struct virtio_pci_cap` after `cap_vndr`/`cap_next` (virtio 1.2 §4.1.4);
/// the notify capability carries `notify_off_multiplier` after it, the PCI configuration
/// access capability `pci_cfg_data[4]` (zero).
fn virtio_pci_cap(cfg_type: u8, offset: u64, length: u64) -> Vec<u8> {
    let extra = match cfg_type {
        VIRTIO_PCI_CAP_NOTIFY_CFG => Some(NOTIFY_OFF_MULTIPLIER.to_le_bytes()),
        VIRTIO_PCI_CAP_PCI_CFG => Some([0; 4]),
        _ => None,
    };
    let cap_len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut b = vec![cap_len, cfg_type, VIRTIO_PCI_BAR, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    b.extend(extra.iter().flatten());
    b
}

impl<D, M> PciFunction for VirtioPciTransport<D, M>
where
    D: VirtioDevice<M>,
    M: VirtioMemory,
{
    fn config_space(&self) -> &ConfigSpace {
        &self.cfg
    }

    fn config_space_mut(&mut self) -> &mut ConfigSpace {
        &mut self.cfg
    }

    /// A read touching `pci_cfg_data` first reads BAR 0 through the PCI configuration access
    /// window into it (see the [module docs](self)). The status register's Interrupt Status
    /// bit shows whether an INTx interrupt is pending.
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        if self.touches_pci_cfg_data(offset, data.len()) {
            self.pci_cfg_read();
        }
        if self.intx.wired() {
            let st = self.cfg.get_u16(reg::STATUS) & !status::INTERRUPT_STATUS;
            let pending = if self.intx.pending() {
                status::INTERRUPT_STATUS
            } else {
                0
            };
            self.cfg.set_u16(reg::STATUS, st | pending);
        }
        self.cfg.read(offset, data);
    }

    /// A config write can set Interrupt Disable or enable MSI-X: the INTx line follows. (A
    /// BAR move is the root bus's event: `doorbell::DoorbellBinding` observes it.) A write
    /// touching `pci_cfg_data` then writes BAR 0 through the PCI configuration access window.
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.cfg.write(offset, data);
        self.sync_intx();
        if self.touches_pci_cfg_data(offset, data.len()) {
            self.pci_cfg_write();
        }
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != VIRTIO_PCI_BAR {
            return self.core.count_bad_access();
        }
        match offset {
            o if o < COMMON_CFG_LEN => self.common_read(o, data),
            o if o == ISR_CFG_OFFSET && data.len() == 1 => {
                // Reading the ISR clears it and deasserts INTx (virtio 1.2 §4.1.4.5).
                data[0] = self.intx.read_isr();
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.core.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            _ => {
                if !self.msix.bar_read(bar, offset, data) {
                    self.core.count_bad_access();
                }
            }
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != VIRTIO_PCI_BAR {
            return self.core.count_bad_access();
        }
        let notify_end =
            NOTIFY_CFG_OFFSET + self.core.num_queues() as u64 * NOTIFY_OFF_MULTIPLIER as u64;
        match offset {
            o if o < COMMON_CFG_LEN => self.common_write(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.core.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_CFG_OFFSET..notify_end).contains(&o) => {
                let q = (o - NOTIFY_CFG_OFFSET) / NOTIFY_OFF_MULTIPLIER as u64;
                self.core.trapped_notify(q as u16);
            }
            _ => {
                if !self.msix.bar_write(bar, offset, data) {
                    self.core.count_bad_access();
                }
            }
        }
    }
}

// Notifications from the notify worker (ioeventfds, wake-ups, device events, queue servers).
impl<D, M> crate::notify::QueueNotify for VirtioPciTransport<D, M>
where
    D: VirtioDevice<M>,
    M: VirtioMemory,
{
    fn notify_queue(&mut self, index: u16) {
        VirtioPciTransport::notify_queue(self, index)
    }
    fn wake_queue(&mut self, index: u16) {
        VirtioPciTransport::wake_queue(self, index)
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
