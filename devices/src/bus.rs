//! Address-range buses for port I/O and MMIO.
//!
//! A [`Bus`] maps non-overlapping ranges `[base, base + len)` to [`BusDevice`]s and forwards each
//! access with the offset inside the range. An access that no device fully contains is counted
//! and, for reads, answered with all-ones — a guest can never make the bus panic.
//!
//! Devices take `&self`; a device with plain `&mut self` state implements [`MutBusDevice`] and
//! is registered inside a `Mutex` (the blanket impl), so the locking choice is made once, at
//! registration.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_devices::{Bus, BusError, MutBusDevice};
//!
//! #[derive(Default)]
//! struct Scratch([u8; 4]);
//! impl MutBusDevice for Scratch {
//!     fn read(&mut self, offset: u64, data: &mut [u8]) {
//!         let o = offset as usize;
//!         data.copy_from_slice(&self.0[o..o + data.len()]);
//!     }
//!     fn write(&mut self, offset: u64, data: &[u8]) {
//!         let o = offset as usize;
//!         self.0[o..o + data.len()].copy_from_slice(data);
//!     }
//! }
//!
//! let bus = Bus::new();
//! bus.insert(0x100, 4, "scratch", Arc::new(Mutex::new(Scratch::default()))).unwrap();
//! bus.write(0x102, &[7]);
//! let mut b = [0u8; 1];
//! assert!(bus.read(0x102, &mut b));
//! assert_eq!(b, [7]);
//! // Unclaimed: all-ones, counted.
//! let mut b = [0u8; 2];
//! assert!(!bus.read(0x200, &mut b));
//! assert_eq!(b, [0xff, 0xff]);
//! assert_eq!(bus.stats().unclaimed_reads, 1);
//! // Overlap is a typed error.
//! let dup = Arc::new(Mutex::new(Scratch::default()));
//! assert!(matches!(bus.insert(0x103, 1, "dup", dup), Err(BusError::Overlap { .. })));
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmkit_vcpu::IoHandler;

/// A device on a bus. `offset` is relative to the base the device was inserted at; the access
/// `offset..offset + data.len()` always lies inside the device's range.
pub trait BusDevice: Send + Sync {
    /// A guest load: fill `data`.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A guest store.
    fn write(&self, offset: u64, data: &[u8]);
}

/// A bus device with exclusive (`&mut self`) access; register it as `Mutex<T>`.
pub trait MutBusDevice: Send {
    /// A guest load: fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest store.
    fn write(&mut self, offset: u64, data: &[u8]);
}

impl<T: MutBusDevice> BusDevice for Mutex<T> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // A poisoned lock means a device panicked earlier; keep serving with its state.
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data)
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data)
    }
}

/// Errors from changing a bus.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a registered one.
    #[error(
        "range {base:#x}+{len:#x} overlaps `{existing}` at {existing_base:#x}+{existing_len:#x}"
    )]
    Overlap {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
        /// Name of the device already there.
        existing: String,
        /// Its base.
        existing_base: u64,
        /// Its length.
        existing_len: u64,
    },
    /// Zero-length range.
    #[error("zero-length range at {0:#x}")]
    ZeroLength(u64),
    /// `base + len` overflows.
    #[error("range {base:#x}+{len:#x} overflows the address space")]
    Overflow {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
    },
    /// No device is registered at that base.
    #[error("no device registered at {0:#x}")]
    NotFound(u64),
}

/// Counters of a bus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusStats {
    /// Reads no device claimed (answered with all-ones).
    pub unclaimed_reads: u64,
    /// Writes no device claimed (dropped).
    pub unclaimed_writes: u64,
}

#[derive(Clone)]
struct Entry {
    len: u64,
    name: String,
    device: Arc<dyn BusDevice>,
}

