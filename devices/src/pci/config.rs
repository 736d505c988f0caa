//! A type-0 configuration space with per-bit write masks (PCI Local Bus spec 3.0 §6, PCIe base
//! spec §7): the header, BARs with the sizing protocol, the capability list and the extended
//! capability list. Device models embed one and forward their config accesses to it.
//!
//! Every register byte has a write mask (bits the guest may change) and a write-1-to-clear mask;
//! BAR sizing falls out of the masks: writing all-ones leaves exactly the address bits above the
//! size set, so the guest reads back `!(size - 1)` plus the read-only type bits.
//!
//! ```
//! use vmkit_devices::pci::{BarKind, ConfigSpace, PciHeader, cap_id};
//!
//! let mut cfg = ConfigSpace::new(&PciHeader { vendor_id: 0x8086, device_id: 0x1234, ..Default::default() });
//! cfg.add_bar(2, BarKind::Io, 0x20).unwrap();
//! cfg.write(0x18, &0xffff_ffffu32.to_le_bytes());
//! let mut v = [0u8; 4];
//! cfg.read(0x18, &mut v);
//! assert_eq!(u32::from_le_bytes(v), 0x0000_ffe1); // size 0x20, I/O space indicator
//! let at = cfg.add_capability(cap_id::VENDOR_SPECIFIC, &[4, 0], &[]).unwrap();
//! assert_eq!(cfg.capabilities(), vec![(cap_id::VENDOR_SPECIFIC, at)]);
//! ```

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::msix::{MSIX_CAP_LEN, Msix};
use super::{
    BarKind, NUM_BARS, PCI_CONFIG_SPACE_SIZE, PCIE_CONFIG_SPACE_SIZE, PciBar, PciError, cap_id,
    command, reg, status,
};

/// The identity of a function: what its type-0 header says about it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision_id: u8,
    /// Base class code.
    pub class_code: u8,
    /// Sub-class code.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Interrupt pin (0 = none, 1..=4 = INTA#..INTD#).
    pub interrupt_pin: u8,
}

/// Counters of a configuration space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigStats {
    /// Accesses ignored because of their width, alignment or range (reads return all-ones).
    pub bad_accesses: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarSlot {
    Free,
    Bar(BarKind, u64),
    /// The upper half of the 64-bit BAR below.
    Upper,
}

/// A type-0 configuration space (256 bytes conventional, 4 KiB PCIe).
pub struct ConfigSpace {
    size: u16,
    regs: Box<[u8]>,
    wmask: Box<[u8]>,
    w1c: Box<[u8]>,
    bars: [BarSlot; NUM_BARS],
    next_cap: u16,
    last_cap: Option<u16>,
    next_ext_cap: u16,
    last_ext_cap: Option<u16>,
    msix: Option<(u16, Msix)>,
    bad_accesses: AtomicU64,
}

impl ConfigSpace {
    /// A PCI Express function's 4 KiB configuration space.
    pub fn new(header: &PciHeader) -> Self {
        Self::with_size(header, PCIE_CONFIG_SPACE_SIZE)
    }

    /// A conventional PCI function's 256-byte configuration space (accesses above read as
    /// all-ones and are counted).
    pub fn conventional(header: &PciHeader) -> Self {
        Self::with_size(header, PCI_CONFIG_SPACE_SIZE)
    }

    fn with_size(h: &PciHeader, size: u16) -> Self {
        let n = size as usize;
        let mut c = Self {
            size,
            regs: vec![0; n].into_boxed_slice(),
            wmask: vec![0; n].into_boxed_slice(),
            w1c: vec![0; n].into_boxed_slice(),
            bars: [BarSlot::Free; NUM_BARS],
            next_cap: reg::HEADER_END,
            last_cap: None,
            next_ext_cap: reg::EXT_CAP_START,
            last_ext_cap: None,
            msix: None,
            bad_accesses: AtomicU64::new(0),
        };
        c.set_u16(reg::VENDOR_ID, h.vendor_id);
        c.set_u16(reg::DEVICE_ID, h.device_id);
        c.set_u8(reg::REVISION_ID, h.revision_id);
        c.set_u8(reg::PROG_IF, h.prog_if);
        c.set_u8(reg::SUBCLASS, h.subclass);
        c.set_u8(reg::CLASS_CODE, h.class_code);
        c.set_u16(reg::SUBSYSTEM_VENDOR_ID, h.subsystem_vendor_id);
        c.set_u16(reg::SUBSYSTEM_ID, h.subsystem_id);
        c.set_u8(reg::INTERRUPT_PIN, h.interrupt_pin);
        let cmd_mask = command::IO_SPACE
            | command::MEMORY_SPACE
            | command::BUS_MASTER
            | command::PARITY_ERROR_RESPONSE
            | command::SERR
            | command::INTX_DISABLE;
        c.set_write_mask(reg::COMMAND, &cmd_mask.to_le_bytes());
        let w1c = status::RW1C.to_le_bytes();
        c.w1c[reg::STATUS as usize..][..2].copy_from_slice(&w1c);
        c.set_write_mask(reg::CACHE_LINE_SIZE, &[0xff, 0xff]);
        c.set_write_mask(reg::INTERRUPT_LINE, &[0xff]);
        c
    }

