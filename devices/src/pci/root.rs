//! The PCI root complex: functions on any of the 256 bus numbers of one segment, each named
//! by its [`RequesterId`] (device.function, or an 8-bit ARI function number); configuration
//! mechanism #1 ([`PciConfigIo`], ports 0xCF8/0xCFC per PCI Local Bus spec 3.0 §3.2.2.3.2),
//! ECAM ([`PciEcam`], PCIe base spec §7.2.2) and BAR mapping: after every config write the root
//! re-reads the function's decoded BARs and inserts, relocates or removes their ranges on the
//! VM's PIO/MMIO [`Bus`]es. Functions may appear ([`PciRoot::add_function`]) and disappear
//! ([`PciRoot::remove`]) while the VM runs (hot-plug, SR-IOV VFs). Every side effect — a
//! function added or removed, a BAR mapped, moved or unmapped — is a [`PciEvent`] to the
//! [`PciObserver`]s ([`PciRoot::observe`]), sent after the change and outside the root's locks.
//!
//! No bridges are modelled: every bus number is a root bus of the segment (as with QEMU's
//! `pxb` expander buses), so a function is reachable at its bus number directly.
//!
//! Accesses that are not 1, 2 or 4 bytes naturally aligned, or beyond the 256 buses of ECAM, are
//! ignored (reads all-ones) and counted; so are accesses to absent functions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde::{Deserialize, Serialize};

use super::events::{PciEvent, PciObserver, RequesterId};
use super::{PCIE_CONFIG_SPACE_SIZE, PciBar, PciError, PciFunction};
use crate::{Bus, BusDevice, IoBuses};

/// Bytes of ECAM space per bus (32 devices × 8 functions × 4 KiB).
pub const PCI_ECAM_BUS_SIZE: u64 = 1 << 20;
/// Bytes of ECAM space for all 256 buses of a segment.
pub const PCI_ECAM_SEGMENT_SIZE: u64 = 256 * PCI_ECAM_BUS_SIZE;
/// First port of configuration mechanism #1 (CONFIG_ADDRESS; CONFIG_DATA is at +4).
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
/// Ports the [`PciConfigIo`] device covers (0xCF8..0xD00).
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// CONFIG_ADDRESS enable bit.
pub const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;

/// Counters of the root bus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciStats {
    /// Config accesses with a bad width or alignment, or beyond ECAM's 256 buses (ignored,
    /// reads all-ones).
    pub bad_accesses: u64,
    /// Config accesses to a device/function with nothing present (reads all-ones).
    pub absent_function_accesses: u64,
    /// BARs that could not be mapped (overlap, I/O above 64 KiB, buses gone).
    pub bar_map_errors: u64,
}

struct Slot {
    name: String,
    function: Arc<Mutex<dyn PciFunction>>,
    mapped: Vec<PciBar>,
}

#[derive(Default)]
struct RootState {
    slots: BTreeMap<RequesterId, Slot>,
    config_address: u32,
}

/// The PCI root complex (one segment) with its functions.
pub struct PciRoot {
    buses: Weak<IoBuses>,
    state: Mutex<RootState>,
    observers: Mutex<Vec<Arc<dyn PciObserver>>>,
    bad_accesses: AtomicU64,
    absent: AtomicU64,
    bar_map_errors: AtomicU64,
}

