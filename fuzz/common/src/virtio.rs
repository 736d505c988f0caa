//! Fuzz the virtio transports and queue processing: guest register accesses to virtio-mmio and
//! virtio-pci (common configuration, ISR, notify, device config, MSI-X), PCI configuration
//! accesses, arbitrary writes into guest memory (rings, descriptors, buffers) and kicks — on a
//! virtio-rng device with a deterministic entropy source.
//!
//! Invariants: nothing panics or hangs; FEATURES_OK is only ever set with a subset of the
//! offered features including VERSION_1; a device is activated only with DRIVER_OK set; the rng
//! never writes more bytes than 64 KiB per completed chain.

use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_devices::MutBusDevice;
use vmkit_devices::interrupt::RecordingInterrupt;
use vmkit_devices::msi::RecordingMsiSink;
use vmkit_devices::pci::PciFunction;
use vmkit_virtio::mmio::MmioTransport;
use vmkit_virtio::pci::VirtioPciTransport;
use vmkit_virtio::rng::{EntropySource, RNG_MAX_CHAIN_BYTES, Rng};
use vmkit_virtio::spec::*;
use vmkit_virtio::{TransportCore, VirtioDevice};

/// Guest memory size (rings and buffers the fuzzer points at live here, or outside it).
pub const MEM_SIZE: usize = 1 << 20;

/// One guest action.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// A register access (mmio: offset in the 4 KiB window; pci: offset in BAR 0).
    Reg {
        /// Offset.
        offset: u16,
        /// Store (else load).
        write: bool,
        /// Value (low `len` bytes).
        value: u64,
        /// Width (mod 9).
        len: u8,
    },
    /// PCI configuration access (pci only; offset mod 256).
    Config {
        /// Offset.
        offset: u8,
        /// Store (else load).
        write: bool,
        /// Value.
        value: u32,
        /// Width: 1, 2 or 4.
        len: u8,
    },
    /// Write guest memory (rings, descriptors) at `addr` mod 1 MiB.
    Mem {
        /// Address.
        addr: u32,
        /// Bytes.
        bytes: [u8; 8],
    },
    /// A complete, legal driver bring-up: features, queue 0 at `ring` with `size_log2`.
    BringUp {
        /// Ring base (mod 1 MiB, 16-aligned).
        ring: u32,
        /// log2 of the queue size (mod 10).
        size_log2: u8,
        /// Also negotiate EVENT_IDX.
        event_idx: bool,
    },
    /// Kick queue `queue` (doorbell).
    Kick {
        /// Queue index.
        queue: u16,
    },
    /// The device changes its configuration.
    ConfigChanged,
}

/// Deterministic "entropy".
pub struct Fixed;
impl EntropySource for Fixed {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0x5a);
        Ok(())
    }
}

type Dev = Rng<GuestMemoryMmap, Fixed>;

fn check(core: &TransportCore<Dev>) {
    let s = core.status();
    if s & STATUS_FEATURES_OK != 0 {
        let acked = core.acked_features();
        assert_eq!(acked & !core.device().device_features(), 0);
        assert_ne!(acked & (1 << VIRTIO_F_VERSION_1), 0);
    }
    if core.is_activated() {
        assert_ne!(s & STATUS_DRIVER_OK, 0);
    }
    let m = core.device().metrics();
    assert!(m.bytes <= m.requests * RNG_MAX_CHAIN_BYTES as u64);
}

fn ops(data: &[u8]) -> Option<(Vec<Op>, GuestMemoryMmap)> {
    let ops = Unstructured::new(data).arbitrary::<Vec<Op>>().ok()?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    Some((ops, mem))
}

fn width(len: u8) -> usize {
    match len % 9 {
        0 => 4,
        n => n as usize,
    }
}

