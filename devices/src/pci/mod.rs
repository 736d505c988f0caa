//! PCI: the [`PciFunction`] trait device models implement, the type-0 [`ConfigSpace`] they embed,
//! [`Msix`] (capability, table and PBA), and the root bus ([`PciRoot`]) with configuration
//! mechanism #1 (0xCF8/0xCFC) and ECAM, which maps the functions' BARs on the VM's buses.
//!
//! A device model is a struct holding a [`ConfigSpace`] (and an [`Msix`] if it uses MSI-X); its
//! [`PciFunction`] impl lends the config space (the trait does the config accesses) and serves
//! its BARs:
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_devices::IoBuses;
//! use vmkit_devices::msi::RecordingMsiSink;
//! use vmkit_devices::pci::{BarKind, ConfigSpace, Msix, MsixConfig, PciFunction, PciHeader, PciRoot};
//!
//! struct Dev { cfg: ConfigSpace, msix: Msix }
//! impl PciFunction for Dev {
//!     fn config_space(&self) -> &ConfigSpace { &self.cfg }
//!     fn config_space_mut(&mut self) -> &mut ConfigSpace { &mut self.cfg }
//!     fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
//!         if !self.msix.bar_read(bar, offset, data) { data.fill(0) }
//!     }
//!     fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
//!         self.msix.bar_write(bar, offset, data);
//!     }
//! }
//!
//! let sink = Arc::new(RecordingMsiSink::default());
//! let msix = Msix::new(MsixConfig::in_bar(0, 4, 0x1000), sink.clone()).unwrap();
//! let mut cfg = ConfigSpace::new(&PciHeader { vendor_id: 0x1af4, device_id: 0x1044, ..Default::default() });
//! cfg.add_bar(0, BarKind::Memory64 { prefetchable: false }, 0x4000).unwrap();
//! cfg.add_msix(&msix).unwrap();
//!
//! let buses = Arc::new(IoBuses::default());
//! let root = PciRoot::new(&buses);
//! root.add(0, 0, "rng", Arc::new(Mutex::new(Dev { cfg, msix: msix.clone() }))).unwrap();
//! buses.pio.insert(0xcf8, 8, "pci-conf", root.config_io()).unwrap();
//!
//! // The guest: read the ID, program BAR0 and enable memory decoding.
//! let cfg_addr = |reg: u32| (0x8000_0000u32 | reg).to_le_bytes();
//! buses.pio.write(0xcf8, &cfg_addr(0));
//! let mut id = [0u8; 4];
//! buses.pio.read(0xcfc, &mut id);
//! assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
//! buses.pio.write(0xcf8, &cfg_addr(0x10));
//! buses.pio.write(0xcfc, &0xd000_0000u32.to_le_bytes());
//! buses.pio.write(0xcf8, &cfg_addr(0x04));
//! buses.pio.write(0xcfc, &[0x06, 0]); // memory space + bus master
//! assert_eq!(buses.mmio.ranges()[0].0, 0xd000_0000);
//! // MSI-X table entry 0 through the BAR: its mask bit reads 1 after reset.
//! let mut ctrl = [0u8; 4];
//! buses.mmio.read(0xd000_100c, &mut ctrl);
//! assert_eq!(ctrl, [1, 0, 0, 0]);
//! ```

pub mod config;
pub mod events;
pub mod msix;
pub mod root;

pub use config::{ConfigSpace, ConfigStats, PciHeader};
pub use events::{PciEvent, PciObserver, RecordingPciObserver, RequesterId};
pub use msix::{Msix, MsixConfig, MsixState, MsixStats, MsixVector};
pub use root::{PciConfigIo, PciEcam, PciRoot, PciStats};