    /// Size in bytes (256 or 4096).
    pub fn size(&self) -> u16 {
        self.size
    }

    fn valid(&self, offset: u16, len: usize) -> bool {
        matches!(len, 1 | 2 | 4)
            && (offset as usize).is_multiple_of(len)
            && offset as usize + len <= self.size as usize
    }

    /// A guest read: 1, 2 or 4 bytes, naturally aligned, inside the space; anything else reads
    /// all-ones and counts in [`ConfigStats::bad_accesses`].
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        if !self.valid(offset, data.len()) {
            self.bad_accesses.fetch_add(1, Ordering::Relaxed);
            data.fill(0xff);
            return;
        }
        let o = offset as usize;
        data.copy_from_slice(&self.regs[o..o + data.len()]);
    }

    /// A guest write: only bits in the write mask change, write-1-to-clear bits clear; invalid
    /// accesses (as for [`ConfigSpace::read`]) are ignored and counted. A write reaching the
    /// MSI-X message control updates the [`Msix`] added with [`ConfigSpace::add_msix`].
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        if !self.valid(offset, data.len()) {
            self.bad_accesses.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let o = offset as usize;
        for (i, &v) in data.iter().enumerate() {
            let (m, c) = (self.wmask[o + i], self.w1c[o + i]);
            let r = &mut self.regs[o + i];
            *r = ((*r & !m) | (v & m)) & !(v & c);
        }
        if let Some((cap, msix)) = &self.msix {
            let ctrl = cap + 2;
            if o < ctrl as usize + 2 && o + data.len() > ctrl as usize {
                msix.set_control(self.get_u16(ctrl));
            }
        }
    }

    /// The register bytes, for snapshots (masks and layout are rebuilt by the device model).
    pub fn state(&self) -> Vec<u8> {
        self.regs.to_vec()
    }

    /// Restore register bytes saved by [`ConfigSpace::state`] from a function with the same
    /// layout; the MSI-X message control is re-applied to the [`Msix`].
    pub fn restore(&mut self, regs: &[u8]) -> Result<(), PciError> {
        if regs.len() != self.regs.len() {
            return Err(PciError::StateSize(regs.len()));
        }
        self.regs.copy_from_slice(regs);
        if let Some((cap, msix)) = &self.msix {
            msix.set_control(self.get_u16(cap + 2));
        }
        Ok(())
    }

    /// Counters.
    pub fn stats(&self) -> ConfigStats {
        ConfigStats {
            bad_accesses: self.bad_accesses.load(Ordering::Relaxed),
        }
    }

    /// Define BAR `index` of `kind` and `size` bytes (a power of two; memory ≥ 16, I/O 4..=64 Ki).
    /// A 64-bit BAR also takes `index + 1`.
    pub fn add_bar(&mut self, index: u8, kind: BarKind, size: u64) -> Result<(), PciError> {
        let i = index as usize;
        let wide = matches!(kind, BarKind::Memory64 { .. });
        let free = |j: usize| matches!(self.bars.get(j), Some(BarSlot::Free));
        if !free(i) || (wide && !free(i + 1)) {
            return Err(PciError::BarIndex(index));
        }
        let (min, max) = match kind {
            BarKind::Io => (4, 1 << 16),
            BarKind::Memory32 { .. } => (16, 1 << 31),
            BarKind::Memory64 { .. } => (16, 1 << 63),
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(PciError::BarSize(size));
        }
        let at = reg::BAR0 + 4 * index as u16;
        let addr_mask = !(size - 1);
        match kind {
            BarKind::Io => {
                self.set_u32(at, 1);
                self.set_write_mask(at, &((addr_mask as u32) & 0xfffc).to_le_bytes());
            }
            BarKind::Memory32 { prefetchable } | BarKind::Memory64 { prefetchable } => {
                let mut low = (prefetchable as u32) << 3;
                if wide {
                    low |= 0b10 << 1;
                    self.set_write_mask(at + 4, &((addr_mask >> 32) as u32).to_le_bytes());
                    self.bars[i + 1] = BarSlot::Upper;
                }
                self.set_u32(at, low);
                self.set_write_mask(at, &((addr_mask as u32) & 0xffff_fff0).to_le_bytes());
            }
        }
        self.bars[i] = BarSlot::Bar(kind, size);
        Ok(())
    }

    /// The programmed base address of BAR `index` (0 if unprogrammed or undefined).
    pub fn bar_address(&self, index: u8) -> u64 {
        let at = reg::BAR0 + 4 * index as u16;
        match self.bars.get(index as usize) {
            Some(BarSlot::Bar(BarKind::Io, _)) => (self.get_u32(at) & !0x3) as u64,
            Some(BarSlot::Bar(BarKind::Memory32 { .. }, _)) => (self.get_u32(at) & !0xf) as u64,
            Some(BarSlot::Bar(BarKind::Memory64 { .. }, _)) => {
                (self.get_u32(at) & !0xf) as u64 | (self.get_u32(at + 4) as u64) << 32
            }
            _ => 0,
        }
    }

    /// The BARs currently decoded: defined, programmed to a non-zero address, and enabled by the
    /// command register's I/O or memory space bit.
    pub fn bars(&self) -> Vec<PciBar> {
        let cmd = self.get_u16(reg::COMMAND);
        (0..NUM_BARS as u8)
            .filter_map(|index| match self.bars[index as usize] {
                BarSlot::Bar(kind, size) => {
                    let enable = if kind.is_memory() {
                        command::MEMORY_SPACE
                    } else {
                        command::IO_SPACE
                    };
                    let address = self.bar_address(index);
                    (cmd & enable != 0 && address != 0).then_some(PciBar {
                        index,
                        kind,
                        address,
                        size,
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// The size of BAR `index`, if defined.
    pub fn bar_size(&self, index: u8) -> Option<u64> {
        match self.bars.get(index as usize) {
            Some(BarSlot::Bar(_, size)) => Some(*size),
            _ => None,
        }
    }

    /// Append a capability: `id`, the next pointer, then `body`. `wmask` gives the guest-writable
    /// bits of the body's first `wmask.len()` bytes (the rest is read-only). Returns the
    /// capability's offset (4-byte aligned, in 0x40..0x100).
    pub fn add_capability(&mut self, id: u8, body: &[u8], wmask: &[u8]) -> Result<u16, PciError> {
        if wmask.len() > body.len() {
            return Err(PciError::MaskLength);
        }
        let len = (2 + body.len()).next_multiple_of(4);
        let at = self.next_cap;
        if at as usize + len > PCI_CONFIG_SPACE_SIZE as usize {
            return Err(PciError::NoCapabilitySpace(len));
        }
        match self.last_cap {
            Some(prev) => self.set_u8(prev + 1, at as u8),
            None => self.set_u8(reg::CAPABILITY_LIST, at as u8),
        }
        let st = self.get_u16(reg::STATUS) | status::CAPABILITIES_LIST;
        self.set_u16(reg::STATUS, st);
        self.set_u8(at, id);
        self.set_u8(at + 1, 0);
        self.regs[at as usize + 2..][..body.len()].copy_from_slice(body);
        self.set_write_mask(at + 2, wmask);
        self.last_cap = Some(at);
        self.next_cap = at + len as u16;
        Ok(at)
    }

    /// Append an extended capability (PCIe only): the header dword (`id`, `version`, next) then
    /// `body`, with `wmask` as for [`ConfigSpace::add_capability`]. Returns its offset (≥ 0x100).
    pub fn add_ext_capability(
        &mut self,
        id: u16,
        version: u8,
        body: &[u8],
        wmask: &[u8],
    ) -> Result<u16, PciError> {
        if self.size != PCIE_CONFIG_SPACE_SIZE {
            return Err(PciError::NotExpress);
        }
        if wmask.len() > body.len() {
            return Err(PciError::MaskLength);
        }
        let len = (4 + body.len()).next_multiple_of(4);
        let at = self.next_ext_cap;
        if at as usize + len > self.size as usize {
            return Err(PciError::NoCapabilitySpace(len));
        }
        if let Some(prev) = self.last_ext_cap {
            let h = self.get_u32(prev) & 0x000f_ffff;
            self.set_u32(prev, h | (at as u32) << 20);
        }
        self.set_u32(at, id as u32 | ((version & 0xf) as u32) << 16);
        self.regs[at as usize + 4..][..body.len()].copy_from_slice(body);
        self.set_write_mask(at + 4, wmask);
        self.last_ext_cap = Some(at);
        self.next_ext_cap = at + len as u16;
        Ok(at)
    }

    /// Add the MSI-X capability describing `msix` (table size, table and PBA location); guest
    /// writes to its message control then reach `msix` (enable, function mask).
    pub fn add_msix(&mut self, msix: &Msix) -> Result<u16, PciError> {
        if self.msix.is_some() {
            return Err(PciError::MsixTwice);
        }
        let c = msix.config();
        for (bar, offset, len) in [
            (c.table_bar, c.table_offset, msix.table_len()),
            (c.pba_bar, c.pba_offset, msix.pba_len()),
        ] {
            let fits = self
                .bar_size(bar)
                .is_some_and(|size| offset as u64 + len <= size);
            if !fits {
                return Err(PciError::MsixLayout("table or PBA outside its BAR"));
            }
        }
        let mut body = [0u8; MSIX_CAP_LEN - 2];
        body[0..2].copy_from_slice(&(c.vectors - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(c.table_offset | c.table_bar as u32).to_le_bytes());
        body[6..10].copy_from_slice(&(c.pba_offset | c.pba_bar as u32).to_le_bytes());
        // Message control: MSI-X enable (bit 15) and function mask (bit 14) are writable.
        let at = self.add_capability(cap_id::MSIX, &body, &[0, 0xc0])?;
        self.msix = Some((at, msix.clone()));
        Ok(at)
    }

    /// Walk the capability list from the capabilities pointer as a guest would: `(id, offset)`
    /// pairs. Stops at a zero pointer, a pointer into the header, or after 48 entries (a loop).
    pub fn capabilities(&self) -> Vec<(u8, u16)> {
        let mut out = Vec::new();
        let mut at = (self.get_u8(reg::CAPABILITY_LIST) & !3) as u16;
        while at >= reg::HEADER_END && out.len() < 48 {
            out.push((self.get_u8(at), at));
            at = (self.get_u8(at + 1) & !3) as u16;
        }
        out
    }

    /// Walk the extended capability list from 0x100: `(id, version, offset)`. Stops at an empty
    /// header, a pointer below 0x100, or after 960 entries.
    pub fn ext_capabilities(&self) -> Vec<(u16, u8, u16)> {
        let mut out = Vec::new();
        let mut at = reg::EXT_CAP_START;
        while at >= reg::EXT_CAP_START && (at as usize) < self.size as usize && out.len() < 960 {
            let h = self.get_u32(at);
            if h == 0 {
                break;
            }
            out.push((h as u16, ((h >> 16) & 0xf) as u8, at));
            at = ((h >> 20) & !3) as u16;
        }
        out
    }

    /// Replace the guest-writable bits of `mask.len()` bytes at `offset` (device-side setup).
    /// Bytes outside the space are ignored.
    pub fn set_write_mask(&mut self, offset: u16, mask: &[u8]) {
        let o = offset as usize;
        if let Some(dst) = self.wmask.get_mut(o..o + mask.len()) {
            dst.copy_from_slice(mask);
        }
    }

    /// Device-side read of a byte (0 outside the space).
    pub fn get_u8(&self, offset: u16) -> u8 {
        self.regs.get(offset as usize).copied().unwrap_or(0)
    }

    /// Device-side read of a little-endian u16 (0 outside the space).
    pub fn get_u16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.get_bytes(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Device-side read of a little-endian u32 (0 outside the space).
    pub fn get_u32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.get_bytes(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Device-side read of `out.len()` bytes (left unchanged outside the space).
    pub fn get_bytes(&self, offset: u16, out: &mut [u8]) {
        let o = offset as usize;
        if let Some(src) = self.regs.get(o..o + out.len()) {
            out.copy_from_slice(src);
        }
    }

    /// Device-side write of bytes, ignoring the write masks (ignored outside the space).
    pub fn set_bytes(&mut self, offset: u16, data: &[u8]) {
        let o = offset as usize;
        if let Some(dst) = self.regs.get_mut(o..o + data.len()) {
            dst.copy_from_slice(data);
        }
    }

    /// Device-side write of a byte, ignoring the write mask.
    pub fn set_u8(&mut self, offset: u16, v: u8) {
        self.set_bytes(offset, &[v]);
    }

    /// Device-side write of a little-endian u16, ignoring the write mask.
    pub fn set_u16(&mut self, offset: u16, v: u16) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    /// Device-side write of a little-endian u32, ignoring the write mask.
    pub fn set_u32(&mut self, offset: u16, v: u32) {
        self.set_bytes(offset, &v.to_le_bytes());
    }
}
