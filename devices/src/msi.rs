//! Message-signalled interrupts: the address/data message format (Intel SDM Vol. 3, §11.11),
//! the [`MsiSink`] every interrupt producer (IOAPIC, MSI-X) delivers through, and
//! [`IrqfdControl`], with which MSI-X detaches the irqfds of masked vectors.
//!
//! ```
//! use vmkit_devices::msi::{DeliveryMode, MsiFields, MsiMessage};
//!
//! let f = MsiFields { vector: 0x31, dest_id: 2, level_triggered: true, ..MsiFields::default() };
//! let m = MsiMessage::from(f);
//! assert_eq!(m.address, 0xfee0_2000);
//! assert_eq!(m.data, 0xc031); // trigger mode + level (assert) + vector
//! assert_eq!(m.fields(), Ok(f));
//! assert_eq!(f.delivery_mode, DeliveryMode::Fixed);
//! ```

use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Bits 31:20 of every MSI address (SDM 11.11.1, Figure 11-24).
pub const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
/// Mask of the fixed address bits 31:20.
pub const MSI_ADDRESS_BASE_MASK: u64 = 0xfff0_0000;
/// Destination ID, address bits 19:12.
pub const MSI_ADDRESS_DEST_ID_SHIFT: u32 = 12;
/// Redirection hint, address bit 3.
pub const MSI_ADDRESS_RH: u64 = 1 << 3;
/// Destination mode (1 = logical), address bit 2.
pub const MSI_ADDRESS_DM: u64 = 1 << 2;
/// Vector, data bits 7:0.
pub const MSI_DATA_VECTOR_MASK: u32 = 0xff;
/// Delivery mode, data bits 10:8.
pub const MSI_DATA_DELIVERY_MODE_SHIFT: u32 = 8;
/// Level (1 = assert), data bit 14.
pub const MSI_DATA_LEVEL: u32 = 1 << 14;
/// Trigger mode (1 = level), data bit 15.
pub const MSI_DATA_TRIGGER_MODE: u32 = 1 << 15;

/// Interrupt delivery modes (SDM 11.11.2; the same encoding as IOAPIC redirection entries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum DeliveryMode {
    /// 000: deliver the vector to the destination.
    #[default]
    Fixed = 0,
    /// 001: to the lowest-priority processor among the destinations.
    LowestPriority = 1,
    /// 010: system management interrupt.
    Smi = 2,
    /// 100: non-maskable interrupt.
    Nmi = 4,
    /// 101: INIT.
    Init = 5,
    /// 111: external interrupt (8259A-compatible).
    ExtInt = 7,
}

impl DeliveryMode {
    /// Decode the 3-bit field; `None` for the reserved encodings 011 and 110.
    pub fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits & 7 {
            0 => Self::Fixed,
            1 => Self::LowestPriority,
            2 => Self::Smi,
            4 => Self::Nmi,
            5 => Self::Init,
            7 => Self::ExtInt,
            _ => return None,
        })
    }
}

/// Errors decoding a message.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum MsiError {
    /// Address bits 31:20 are not 0xFEE (or bits 63:32 are set).
    #[error("address {0:#x} is not in the MSI window")]
    BadAddress(u64),
    /// Reserved delivery mode encoding.
    #[error("reserved delivery mode {0:#b}")]
    ReservedDeliveryMode(u8),
}

/// The decoded fields of an MSI message (SDM 11.11.1 and 11.11.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MsiFields {
    /// Destination APIC ID (physical) or logical destination.
    pub dest_id: u8,
    /// Redirection hint (RH).
    pub redirection_hint: bool,
    /// Destination mode: `true` = logical.
    pub dest_logical: bool,
    /// Interrupt vector.
    pub vector: u8,
    /// Delivery mode.
    pub delivery_mode: DeliveryMode,
    /// Trigger mode: `true` = level. (The level bit is always encoded as "assert".)
    pub level_triggered: bool,
}

/// A raw MSI message: what a device writes to `address` (as a 32-bit store of `data`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MsiMessage {
    /// Message address (bits 63:32 are zero on x86).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

impl MsiMessage {
    /// Decode the fields; fails on addresses outside 0xFEEx_xxxx or reserved delivery modes.
    pub fn fields(&self) -> Result<MsiFields, MsiError> {
        if self.address & !0xffff_ffff != 0
            || self.address & MSI_ADDRESS_BASE_MASK != MSI_ADDRESS_BASE
        {
            return Err(MsiError::BadAddress(self.address));
        }
        let dm_bits = ((self.data >> MSI_DATA_DELIVERY_MODE_SHIFT) & 7) as u8;
        Ok(MsiFields {
            dest_id: (self.address >> MSI_ADDRESS_DEST_ID_SHIFT) as u8,
            redirection_hint: self.address & MSI_ADDRESS_RH != 0,
            dest_logical: self.address & MSI_ADDRESS_DM != 0,
            vector: (self.data & MSI_DATA_VECTOR_MASK) as u8,
            delivery_mode: DeliveryMode::from_bits(dm_bits)
                .ok_or(MsiError::ReservedDeliveryMode(dm_bits))?,
            level_triggered: self.data & MSI_DATA_TRIGGER_MODE != 0,
        })
    }
}