#[cfg(test)]
mod msix_irqfd_tests;
#[cfg(test)]
mod root_events_tests;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Size of a conventional PCI function's configuration space.
pub const PCI_CONFIG_SPACE_SIZE: u16 = 256;
/// Size of a PCI Express function's configuration space (incl. extended space).
pub const PCIE_CONFIG_SPACE_SIZE: u16 = 4096;
/// Number of BARs in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Type-0 header register offsets (PCI Local Bus spec 3.0, §6.1).
pub mod reg {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command (16 bits).
    pub const COMMAND: u16 = 0x04;
    /// Status (16 bits).
    pub const STATUS: u16 = 0x06;
    /// Revision ID (8 bits).
    pub const REVISION_ID: u16 = 0x08;
    /// Programming interface (8 bits).
    pub const PROG_IF: u16 = 0x09;
    /// Sub-class code (8 bits).
    pub const SUBCLASS: u16 = 0x0a;
    /// Base class code (8 bits).
    pub const CLASS_CODE: u16 = 0x0b;
    /// Cache line size (8 bits).
    pub const CACHE_LINE_SIZE: u16 = 0x0c;
    /// Latency timer (8 bits).
    pub const LATENCY_TIMER: u16 = 0x0d;
    /// Header type (8 bits).
    pub const HEADER_TYPE: u16 = 0x0e;
    /// BAR0; BARn is at `BAR0 + 4 * n`.
    pub const BAR0: u16 = 0x10;
    /// Subsystem vendor ID (16 bits).
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
    /// Subsystem ID (16 bits).
    pub const SUBSYSTEM_ID: u16 = 0x2e;
    /// Expansion ROM base address (32 bits).
    pub const ROM_ADDRESS: u16 = 0x30;
    /// Capabilities pointer (8 bits).
    pub const CAPABILITY_LIST: u16 = 0x34;
    /// Interrupt line (8 bits).
    pub const INTERRUPT_LINE: u16 = 0x3c;
    /// Interrupt pin (8 bits).
    pub const INTERRUPT_PIN: u16 = 0x3d;
    /// First byte after the type-0 header: capabilities start here.
    pub const HEADER_END: u16 = 0x40;
    /// First extended capability (PCIe).
    pub const EXT_CAP_START: u16 = 0x100;
}

