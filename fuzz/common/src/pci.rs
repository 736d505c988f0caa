//! Fuzz the PCI configuration paths: configuration mechanism #1 (ports 0xCF8..0xD00), ECAM,
//! and BAR MMIO (MSI-X table and PBA) of a function with every BAR kind, capabilities, an
//! extended capability and MSI-X, plus device-side vector signals.
//!
//! Invariants: nothing panics; the read-only identity and the capability lists never change;
//! every message sent decodes as far as the guest programmed it (no check) and is counted.

use std::sync::{Arc, Mutex};

use arbitrary::{Arbitrary, Unstructured};
use vmkit_devices::IoBuses;
use vmkit_devices::msi::RecordingMsiSink;
use vmkit_devices::pci::{
    BarKind, ConfigSpace, Msix, MsixConfig, PciFunction, PciHeader, PciRoot, cap_id, ext_cap_id,
};

/// Where the ECAM window sits in the fuzzed VM.
pub const ECAM_BASE: u64 = 0xb000_0000;

/// One guest access or device action.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// Port I/O in 0xCF8..0xD00.
    Port {
        /// Port offset from 0xCF8 (mod 8).
        offset: u8,
        /// Store (else load).
        write: bool,
        /// Value to store (its low `len` bytes).
        value: u32,
        /// Width (mod 5).
        len: u8,
    },
    /// ECAM access (offset mod 2 MiB: bus 0 and 1).
    Ecam {
        /// Offset into the window.
        offset: u32,
        /// Store (else load).
        write: bool,
        /// Value to store.
        value: u64,
        /// Width (mod 9).
        len: u8,
    },
    /// Any MMIO access (hits mapped BARs wherever the guest put them).
    Mmio {
        /// Address.
        addr: u64,
        /// Store (else load).
        write: bool,
        /// Value.
        value: u64,
        /// Width (mod 9).
        len: u8,
    },
    /// The device signals an MSI-X vector (any number).
    Signal {
        /// Vector.
        vector: u16,
    },
}

struct Function {
    cfg: ConfigSpace,
    msix: Msix,
}

impl PciFunction for Function {
    fn config_space(&self) -> &ConfigSpace {
        &self.cfg
    }
    fn config_space_mut(&mut self) -> &mut ConfigSpace {
        &mut self.cfg
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if !self.msix.bar_read(bar, offset, data) {
            data.fill(0);
        }
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.msix.bar_write(bar, offset, data);
    }
}

fn header() -> PciHeader {
    PciHeader {
        vendor_id: 0x1af4,
        device_id: 0x1044,
        class_code: 0xff,
        ..Default::default()
    }
}

/// Run one input.
pub fn run(data: &[u8]) {
    let Ok(ops) = Unstructured::new(data).arbitrary::<Vec<Op>>() else {
        return;
    };
    let sink = Arc::new(RecordingMsiSink::default());
    let Ok(msix) = Msix::new(MsixConfig::in_bar(2, 5, 0x100), sink.clone()) else {
        return;
    };
    let mut cfg = ConfigSpace::new(&header());
    let bars = [
        (
            0,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x1000,
        ),
        (1, BarKind::Io, 0x20),
        (2, BarKind::Memory64 { prefetchable: true }, 0x1000),
    ];
    for (i, kind, size) in bars {
        cfg.add_bar(i, kind, size).expect("static BAR layout");
    }
    cfg.add_capability(cap_id::VENDOR_SPECIFIC, &[8, 1, 2, 3, 4, 5], &[0, 0, 0xff])
        .expect("static capability");
    cfg.add_msix(&msix).expect("static MSI-X layout");
    cfg.add_ext_capability(ext_cap_id::VNDR, 1, &[0; 8], &[0xff; 4])
        .expect("static extended capability");
    let caps = cfg.capabilities();
    let ext_caps = cfg.ext_capabilities();
    let function = Arc::new(Mutex::new(Function {
        cfg,
        msix: msix.clone(),
    }));
    let buses = Arc::new(IoBuses::default());
    let root = PciRoot::new(&buses);
    root.add(0, 0, "f", function.clone()).expect("empty bus");
    let (io, ecam) = (root.config_io(), root.ecam());
    buses.pio.insert(0xcf8, 8, "cf8", io).expect("empty bus");
    buses
        .mmio
        .insert(ECAM_BASE, 1 << 21, "ecam", ecam)
        .expect("empty bus");
    for op in ops {
        match op {
            Op::Port {
                offset,
                write,
                value,
                len,
            } => {
                let b = value.to_le_bytes();
                let port = 0xcf8 + (offset % 8) as u64;
                let n = (len % 5) as usize;
                if write {
                    buses.pio.write(port, &b[..n]);
                } else {
                    buses.pio.read(port, &mut [0u8; 4][..n]);
                }
            }
            Op::Ecam {
                offset,
                write,
                value,
                len,
            } => {
                let addr = ECAM_BASE + (offset % (1 << 21)) as u64;
                access(&buses.mmio, addr, write, value, len);
            }
            Op::Mmio {
                addr,
                write,
                value,
                len,
            } => access(&buses.mmio, addr, write, value, len),
            Op::Signal { vector } => {
                let _ = msix.signal(vector);
            }
        }
    }
    let f = function.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(f.cfg.get_u32(0), 0x1044_1af4);
    assert_eq!(f.cfg.capabilities(), caps);
    assert_eq!(f.cfg.ext_capabilities(), ext_caps);
    assert_eq!(sink.sent().len() as u64, msix.stats().delivered);
}

fn access(bus: &vmkit_devices::Bus, addr: u64, write: bool, value: u64, len: u8) {
    let b = value.to_le_bytes();
    let n = (len % 9) as usize;
    if write {
        bus.write(addr, &b[..n]);
    } else {
        bus.read(addr, &mut [0u8; 8][..n]);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replay_corpus() {
        let seeds = crate::corpus("pci_config");
        assert!(!seeds.is_empty());
        for s in seeds {
            super::run(&s);
        }
    }
}