impl From<MsiFields> for MsiMessage {
    fn from(f: MsiFields) -> Self {
        let mut address = MSI_ADDRESS_BASE | (f.dest_id as u64) << MSI_ADDRESS_DEST_ID_SHIFT;
        if f.redirection_hint {
            address |= MSI_ADDRESS_RH;
        }
        if f.dest_logical {
            address |= MSI_ADDRESS_DM;
        }
        let mut data = f.vector as u32
            | (f.delivery_mode as u32) << MSI_DATA_DELIVERY_MODE_SHIFT
            | MSI_DATA_LEVEL;
        if f.level_triggered {
            data |= MSI_DATA_TRIGGER_MODE;
        }
        Self { address, data }
    }
}

/// What became of a message handed to [`MsiSink::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MsiDelivery {
    /// At least one local APIC accepted it (`KVM_SIGNAL_MSI` returned > 0).
    Delivered,
    /// No local APIC accepted it (`KVM_SIGNAL_MSI` returned 0): the guest blocks it, e.g. its
    /// destination APIC is software-disabled (SDM vol. 3A §11.4.7.2: a disabled APIC accepts
    /// no fixed interrupts) or no APIC matches the destination.
    Blocked,
}

/// Where interrupt producers send MSI messages: KVM (`KVM_SIGNAL_MSI` / GSI routes, see
/// `kvm_irq`) or, in tests, a [`RecordingMsiSink`].
pub trait MsiSink: Send + Sync {
    /// Deliver `msg` to the guest now.
    fn send(&self, msg: MsiMessage) -> io::Result<()>;

    /// Deliver `msg` and say whether the guest took it ([`MsiDelivery`]). Sinks that cannot
    /// tell (the default: [`send`](Self::send)) report [`MsiDelivery::Delivered`]; KVM's
    /// router reports `KVM_SIGNAL_MSI`'s answer.
    fn deliver(&self, msg: MsiMessage) -> io::Result<MsiDelivery> {
        self.send(msg).map(|()| MsiDelivery::Delivered)
    }

    /// Tell the router that `gsi` now carries `msg` (`None`: unrouted). Routed GSIs let irqfds
    /// deliver without a userspace exit, and KVM's split irqchip learns from the routes of the
    /// IOAPIC pins which level-triggered vectors need an EOI exit. The default ignores routes.
    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        let _ = (gsi, msg);
        Ok(())
    }

    /// The sink's control over irqfd registration, if it has one. With it, an
    /// [`Msix`](crate::pci::Msix) detaches a vector's irqfd while the vector is masked, so that
    /// eventfd writes only count up until the vector is unmasked (or the PBA is read). The
    /// default has none: irqfds stay as their owner registered them.
    fn irqfd_control(&self) -> Option<&dyn IrqfdControl> {
        None
    }
}

/// Attaching and detaching an eventfd as the irqfd of a GSI (`KVM_IRQFD`, and `KVM_IRQFD` with
/// `KVM_IRQFD_FLAG_DEASSIGN`). While attached, every write to the eventfd injects the GSI's
/// route and consumes the count; while detached, writes only add to the eventfd's counter.
pub trait IrqfdControl: Send + Sync {
    /// Attach `fd` as the irqfd of `gsi` (a count already in `fd` is injected at once).
    fn register_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()>;
    /// Detach `fd` from `gsi`; succeeds also when it was not attached. After it returns, writes
    /// to `fd` inject nothing.
    fn unregister_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()>;
}

/// One thing a [`RecordingMsiSink`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsiEvent {
    /// [`MsiSink::send`].
    Sent(MsiMessage),
    /// [`MsiSink::set_route`].
    Route(u32, Option<MsiMessage>),
}

/// One irqfd registration change a [`RecordingMsiSink`] saw ([`RecordingMsiSink::irqfd_events`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqfdEvent {
    /// [`IrqfdControl::register_irqfd`] of `gsi`.
    Registered(u32),
    /// [`IrqfdControl::unregister_irqfd`] of `gsi`.
    Unregistered(u32),
}