/// Command register bits.
pub mod command {
    /// I/O space enable.
    pub const IO_SPACE: u16 = 1 << 0;
    /// Memory space enable.
    pub const MEMORY_SPACE: u16 = 1 << 1;
    /// Bus master enable.
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Parity error response.
    pub const PARITY_ERROR_RESPONSE: u16 = 1 << 6;
    /// SERR# enable.
    pub const SERR: u16 = 1 << 8;
    /// INTx emulation disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Status register bits.
pub mod status {
    /// INTx asserted (read-only).
    pub const INTERRUPT_STATUS: u16 = 1 << 3;
    /// Capabilities list present (read-only).
    pub const CAPABILITIES_LIST: u16 = 1 << 4;
    /// The write-1-to-clear error bits: master data parity, signalled/received target abort,
    /// received master abort, signalled system error, detected parity error.
    pub const RW1C: u16 = (1 << 8) | (1 << 11) | (1 << 12) | (1 << 13) | (1 << 14) | (1 << 15);
}

/// Capability IDs (PCI Code and ID Assignment spec).
pub mod cap_id {
    /// Power management.
    pub const PM: u8 = 0x01;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// Vendor specific (what virtio-pci uses).
    pub const VENDOR_SPECIFIC: u8 = 0x09;
    /// PCI Express.
    pub const EXP: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// Extended capability IDs.
pub mod ext_cap_id {
    /// Address translation services.
    pub const ATS: u16 = 0x000f;
    /// Single-root I/O virtualization.
    pub const SRIOV: u16 = 0x0010;
    /// Vendor-specific extended capability.
    pub const VNDR: u16 = 0x000b;
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BarKind {
    /// I/O space (mapped on the PIO bus).
    Io,
    /// 32-bit memory space.
    Memory32 {
        /// Prefetchable bit.
        prefetchable: bool,
    },
    /// 64-bit memory space; takes this BAR and the next.
    Memory64 {
        /// Prefetchable bit.
        prefetchable: bool,
    },
}

impl BarKind {
    /// Whether the BAR lives on the MMIO bus.
    pub fn is_memory(self) -> bool {
        !matches!(self, BarKind::Io)
    }
}

/// A BAR the function currently decodes: defined, programmed (address ≠ 0) and enabled in the
/// command register. The root bus maps `[address, address + size)` to [`PciFunction::bar_read`]
/// / [`PciFunction::bar_write`] with `bar = index`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PciBar {
    /// BAR number (0..6; a 64-bit BAR has the lower number).
    pub index: u8,
    /// Kind.
    pub kind: BarKind,
    /// Programmed base address.
    pub address: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

/// A PCI function as the root bus sees it. A device model embeds a [`ConfigSpace`], lends it
/// through [`config_space`](Self::config_space) / [`config_space_mut`](Self::config_space_mut)
/// and serves its BARs; configuration accesses and BAR decoding come from the default methods
/// (override them only for side effects on config accesses).
///
/// The root bus guarantees for config accesses: `data.len()` is 1, 2 or 4, `offset` is aligned to
/// it and `offset + data.len() <= 4096`; and for BAR accesses that `offset + data.len()` lies
/// inside the BAR (as reported by [`PciFunction::bars`]). Implementations must still never panic
/// on any value (a function may be driven directly, e.g. by fuzzers).
pub trait PciFunction: Send {
    /// The function's configuration space.
    fn config_space(&self) -> &ConfigSpace;
    /// The function's configuration space, mutably.
    fn config_space_mut(&mut self) -> &mut ConfigSpace;
    /// Read configuration space at `offset`.
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config_space().read(offset, data)
    }
    /// Write configuration space at `offset`. The root bus re-reads [`PciFunction::bars`]
    /// afterwards and moves the BAR mappings on its buses to match.
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config_space_mut().write(offset, data)
    }
    /// The BARs the function currently decodes ([`ConfigSpace::bars`]).
    fn bars(&self) -> Vec<PciBar> {
        self.config_space().bars()
    }
    /// A guest load from BAR `bar` at `offset` inside it.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);
    /// A guest store to BAR `bar` at `offset` inside it.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);
    /// The root bus put the function at `rid` (its requester ID: what its DMA and MSIs carry,
    /// what an IOMMU translates by). Called once per [`PciRoot::add_function`]; the default
    /// ignores it.
    fn attached(&mut self, _rid: RequesterId) {}
}

/// Errors building PCI functions and buses.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PciError {
    /// BAR index out of range or already used (incl. the upper half of a 64-bit BAR).
    #[error("BAR {0} is out of range or already defined")]
    BarIndex(u8),
    /// BAR size not a power of two, too small for its kind, or too large (I/O: > 64 KiB,
    /// 32-bit memory: > 2 GiB).
    #[error("bad BAR size {0:#x}")]
    BarSize(u64),
    /// No room left in the capability area for a capability of this length.
    #[error("no room for a capability of {0} bytes")]
    NoCapabilitySpace(usize),
    /// Extended capabilities need a 4 KiB (PCIe) configuration space.
    #[error("extended capabilities need PCIe configuration space")]
    NotExpress,
    /// The write mask is longer than the capability body.
    #[error("write mask longer than the capability body")]
    MaskLength,
    /// Device/function number out of range (device 0..32, function 0..8).
    #[error("bad device {device} function {function}")]
    BadSlot {
        /// Device number.
        device: u8,
        /// Function number.
        function: u8,
    },
    /// A function is already present at that slot.
    #[error("slot {device:02x}.{function} is in use")]
    SlotInUse {
        /// Device number.
        device: u8,
        /// Function number.
        function: u8,
    },
    /// All 32 device numbers are taken.
    #[error("no free device number on the bus")]
    BusFull,
    /// A second MSI-X capability.
    #[error("MSI-X already added")]
    MsixTwice,
    /// A saved configuration space of the wrong size.
    #[error("saved config space has {0} bytes")]
    StateSize(usize),
    /// Bad MSI-X layout (vector count 1..=2048, 8-byte aligned table and PBA, inside a BAR).
    #[error("bad MSI-X layout: {0}")]
    MsixLayout(&'static str),
}