/// A range → device map with unclaimed-access counters. Insertion and removal take `&self`, so
/// a bus can be changed while vCPUs use it (e.g. PCI BAR relocation).
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, Entry>>,
    unclaimed_reads: AtomicU64,
    unclaimed_writes: AtomicU64,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `device` for `[base, base + len)`.
    pub fn insert(
        &self,
        base: u64,
        len: u64,
        name: &str,
        device: Arc<dyn BusDevice>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        // The only candidates: the last range starting before `end`.
        if let Some((&b, e)) = map.range(..end).next_back()
            && b + e.len > base
        {
            return Err(BusError::Overlap {
                base,
                len,
                existing: e.name.clone(),
                existing_base: b,
                existing_len: e.len,
            });
        }
        map.insert(
            base,
            Entry {
                len,
                name: name.into(),
                device,
            },
        );
        Ok(())
    }

    /// Unregister the device at `base`, returning it.
    pub fn remove(&self, base: u64) -> Result<Arc<dyn BusDevice>, BusError> {
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    /// Move the device at `old_base` to `new_base` (same length). On error nothing changes.
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let entry = {
            let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
            map.remove(&old_base).ok_or(BusError::NotFound(old_base))?
        };
        if let Err(e) = self.insert(new_base, entry.len, &entry.name, entry.device.clone()) {
            let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
            map.insert(old_base, entry);
            return Err(e);
        }
        Ok(())
    }

    /// The device whose range fully contains `addr..addr + len`, with the offset of `addr`.
    fn resolve(&self, addr: u64, len: usize) -> Option<(Arc<dyn BusDevice>, u64)> {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (&base, e) = map.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(len as u64)? <= e.len).then(|| (e.device.clone(), offset))
    }

    /// Dispatch a read; returns whether a device claimed it (otherwise `data` is all-ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                dev.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unclaimed_reads.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Dispatch a write; returns whether a device claimed it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((dev, offset)) => {
                dev.write(offset, data);
                true
            }
            None => {
                self.unclaimed_writes.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Unclaimed-access counters.
    pub fn stats(&self) -> BusStats {
        BusStats {
            unclaimed_reads: self.unclaimed_reads.load(Ordering::Relaxed),
            unclaimed_writes: self.unclaimed_writes.load(Ordering::Relaxed),
        }
    }

    /// Registered ranges as `(base, len, name)`, sorted.
    pub fn ranges(&self) -> Vec<(u64, u64, String)> {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        map.iter()
            .map(|(&b, e)| (b, e.len, e.name.clone()))
            .collect()
    }
}

/// The two buses of an x86 VM; plugs into the vCPU run loop as its [`IoHandler`].
#[derive(Default)]
pub struct IoBuses {
    /// Port I/O (16-bit port numbers).
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

impl IoHandler for IoBuses {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        self.pio.read(port as u64, data);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.pio.write(port as u64, data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        self.mmio.read(addr, data);
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.write(addr, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Records every access as (offset, len, is_write).
    #[derive(Default)]
    struct Probe(Mutex<Vec<(u64, usize, bool)>>, u8);

    impl BusDevice for Probe {
        fn read(&self, offset: u64, data: &mut [u8]) {
            self.0.lock().unwrap().push((offset, data.len(), false));
            data.fill(self.1);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.len(), true));
        }
    }

    #[test]
    fn dispatch_reaches_the_right_device_with_the_right_offset() {
        let bus = Bus::new();
        let a = Arc::new(Probe(Mutex::default(), 0xaa));
        let b = Arc::new(Probe(Mutex::default(), 0xbb));
        bus.insert(0x1000, 0x100, "a", a.clone()).unwrap();
        bus.insert(0x1100, 0x10, "b", b.clone()).unwrap();
        let mut d = [0u8; 4];
        assert!(bus.read(0x10fc, &mut d));
        assert_eq!(d, [0xaa; 4]);
        assert!(bus.write(0x1104, &[1, 2]));
        assert!(bus.read(0x110f, &mut d[..1]));
        assert_eq!(*a.0.lock().unwrap(), [(0xfc, 4, false)]);
        assert_eq!(*b.0.lock().unwrap(), [(4, 2, true), (0xf, 1, false)]);
        assert_eq!(bus.stats(), BusStats::default());
    }