impl PciRoot {
    /// An empty bus that maps BARs on `buses` (held weakly: the buses own the root's config
    /// devices, not the other way round).
    pub fn new(buses: &Arc<IoBuses>) -> Arc<Self> {
        Arc::new(Self {
            buses: Arc::downgrade(buses),
            state: Mutex::default(),
            observers: Mutex::default(),
            bad_accesses: AtomicU64::new(0),
            absent: AtomicU64::new(0),
            bar_map_errors: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, RootState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tell `observer` about every [`PciEvent`] from now on.
    pub fn observe(&self, observer: Arc<dyn PciObserver>) {
        self.observers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(observer);
    }

    fn emit(&self, events: &[PciEvent]) {
        if events.is_empty() {
            return;
        }
        let observers = self
            .observers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for e in events {
            for o in &observers {
                o.pci_event(e);
            }
        }
    }

    /// Put `function` at bus 0, `device`.`func` (device 0..32, func 0..8). Its BARs map once the
    /// guest (or the VMM, through [`PciRoot::config_write`]) programs and enables them.
    ///
    /// # Errors
    ///
    /// A bad slot number, or a slot in use.
    pub fn add(
        &self,
        device: u8,
        func: u8,
        name: &str,
        function: Arc<Mutex<dyn PciFunction>>,
    ) -> Result<(), PciError> {
        self.add_function(RequesterId::new(0, device, func)?, name, function)
    }

    /// Put `function` at `rid` — any bus, ARI function numbers included — now or while the VM
    /// runs (hot-plug). The function learns its requester ID ([`PciFunction::attached`]);
    /// observers get [`PciEvent::FunctionAdded`] (and `BarMapped` for BARs it already decodes).
    ///
    /// # Errors
    ///
    /// [`PciError::SlotInUse`] when a function is already at `rid`.
    pub fn add_function(
        &self,
        rid: RequesterId,
        name: &str,
        function: Arc<Mutex<dyn PciFunction>>,
    ) -> Result<(), PciError> {
        {
            let mut st = self.lock();
            if st.slots.contains_key(&rid) {
                return Err(PciError::SlotInUse {
                    device: rid.device(),
                    function: rid.function(),
                });
            }
            st.slots.insert(
                rid,
                Slot {
                    name: name.into(),
                    function: function.clone(),
                    mapped: Vec::new(),
                },
            );
        }
        function
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .attached(rid);
        self.emit(&[PciEvent::FunctionAdded(rid)]);
        // A function may come with BARs already decoded (programmed by the VMM).
        self.resync(rid);
        Ok(())
    }

    /// Put `function` at function 0 of the lowest free device number on bus 0; returns that
    /// number.
    ///
    /// # Errors
    ///
    /// [`PciError::BusFull`] when all 32 device numbers are taken.
    pub fn add_next(
        &self,
        name: &str,
        function: Arc<Mutex<dyn PciFunction>>,
    ) -> Result<u8, PciError> {
        let device = {
            let st = self.lock();
            (0..32u8)
                .find(|d| !st.slots.keys().any(|r| r.bus() == 0 && r.device() == *d))
                .ok_or(PciError::BusFull)?
        };
        self.add(device, 0, name, function)?;
        Ok(device)
    }

    /// Take the function at `rid` off the bus while the VM runs (hot-unplug): its BARs are
    /// unmapped (observers get `BarUnmapped` for each, then [`PciEvent::FunctionRemoved`]) and
    /// later accesses find nothing there.
    pub fn remove(&self, rid: RequesterId) -> Option<Arc<Mutex<dyn PciFunction>>> {
        let slot = self.lock().slots.remove(&rid)?;
        let mut events = Vec::with_capacity(slot.mapped.len() + 1);
        if let Some(buses) = self.buses.upgrade() {
            for bar in &slot.mapped {
                let _ = bus_of(&buses, bar).remove(bar.address);
                events.push(PciEvent::BarUnmapped { rid, bar: *bar });
            }
        }
        events.push(PciEvent::FunctionRemoved(rid));
        self.emit(&events);
        Some(slot.function)
    }

    /// The function at bus 0, `device`.`func`.
    pub fn function(&self, device: u8, func: u8) -> Option<Arc<Mutex<dyn PciFunction>>> {
        self.function_at(RequesterId::new(0, device, func).ok()?)
    }

    /// The function at `rid`.
    pub fn function_at(&self, rid: RequesterId) -> Option<Arc<Mutex<dyn PciFunction>>> {
        self.lock().slots.get(&rid).map(|s| s.function.clone())
    }

    /// Every function's requester ID and name, in requester-ID order.
    pub fn functions(&self) -> Vec<(RequesterId, String)> {
        self.lock()
            .slots
            .iter()
            .map(|(r, s)| (*r, s.name.clone()))
            .collect()
    }

    /// The BARs currently mapped for bus 0, `device`.`func`.
    pub fn mapped_bars(&self, device: u8, func: u8) -> Vec<PciBar> {
        RequesterId::new(0, device, func)
            .map(|rid| self.mapped_bars_of(rid))
            .unwrap_or_default()
    }

    /// The BARs currently mapped for `rid`.
    pub fn mapped_bars_of(&self, rid: RequesterId) -> Vec<PciBar> {
        self.lock()
            .slots
            .get(&rid)
            .map(|s| s.mapped.clone())
            .unwrap_or_default()
    }

    /// Counters.
    pub fn stats(&self) -> PciStats {
        PciStats {
            bad_accesses: self.bad_accesses.load(Ordering::Relaxed),
            absent_function_accesses: self.absent.load(Ordering::Relaxed),
            bar_map_errors: self.bar_map_errors.load(Ordering::Relaxed),
        }
    }

    fn check(&self, offset: u16, len: usize) -> bool {
        let ok = matches!(len, 1 | 2 | 4)
            && (offset as usize).is_multiple_of(len)
            && offset as usize + len <= PCIE_CONFIG_SPACE_SIZE as usize;
        if !ok {
            self.bad_accesses.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// A configuration read of `bus`/`devfn` (device << 3 | function, or an ARI function
    /// number) at `offset`.
    pub fn config_read(&self, bus: u8, devfn: u8, offset: u16, data: &mut [u8]) {
        data.fill(0xff);
        if !self.check(offset, data.len()) {
            return;
        }
        let rid = RequesterId::ari(bus, devfn);
        let f = self.lock().slots.get(&rid).map(|s| s.function.clone());
        match f {
            Some(f) => f
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_read(offset, data),
            None => {
                self.absent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A configuration write; afterwards the function's BAR mappings follow its BARs.
    pub fn config_write(&self, bus: u8, devfn: u8, offset: u16, data: &[u8]) {
        if !self.check(offset, data.len()) {
            return;
        }
        let rid = RequesterId::ari(bus, devfn);
        let f = self.lock().slots.get(&rid).map(|s| s.function.clone());
        match f {
            Some(f) => {
                f.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .config_write(offset, data);
                self.resync(rid);
            }
            None => {
                self.absent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Make the bus mappings of `rid` match what the function decodes now, and tell the
    /// observers what moved. Config writes through the root do it themselves; call it after
    /// changing a function's configuration space directly (e.g. restoring a snapshot).
    pub fn resync(&self, rid: RequesterId) {
        let events = self.sync_bars(rid);
        self.emit(&events);
    }

    fn sync_bars(&self, rid: RequesterId) -> Vec<PciEvent> {
        let mut events = Vec::new();
        let mut st = self.lock();
        let Some(slot) = st.slots.get_mut(&rid) else {
            return events;
        };
        let want = slot
            .function
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bars();
        if want == slot.mapped {
            return events;
        }
        let Some(buses) = self.buses.upgrade() else {
            self.bar_map_errors.fetch_add(1, Ordering::Relaxed);
            return events;
        };
        let mut mapped = Vec::new();
        for old in &slot.mapped {
            let new = want.iter().find(|b| b.index == old.index);
            if new == Some(old) {
                mapped.push(*old);
                continue;
            }
            let bus = bus_of(&buses, old);
            // Same BAR moved: relocate keeps the device entry; anything else is remove + insert.
            if let Some(n) = new
                && n.kind == old.kind
                && n.size == old.size
                && fits(n)
                && bus.relocate(old.address, n.address).is_ok()
            {
                mapped.push(*n);
                events.push(PciEvent::BarMoved {
                    rid,
                    from: *old,
                    to: *n,
                });
                continue;
            }
            let _ = bus.remove(old.address);
            events.push(PciEvent::BarUnmapped { rid, bar: *old });
        }
        for n in &want {
            if mapped.iter().any(|m| m.index == n.index) {
                continue;
            }
            let region = Arc::new(BarRegion {
                function: slot.function.clone(),
                index: n.index,
            });
            let name = format!("{}/bar{}", slot.name, n.index);
            if fits(n)
                && bus_of(&buses, n)
                    .insert(n.address, n.size, &name, region)
                    .is_ok()
            {
                mapped.push(*n);
                events.push(PciEvent::BarMapped { rid, bar: *n });
            } else {
                self.bar_map_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        mapped.sort_by_key(|b| b.index);
        slot.mapped = mapped;
        events
    }

    /// The configuration mechanism #1 device for the PIO bus at [`PCI_CONFIG_IO_PORT`]
    /// (length [`PCI_CONFIG_IO_LEN`]).
    pub fn config_io(self: &Arc<Self>) -> Arc<PciConfigIo> {
        Arc::new(PciConfigIo(self.clone()))
    }

    /// The ECAM device for the MMIO bus: insert it with length [`PCI_ECAM_BUS_SIZE`] times the
    /// number of buses it covers from bus 0 (at most [`PCI_ECAM_SEGMENT_SIZE`]).
    pub fn ecam(self: &Arc<Self>) -> Arc<PciEcam> {
        Arc::new(PciEcam(self.clone()))
    }
}

fn bus_of<'a>(buses: &'a IoBuses, bar: &PciBar) -> &'a Bus {
    if bar.kind.is_memory() {
        &buses.mmio
    } else {
        &buses.pio
    }
}

/// I/O BARs must lie in the 16-bit port space.
fn fits(bar: &PciBar) -> bool {
    bar.kind.is_memory() || bar.address.saturating_add(bar.size) <= 0x1_0000
}

/// A mapped BAR on a bus: forwards to the function.
struct BarRegion {
    function: Arc<Mutex<dyn PciFunction>>,
    index: u8,
}

impl BusDevice for BarRegion {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.function
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_read(self.index, offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.function
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bar_write(self.index, offset, data)
    }
}

/// Configuration mechanism #1: CONFIG_ADDRESS (dword at 0xCF8) and CONFIG_DATA (0xCFC..0xD00,
/// byte/word/dword). Register it on the PIO bus at 0xCF8 with length 8.
pub struct PciConfigIo(Arc<PciRoot>);

impl PciConfigIo {
    fn target(&self, offset: u64) -> Option<(u8, u8, u16)> {
        let a = self.0.lock().config_address;
        (a & CONFIG_ADDRESS_ENABLE != 0).then(|| {
            let reg = (a & 0xfc) as u16 + (offset as u16 & 3);
            ((a >> 16) as u8, (a >> 8) as u8, reg)
        })
    }
}

impl BusDevice for PciConfigIo {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => {
                data.copy_from_slice(&self.0.lock().config_address.to_le_bytes());
            }
            4..8 => match self.target(offset) {
                Some((bus, df, reg)) => self.0.config_read(bus, df, reg, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match offset {
            0 => {
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    self.0.lock().config_address = u32::from_le_bytes(b) & 0x80ff_fffc;
                }
            }
            4..8 => {
                if let Some((bus, df, reg)) = self.target(offset) {
                    self.0.config_write(bus, df, reg, data);
                }
            }
            _ => {}
        }
    }
}

/// ECAM: `offset = bus << 20 | devfn << 12 | register` (PCIe base spec §7.2.2, Table 7-1).
/// Register it on the MMIO bus with length [`PCI_ECAM_BUS_SIZE`] per bus covered.
pub struct PciEcam(Arc<PciRoot>);

/// `(bus, devfn, register)` of an ECAM offset; `None` beyond the 256 buses of a segment.
fn ecam_decode(offset: u64) -> Option<(u8, u8, u16)> {
    (offset < PCI_ECAM_SEGMENT_SIZE).then_some((
        (offset >> 20) as u8,
        (offset >> 12) as u8,
        (offset & 0xfff) as u16,
    ))
}

impl BusDevice for PciEcam {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match ecam_decode(offset) {
            Some((bus, df, reg)) => self.0.config_read(bus, df, reg, data),
            None => {
                data.fill(0xff);
                self.0.bad_accesses.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        match ecam_decode(offset) {
            Some((bus, df, reg)) => self.0.config_write(bus, df, reg, data),
            None => {
                self.0.bad_accesses.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
