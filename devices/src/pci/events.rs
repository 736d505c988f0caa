//! What the root bus tells the rest of the VMM: every function's requester ID, and the side
//! effects of configuration writes and hot-plug as [`PciEvent`]s to [`PciObserver`]s (a KVM
//! doorbell binding that follows a BAR, an IOMMU that tracks endpoints, an SR-IOV PF that
//! watches its VFs appear).

use serde::{Deserialize, Serialize};

use super::{PciBar, PciError};

/// A function's requester ID (PCIe base spec §2.2.6.2): bus number and device/function number,
/// what DMA and MSIs are tagged with and what an IOMMU translates by.
///
/// With ARI (Alternative Routing-ID Interpretation, PCIe §6.13) the 8-bit device/function field
/// is one function number (0..=255) on device 0, as SR-IOV virtual functions use.
///
/// ```
/// use vmkit_devices::pci::RequesterId;
/// let rid = RequesterId::new(2, 3, 1).unwrap();
/// assert_eq!((rid.bus(), rid.device(), rid.function()), (2, 3, 1));
/// assert_eq!(rid.to_u16(), 0x0219);
/// let vf = RequesterId::ari(4, 200);
/// assert_eq!((vf.devfn(), vf.to_string().as_str()), (200, "04:19.0"));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequesterId {
    bus: u8,
    devfn: u8,
}

impl RequesterId {
    /// `bus`:`device`.`function` (device 0..32, function 0..8).
    ///
    /// # Errors
    ///
    /// [`PciError::BadSlot`] for a device or function number out of range.
    pub fn new(bus: u8, device: u8, function: u8) -> Result<Self, PciError> {
        if device >= 32 || function >= 8 {
            return Err(PciError::BadSlot { device, function });
        }
        Ok(Self {
            bus,
            devfn: device << 3 | function,
        })
    }

    /// An ARI function number (0..=255) on `bus`.
    pub fn ari(bus: u8, function: u8) -> Self {
        Self {
            bus,
            devfn: function,
        }
    }

    /// From the 16-bit wire form (`bus << 8 | devfn`).
    pub fn from_u16(rid: u16) -> Self {
        Self {
            bus: (rid >> 8) as u8,
            devfn: rid as u8,
        }
    }

    /// The 16-bit wire form.
    pub fn to_u16(self) -> u16 {
        u16::from(self.bus) << 8 | u16::from(self.devfn)
    }

    /// Bus number.
    pub fn bus(self) -> u8 {
        self.bus
    }

    /// Device/function byte (the ARI function number).
    pub fn devfn(self) -> u8 {
        self.devfn
    }

    /// Device number (without ARI).
    pub fn device(self) -> u8 {
        self.devfn >> 3
    }

    /// Function number (without ARI).
    pub fn function(self) -> u8 {
        self.devfn & 7
    }
}

impl std::fmt::Display for RequesterId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{}",
            self.bus,
            self.device(),
            self.function()
        )
    }
}

/// A side effect on the root bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PciEvent {
    /// A function appeared (at start-up or hot-plugged).
    FunctionAdded(RequesterId),
    /// A function disappeared (hot-unplug); its BARs were unmapped first.
    FunctionRemoved(RequesterId),
    /// A BAR started decoding at `bar.address`.
    BarMapped {
        /// The function.
        rid: RequesterId,
        /// The BAR as now mapped.
        bar: PciBar,
    },
    /// A decoding BAR moved.
    BarMoved {
        /// The function.
        rid: RequesterId,
        /// Where it was.
        from: PciBar,
        /// Where it is now.
        to: PciBar,
    },
    /// A BAR stopped decoding (disabled, unprogrammed or its function removed).
    BarUnmapped {
        /// The function.
        rid: RequesterId,
        /// The BAR as it was mapped.
        bar: PciBar,
    },
}

impl PciEvent {
    /// The function the event is about.
    pub fn rid(&self) -> RequesterId {
        match *self {
            PciEvent::FunctionAdded(rid) | PciEvent::FunctionRemoved(rid) => rid,
            PciEvent::BarMapped { rid, .. }
            | PciEvent::BarMoved { rid, .. }
            | PciEvent::BarUnmapped { rid, .. } => rid,
        }
    }

    /// Where BAR `index` of `rid` decodes after this event: `Some(Some(addr))` mapped there,
    /// `Some(None)` no longer mapped, `None` the event does not concern that BAR.
    pub fn bar_address(&self, rid: RequesterId, index: u8) -> Option<Option<u64>> {
        match *self {
            PciEvent::BarMapped { rid: r, bar } if r == rid && bar.index == index => {
                Some(Some(bar.address))
            }
            PciEvent::BarMoved { rid: r, to, .. } if r == rid && to.index == index => {
                Some(Some(to.address))
            }
            PciEvent::BarUnmapped { rid: r, bar } if r == rid && bar.index == index => Some(None),
            _ => None,
        }
    }
}

/// Learns of the root bus's [`PciEvent`]s ([`super::PciRoot::observe`]). Called after the
/// change, outside the root's locks (an observer may call back into the root), on the thread
/// that caused it (a vCPU's configuration write, or the VMM's hot-plug call).
pub trait PciObserver: Send + Sync {
    /// Something happened on the bus.
    fn pci_event(&self, event: &PciEvent);
}

/// Records every event (for tests).
#[derive(Debug, Default)]
pub struct RecordingPciObserver {
    events: std::sync::Mutex<Vec<PciEvent>>,
}

impl RecordingPciObserver {
    /// The events so far, in order.
    pub fn events(&self) -> Vec<PciEvent> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Forget the events so far.
    pub fn clear(&self) {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }
}

impl PciObserver for RecordingPciObserver {
    fn pci_event(&self, event: &PciEvent) {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(*event);
    }
}