    #[test]
    fn straddling_and_unclaimed_accesses_are_counted() {
        let bus = Bus::new();
        let a = Arc::new(Probe(Mutex::default(), 0));
        bus.insert(0x10, 4, "a", a.clone()).unwrap();
        let mut d = [0u8; 4];
        assert!(!bus.read(0x12, &mut d)); // crosses the end of `a`
        assert_eq!(d, [0xff; 4]);
        assert!(!bus.write(0x0, &[1]));
        assert!(!bus.write(u64::MAX, &[1, 2])); // offset + len overflows
        assert!(!bus.read(u64::MAX, &mut d));
        assert_eq!(
            bus.stats(),
            BusStats {
                unclaimed_reads: 2,
                unclaimed_writes: 2
            }
        );
        assert!(a.0.lock().unwrap().is_empty());
    }

    #[test]
    fn insert_errors() {
        let bus = Bus::new();
        let d = || Arc::new(Probe::default()) as Arc<dyn BusDevice>;
        bus.insert(0x100, 0x10, "a", d()).unwrap();
        let overlap = |base, len| {
            matches!(
                bus.insert(base, len, "x", d()),
                Err(BusError::Overlap { .. })
            )
        };
        assert!(overlap(0x100, 1));
        assert!(overlap(0xff, 2));
        assert!(overlap(0x10f, 1));
        assert!(overlap(0x0, 0x1000));
        assert_eq!(
            bus.insert(0x50, 0, "z", d()),
            Err(BusError::ZeroLength(0x50)).map(|_: ()| ())
        );
        assert!(matches!(
            bus.insert(u64::MAX, 2, "o", d()),
            Err(BusError::Overflow { .. })
        ));
        bus.insert(0xf0, 0x10, "below", d()).unwrap();
        bus.insert(0x110, 0x10, "above", d()).unwrap();
        assert_eq!(bus.ranges().len(), 3);
        assert!(matches!(bus.remove(0x123), Err(BusError::NotFound(0x123))));
    }

    #[test]
    fn relocate_moves_or_leaves_unchanged() {
        let bus = Bus::new();
        let p = Arc::new(Probe(Mutex::default(), 1));
        bus.insert(0x1000, 0x10, "p", p.clone()).unwrap();
        bus.insert(0x3000, 0x10, "q", Arc::new(Probe::default()))
            .unwrap();
        assert!(matches!(
            bus.relocate(0x1000, 0x3008),
            Err(BusError::Overlap { .. })
        ));
        assert!(bus.write(0x1000, &[0]));
        bus.relocate(0x1000, 0x2000).unwrap();
        assert!(!bus.write(0x1000, &[0]));
        assert!(bus.write(0x2004, &[0]));
        assert_eq!(p.0.lock().unwrap().last(), Some(&(4, 1, true)));
    }

    proptest! {
        #[test]
        fn random_ranges_never_overlap_and_dispatch_matches_a_model(
            ranges in proptest::collection::vec((0u64..0x1000, 1u64..0x40), 1..30),
            probes in proptest::collection::vec((0u64..0x1100, 1usize..8), 50),
        ) {
            let bus = Bus::new();
            let mut model: Vec<(u64, u64)> = Vec::new();
            for (base, len) in ranges {
                let clash = model.iter().any(|&(b, l)| base < b + l && b < base + len);
                let r = bus.insert(base, len, "d", Arc::new(Probe::default()));
                prop_assert_eq!(r.is_err(), clash);
                if !clash { model.push((base, len)); }
            }
            let mut unclaimed = 0;
            for (addr, len) in probes {
                let expect = model.iter().any(|&(b, l)| addr >= b && addr + len as u64 <= b + l);
                let mut d = vec![0u8; len];
                prop_assert_eq!(bus.read(addr, &mut d), expect);
                if !expect { unclaimed += 1; }
            }
            prop_assert_eq!(bus.stats().unclaimed_reads, unclaimed);
        }
    }
}
