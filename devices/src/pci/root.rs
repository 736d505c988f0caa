//! The PCI root bus (bus 0): configuration mechanism #1 ([`PciConfigIo`], ports 0xCF8/0xCFC
//! per PCI Local Bus spec 3.0 §3.2.2.3.2), ECAM ([`PciEcam`], PCIe base spec §7.2.2) and BAR
//! mapping: after every config write the root re-reads the function's decoded BARs and inserts,
//! relocates or removes their ranges on the VM's PIO/MMIO [`Bus`]es.
//!
//! Accesses that are not 1, 2 or 4 bytes naturally aligned, or that name a bus other than 0, are
//! ignored (reads all-ones) and counted; so are accesses to absent functions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde::{Deserialize, Serialize};

use super::{PCIE_CONFIG_SPACE_SIZE, PciBar, PciError, PciFunction};
use crate::{Bus, BusDevice, IoBuses};

/// Bytes of ECAM space per bus (32 devices × 8 functions × 4 KiB).
pub const PCI_ECAM_BUS_SIZE: u64 = 1 << 20;
/// First port of configuration mechanism #1 (CONFIG_ADDRESS; CONFIG_DATA is at +4).
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
/// Ports the [`PciConfigIo`] device covers (0xCF8..0xD00).
pub const PCI_CONFIG_IO_LEN: u64 = 8;
/// CONFIG_ADDRESS enable bit.
pub const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;

/// Counters of the root bus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciStats {
    /// Config accesses with a bad width, alignment or bus number (ignored, reads all-ones).
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
    slots: BTreeMap<u8, Slot>,
    config_address: u32,
}

/// PCI bus 0 with its functions.
pub struct PciRoot {
    buses: Weak<IoBuses>,
    state: Mutex<RootState>,
    bad_accesses: AtomicU64,
    absent: AtomicU64,
    bar_map_errors: AtomicU64,
}

fn devfn(device: u8, function: u8) -> Result<u8, PciError> {
    if device >= 32 || function >= 8 {
        return Err(PciError::BadSlot { device, function });
    }
    Ok(device << 3 | function)
}

impl PciRoot {
    /// An empty bus that maps BARs on `buses` (held weakly: the buses own the root's config
    /// devices, not the other way round).
    pub fn new(buses: &Arc<IoBuses>) -> Arc<Self> {
        Arc::new(Self {
            buses: Arc::downgrade(buses),
            state: Mutex::default(),
            bad_accesses: AtomicU64::new(0),
            absent: AtomicU64::new(0),
            bar_map_errors: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, RootState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Put `function` at `device`.`func` (device 0..32, func 0..8). Its BARs map once the guest
    /// (or the VMM, through [`PciRoot::config_write`]) programs and enables them.
    pub fn add(
        &self,
        device: u8,
        func: u8,
        name: &str,
        function: Arc<Mutex<dyn PciFunction>>,
    ) -> Result<(), PciError> {
        let df = devfn(device, func)?;
        let mut st = self.lock();
        if st.slots.contains_key(&df) {
            return Err(PciError::SlotInUse {
                device,
                function: func,
            });
        }
        st.slots.insert(
            df,
            Slot {
                name: name.into(),
                function,
                mapped: Vec::new(),
            },
        );
        drop(st);
        // A function may come with BARs already decoded (programmed by the VMM).
        self.sync_bars(df);
        Ok(())
    }

    /// Put `function` at function 0 of the lowest free device number; returns that number.
    pub fn add_next(
        &self,
        name: &str,
        function: Arc<Mutex<dyn PciFunction>>,
    ) -> Result<u8, PciError> {
        let device = {
            let st = self.lock();
            (0..32u8)
                .find(|d| !st.slots.keys().any(|df| df >> 3 == *d))
                .ok_or(PciError::BusFull)?
        };
        self.add(device, 0, name, function)?;
        Ok(device)
    }

    /// The function at `device`.`func`.
    pub fn function(&self, device: u8, func: u8) -> Option<Arc<Mutex<dyn PciFunction>>> {
        let df = devfn(device, func).ok()?;
        self.lock().slots.get(&df).map(|s| s.function.clone())
    }

    /// The BARs currently mapped for `device`.`func`.
    pub fn mapped_bars(&self, device: u8, func: u8) -> Vec<PciBar> {
        let Ok(df) = devfn(device, func) else {
            return Vec::new();
        };
        self.lock()
            .slots
            .get(&df)
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

    fn check(&self, bus: u8, offset: u16, len: usize) -> bool {
        let ok = bus == 0
            && matches!(len, 1 | 2 | 4)
            && (offset as usize).is_multiple_of(len)
            && offset as usize + len <= PCIE_CONFIG_SPACE_SIZE as usize;
        if !ok {
            self.bad_accesses.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// A configuration read of `bus`/`devfn` (device << 3 | function) at `offset`.
    pub fn config_read(&self, bus: u8, devfn: u8, offset: u16, data: &mut [u8]) {
        data.fill(0xff);
        if !self.check(bus, offset, data.len()) {
            return;
        }
        let f = self.lock().slots.get(&devfn).map(|s| s.function.clone());
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
        if !self.check(bus, offset, data.len()) {
            return;
        }
        let f = self.lock().slots.get(&devfn).map(|s| s.function.clone());
        match f {
            Some(f) => {
                f.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .config_write(offset, data);
                self.sync_bars(devfn);
            }
            None => {
                self.absent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Make the bus mappings of `df` match what the function decodes.
    fn sync_bars(&self, df: u8) {
        let mut st = self.lock();
        let Some(slot) = st.slots.get_mut(&df) else {
            return;
        };
        let want = slot
            .function
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bars();
        if want == slot.mapped {
            return;
        }
        let Some(buses) = self.buses.upgrade() else {
            self.bar_map_errors.fetch_add(1, Ordering::Relaxed);
            return;
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
                continue;
            }
            let _ = bus.remove(old.address);
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
            } else {
                self.bar_map_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        mapped.sort_by_key(|b| b.index);
        slot.mapped = mapped;
    }

    /// The configuration mechanism #1 device for the PIO bus at [`PCI_CONFIG_IO_PORT`]
    /// (length [`PCI_CONFIG_IO_LEN`]).
    pub fn config_io(self: &Arc<Self>) -> Arc<PciConfigIo> {
        Arc::new(PciConfigIo(self.clone()))
    }

    /// The ECAM device for the MMIO bus (insert it with length [`PCI_ECAM_BUS_SIZE`]: bus 0).
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

/// ECAM: `offset = bus << 20 | device << 15 | function << 12 | register`. Register it on the MMIO
/// bus with length [`PCI_ECAM_BUS_SIZE`] (only bus 0 exists).
pub struct PciEcam(Arc<PciRoot>);

fn ecam_decode(offset: u64) -> (u8, u8, u16) {
    (
        (offset >> 20) as u8 | if offset >> 28 != 0 { 0xff } else { 0 },
        (offset >> 12) as u8,
        (offset & 0xfff) as u16,
    )
}

impl BusDevice for PciEcam {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let (bus, df, reg) = ecam_decode(offset);
        self.0.config_read(bus, df, reg, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let (bus, df, reg) = ecam_decode(offset);
        self.0.config_write(bus, df, reg, data)
    }
}