/// Register writes of a legal bring-up, as `(offset, len, value)` for each transport.
fn bring_up(pci: bool, ring: u32, size_log2: u8, event_idx: bool) -> Vec<(u64, usize, u64)> {
    let size = 1u64 << (size_log2 % 10);
    let desc = (ring as u64 % MEM_SIZE as u64) & !0xf;
    let avail = desc + 16 * size;
    let used = (avail + 6 + 2 * size).next_multiple_of(4);
    let lo = if event_idx {
        1 << VIRTIO_RING_F_EVENT_IDX
    } else {
        0
    };
    if pci {
        vec![
            (0x14, 1, 1),
            (0x14, 1, 3),
            (0x08, 4, 0),
            (0x0c, 4, lo),
            (0x08, 4, 1),
            (0x0c, 4, 1),
            (0x14, 1, 0xb),
            (0x16, 2, 0),
            (0x18, 2, size),
            (0x20, 8, desc),
            (0x28, 8, avail),
            (0x30, 8, used),
            (0x1a, 2, 0),
            (0x1c, 2, 1),
            (0x14, 1, 0xf),
        ]
    } else {
        vec![
            (0x70, 4, 1),
            (0x70, 4, 3),
            (0x24, 4, 0),
            (0x20, 4, lo),
            (0x24, 4, 1),
            (0x20, 4, 1),
            (0x70, 4, 0xb),
            (0x30, 4, 0),
            (0x38, 4, size),
            (0x80, 4, desc),
            (0x90, 4, avail),
            (0xa0, 4, used),
            (0x44, 4, 1),
            (0x70, 4, 0xf),
        ]
    }
}

/// Run one input against virtio-mmio.
pub fn run_mmio(data: &[u8]) {
    let Some((ops, mem)) = ops(data) else { return };
    let irq = Arc::new(RecordingInterrupt::default());
    let mut t = MmioTransport::new(Rng::new(Fixed), mem.clone(), irq);
    let mut buf = [0u8; 8];
    for op in ops {
        match op {
            Op::Reg {
                offset,
                write,
                value,
                len,
            } => {
                let n = width(len);
                let off = offset as u64 % 0x1000;
                if write {
                    t.write(off, &value.to_le_bytes()[..n]);
                } else {
                    t.read(off, &mut buf[..n]);
                }
            }
            Op::Config { .. } => {}
            Op::Mem { addr, bytes } => {
                let _ = mem.write_slice(&bytes, GuestAddress(addr as u64 % MEM_SIZE as u64));
            }
            Op::BringUp {
                ring,
                size_log2,
                event_idx,
            } => {
                for (off, n, v) in bring_up(false, ring, size_log2, event_idx) {
                    t.write(off, &v.to_le_bytes()[..n]);
                }
            }
            Op::Kick { queue } => t.write(0x50, &(queue as u32).to_le_bytes()),
            Op::ConfigChanged => t.core_mut().config_changed(),
        }
        check(t.core());
    }
}

/// Run one input against virtio-pci.
pub fn run_pci(data: &[u8]) {
    let Some((ops, mem)) = ops(data) else { return };
    let sink = Arc::new(RecordingMsiSink::default());
    let dev = Rng::new(Fixed);
    let Ok(msix) = VirtioPciTransport::<Dev>::msix_for(&dev, sink) else {
        return;
    };
    let Ok(mut t) = VirtioPciTransport::new(dev, mem.clone(), msix) else {
        return;
    };
    let mut buf = [0u8; 8];
    for op in ops {
        match op {
            Op::Reg {
                offset,
                write,
                value,
                len,
            } => {
                let n = width(len);
                let off = offset as u64 % 0x8000;
                if off + n as u64 > 0x8000 {
                    continue; // the root bus never forwards accesses crossing the BAR's end
                }
                if write {
                    t.bar_write(0, off, &value.to_le_bytes()[..n]);
                } else {
                    t.bar_read(0, off, &mut buf[..n]);
                }
            }
            Op::Config {
                offset,
                write,
                value,
                len,
            } => {
                let n = [1usize, 2, 4][len as usize % 3];
                let off = (offset as u16) & !(n as u16 - 1);
                if write {
                    t.config_write(off, &value.to_le_bytes()[..n]);
                } else {
                    t.config_read(off, &mut buf[..n]);
                }
            }
            Op::Mem { addr, bytes } => {
                let _ = mem.write_slice(&bytes, GuestAddress(addr as u64 % MEM_SIZE as u64));
            }
            Op::BringUp {
                ring,
                size_log2,
                event_idx,
            } => {
                for (off, n, v) in bring_up(true, ring, size_log2, event_idx) {
                    t.bar_write(0, off, &v.to_le_bytes()[..n]);
                }
            }
            Op::Kick { queue } => {
                let off = 0x3000 + 4 * (queue as u64 % 0x400);
                t.bar_write(0, off, &queue.to_le_bytes());
            }
            Op::ConfigChanged => t.core_mut().config_changed(),
        }
        check(t.core());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replay_corpus() {
        for (target, run) in [
            ("virtio_mmio", super::run_mmio as fn(&[u8])),
            ("virtio_pci", super::run_pci),
        ] {
            let seeds = crate::corpus(target);
            assert!(!seeds.is_empty(), "{target}");
            for s in seeds {
                run(&s);
            }
        }
    }
}