/// Records every message, route change and irqfd registration; for tests. As an
/// [`IrqfdControl`] it only keeps track of which (GSI, eventfd) pairs are attached: a test plays
/// KVM by draining the eventfds of attached GSIs ([`RecordingMsiSink::irqfd_registered`]).
#[derive(Debug, Default)]
pub struct RecordingMsiSink {
    events: Mutex<Vec<MsiEvent>>,
    irqfd_events: Mutex<Vec<IrqfdEvent>>,
    irqfds: Mutex<BTreeSet<(u32, RawFd)>>,
}

impl RecordingMsiSink {
    /// Everything recorded so far, in order.
    pub fn events(&self) -> Vec<MsiEvent> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The messages sent so far (route changes left out).
    pub fn sent(&self) -> Vec<MsiMessage> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                MsiEvent::Sent(m) => Some(m),
                MsiEvent::Route(..) => None,
            })
            .collect()
    }

    /// The vectors of the messages sent so far.
    pub fn vectors(&self) -> Vec<u8> {
        self.sent().iter().map(|m| m.data as u8).collect()
    }

    /// Forget everything recorded.
    pub fn clear(&self) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn push(&self, e: MsiEvent) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }

    /// The irqfd registrations and deregistrations so far, in order (not part of
    /// [`RecordingMsiSink::events`]).
    pub fn irqfd_events(&self) -> Vec<IrqfdEvent> {
        self.irqfd_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Forget the recorded irqfd events (the set of attached irqfds stays).
    pub fn clear_irqfd_events(&self) {
        self.irqfd_events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Whether `fd` is currently attached as the irqfd of `gsi`.
    pub fn irqfd_registered(&self, gsi: u32, fd: &EventFd) -> bool {
        self.irqfds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(gsi, fd.as_raw_fd()))
    }

    fn irqfd_change(&self, gsi: u32, fd: &EventFd, attach: bool) {
        let mut set = self.irqfds.lock().unwrap_or_else(|e| e.into_inner());
        let mut events = self.irqfd_events.lock().unwrap_or_else(|e| e.into_inner());
        if attach {
            set.insert((gsi, fd.as_raw_fd()));
            events.push(IrqfdEvent::Registered(gsi));
        } else {
            set.remove(&(gsi, fd.as_raw_fd()));
            events.push(IrqfdEvent::Unregistered(gsi));
        }
    }
}

impl MsiSink for RecordingMsiSink {
    fn send(&self, msg: MsiMessage) -> io::Result<()> {
        self.push(MsiEvent::Sent(msg));
        Ok(())
    }
    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        self.push(MsiEvent::Route(gsi, msg));
        Ok(())
    }
    fn irqfd_control(&self) -> Option<&dyn IrqfdControl> {
        Some(self)
    }
}

impl IrqfdControl for RecordingMsiSink {
    fn register_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()> {
        // KVM refuses a second registration of the same eventfd.
        if self.irqfd_registered(gsi, fd) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        self.irqfd_change(gsi, fd, true);
        Ok(())
    }
    fn unregister_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()> {
        self.irqfd_change(gsi, fd, false);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sdm_examples_and_errors() {
        // Physical destination 0, fixed, edge, vector 0x20: the message Linux writes for CPU 0.
        let m = MsiMessage {
            address: 0xfee0_0000,
            data: 0x0020,
        };
        let f = m.fields().unwrap();
        assert_eq!((f.vector, f.dest_id, f.level_triggered), (0x20, 0, false));
        let logical_nmi = MsiMessage {
            address: 0xfee0_f00c,
            data: 0x0400,
        };
        let f = logical_nmi.fields().unwrap();
        assert!(f.dest_logical && f.redirection_hint);
        assert_eq!((f.dest_id, f.delivery_mode), (0x0f, DeliveryMode::Nmi));
        for (address, data, err) in [
            (0xfed0_0000, 0, MsiError::BadAddress(0xfed0_0000)),
            (0x1_fee0_0000, 0, MsiError::BadAddress(0x1_fee0_0000)),
            (0xfee0_0000, 0x300, MsiError::ReservedDeliveryMode(3)),
            (0xfee0_0000, 0x600, MsiError::ReservedDeliveryMode(6)),
        ] {
            assert_eq!(MsiMessage { address, data }.fields(), Err(err));
        }
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(dest in any::<u8>(), rh: bool, dm: bool, vector in any::<u8>(),
                                    mode in prop::sample::select(vec![0u8, 1, 2, 4, 5, 7]), level: bool) {
            let f = MsiFields { dest_id: dest, redirection_hint: rh, dest_logical: dm, vector,
                delivery_mode: DeliveryMode::from_bits(mode).unwrap(), level_triggered: level };
            prop_assert_eq!(MsiMessage::from(f).fields(), Ok(f));
        }
    }
}
