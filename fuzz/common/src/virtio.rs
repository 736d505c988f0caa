//! Fuzz the virtio transports and queue processing: guest register accesses to virtio-mmio and
//! virtio-pci (common configuration, ISR, notify, device config, MSI-X), PCI configuration
//! accesses, arbitrary writes into guest memory (rings, descriptors, buffers) and kicks — on a
//! virtio-rng device with a deterministic entropy source.
//!
//! virtio-pci inputs also reach BAR 0 through the `VIRTIO_PCI_CAP_PCI_CFG` window
//! ([`PciOp::Window`]: `cap.bar`, `cap.offset`, `cap.length`, then a `pci_cfg_data` access).
//! Each virtio-pci input runs on two functions in lockstep: one with INTA# wired to a
//! recording line (so every input that leaves MSI-X disabled notifies through INTx) and one
//! without a line; apart from the line they must behave identically (status, counters, ISR,
//! MSI messages, device work).
//!
//! Invariants: nothing panics or hangs; FEATURES_OK is only ever set with a subset of the
//! offered features including VERSION_1; a device is activated only with DRIVER_OK set; the rng
//! never writes more bytes than 64 KiB per completed chain; a window that must not act (bar not
//! 0, length not 1, 2 or 4, offset misaligned or outside the BAR) changes nothing but
//! `bad_register_accesses` (+1): no status change, no MSI, no other counter, no line change.
//! INTx (virtio 1.2 §4.1.5.3/4, PCI 3.0 §6.2.3, §6.8.3.3): the line is set only on a change;
//! it is high only while an interrupt is pending (ISR non-zero), MSI-X is disabled and
//! Interrupt Disable is clear; the status register's Interrupt Status bit is the pending
//! state; after a driver read of the ISR (directly or through the window) the line is low.

use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_devices::MutBusDevice;
use vmkit_devices::interrupt::{RecordingInterrupt, RecordingIrqLine};
use vmkit_devices::msi::RecordingMsiSink;
use vmkit_devices::pci::{PciFunction, command, reg, status};
use vmkit_virtio::mmio::MmioTransport;
use vmkit_virtio::pci::VirtioPciTransport;
use vmkit_virtio::rng::{EntropySource, RNG_MAX_CHAIN_BYTES, Rng};
use vmkit_virtio::spec::common_cfg::*;
use vmkit_virtio::spec::*;
use vmkit_virtio::{TransportCore, VirtioDevice};

/// Guest memory size (rings and buffers the fuzzer points at live here, or outside it).
pub const MEM_SIZE: usize = 1 << 20;

/// One guest action.
#[derive(Arbitrary, Debug, Clone, Copy)]
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

/// One guest action on virtio-pci: a shared [`Op`] or a PCI configuration access window use.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum PciOp {
    /// An action shared with virtio-mmio.
    Common(Op),
    /// Set up the `VIRTIO_PCI_CAP_PCI_CFG` window, then access `pci_cfg_data`.
    Window(WindowOp),
}

/// A use of the PCI configuration access window (virtio 1.2 §4.1.4.9).
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct WindowOp {
    /// `cap.bar`: `None` for BAR 0 (the virtio BAR), else this raw value.
    pub bar: Option<u8>,
    /// `cap.offset`: raw if bit 31 is set, else mod 64 KiB (inside BAR 0 half the time).
    pub offset: u32,
    /// `cap.length`: 1, 2 or 4 (by `length % 3`), or the raw value when ≥ 240.
    pub length: u8,
    /// Align `cap.offset` down to `cap.length` (when that is a power of two).
    pub align: bool,
    /// Store into `pci_cfg_data` (else load).
    pub write: bool,
    /// Value stored (low bytes).
    pub value: u32,
    /// Width of the `pci_cfg_data` access: 1, 2 or 4 (by `width % 3`).
    pub width: u8,
    /// Byte of `pci_cfg_data` accessed (mod 4, aligned down to the width).
    pub at: u8,
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
            (VIRTIO_PCI_COMMON_STATUS, 1, 1),
            (VIRTIO_PCI_COMMON_STATUS, 1, 3),
            (VIRTIO_PCI_COMMON_GFSELECT, 4, 0),
            (VIRTIO_PCI_COMMON_GF, 4, lo),
            (VIRTIO_PCI_COMMON_GFSELECT, 4, 1),
            (VIRTIO_PCI_COMMON_GF, 4, 1),
            (VIRTIO_PCI_COMMON_STATUS, 1, 0xb),
            (VIRTIO_PCI_COMMON_Q_SELECT, 2, 0),
            (VIRTIO_PCI_COMMON_Q_SIZE, 2, size),
            (VIRTIO_PCI_COMMON_Q_DESCLO, 8, desc),
            (VIRTIO_PCI_COMMON_Q_AVAILLO, 8, avail),
            (VIRTIO_PCI_COMMON_Q_USEDLO, 8, used),
            (VIRTIO_PCI_COMMON_Q_MSIX, 2, 0),
            (VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1),
            (VIRTIO_PCI_COMMON_STATUS, 1, 0xf),
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

/// The virtio-rng PCI function, its MSI sink and where its `VIRTIO_PCI_CAP_PCI_CFG` is.
struct PciRig {
    t: VirtioPciTransport<Dev>,
    sink: Arc<RecordingMsiSink>,
    mem: GuestMemoryMmap,
    cfg_cap: u16,
    /// INTA#, when wired.
    line: Option<Arc<RecordingIrqLine>>,
}

impl PciRig {
    fn new(mem: GuestMemoryMmap, intx: bool) -> Option<Self> {
        let sink = Arc::new(RecordingMsiSink::default());
        let dev = Rng::new(Fixed);
        let msix = VirtioPciTransport::<Dev>::msix_for(&dev, sink.clone()).ok()?;
        let mut t = VirtioPciTransport::new(dev, mem.clone(), msix).ok()?;
        let line = intx.then(|| Arc::new(RecordingIrqLine::default()));
        if let Some(l) = &line {
            t = t.with_intx(l.clone());
        }
        // Find the PCI configuration access capability as a driver does.
        let mut b = [0u8; 4];
        t.config_read(0x34, &mut b[..1]);
        let mut at = b[0] as u16;
        let cfg_cap = loop {
            assert!((0x40..0x100).contains(&at), "no VIRTIO_PCI_CAP_PCI_CFG");
            t.config_read(at, &mut b);
            if b[0] == 0x09 && b[3] == VIRTIO_PCI_CAP_PCI_CFG {
                break at;
            }
            at = b[1] as u16;
        };
        Some(Self {
            t,
            sink,
            mem,
            cfg_cap,
            line,
        })
    }

    fn line_level(&self) -> bool {
        self.line.as_ref().is_some_and(|l| l.level())
    }

    /// The INTx invariants (module docs); `isr_read`: the last action read the ISR.
    fn check_intx(&mut self, isr_read: bool) {
        let Some(line) = self.line.clone() else {
            assert!(!self.t.intx_asserted() && !self.t.intx_pending());
            return;
        };
        let level = line.level();
        assert_eq!(level, self.t.intx_asserted());
        assert_eq!(
            line.calls(),
            line.asserts() + line.deasserts(),
            "redundant set_level"
        );
        let pending = self.t.intx_pending();
        let mut st = [0u8; 2];
        self.t.config_read(reg::STATUS, &mut st);
        let st = u16::from_le_bytes(st);
        assert_eq!(
            st & status::INTERRUPT_STATUS != 0,
            pending,
            "Interrupt Status"
        );
        let cmd = self.t.config_space().get_u16(reg::COMMAND);
        if pending {
            assert_ne!(self.t.isr_status(), 0, "pending with an empty ISR");
            assert!(!self.t.msix().enabled(), "pending under MSI-X");
        }
        assert_eq!(level, pending && cmd & command::INTX_DISABLE == 0);
        if isr_read {
            assert!(!level && !pending, "the line survived an ISR read");
        }
    }

    /// Apply `op`; whether it was a driver read of the ISR.
    fn op(&mut self, op: Op) -> bool {
        let t = &mut self.t;
        let mut buf = [0u8; 8];
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
                    return false; // the root bus never forwards accesses crossing the BAR's end
                }
                if write {
                    t.bar_write(0, off, &value.to_le_bytes()[..n]);
                } else {
                    t.bar_read(0, off, &mut buf[..n]);
                    return off == 0x1000 && n == 1;
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
                let _ = self
                    .mem
                    .write_slice(&bytes, GuestAddress(addr as u64 % MEM_SIZE as u64));
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
        false
    }

    /// Use the window; whether it read the ISR.
    fn window(&mut self, w: WindowOp) -> bool {
        let WindowOp {
            bar,
            offset,
            length,
            align,
            write,
            value,
            width,
            at,
        } = w;
        let cap = self.cfg_cap;
        let bar = bar.unwrap_or(0);
        let length = match length {
            240.. => length as u32,
            l => [1, 2, 4][l as usize % 3],
        };
        let mut offset = if offset >> 31 == 1 {
            offset
        } else {
            offset % 0x1_0000
        };
        if align && length.is_power_of_two() {
            offset &= !(length - 1);
        }
        let t = &mut self.t;
        t.config_write(cap + 4, &[bar]);
        t.config_write(cap + 8, &offset.to_le_bytes());
        t.config_write(cap + 12, &length.to_le_bytes());
        // The model of virtio 1.2 §4.1.4.9 the transport must follow.
        let acts = bar == 0
            && matches!(length, 1 | 2 | 4)
            && offset % length == 0
            && offset as u64 + length as u64 <= 0x8000;
        let n = [1u16, 2, 4][width as usize % 3];
        let data = cap + 16 + ((at as u16 % 4) & !(n - 1));
        let level = self.line.as_ref().map(|l| (l.asserts(), l.deasserts()));
        let before = (t.metrics(), t.core().status(), self.sink.sent().len());
        let mut buf = [0u8; 4];
        if write {
            t.config_write(data, &value.to_le_bytes()[..n as usize]);
        } else {
            t.config_read(data, &mut buf[..n as usize]);
        }
        if !acts {
            let mut m = before.0;
            m.bad_register_accesses += 1;
            assert_eq!(t.metrics(), m, "a window that must not act did");
            assert_eq!(t.core().status(), before.1);
            assert_eq!(self.sink.sent().len(), before.2);
            assert_eq!(
                self.line.as_ref().map(|l| (l.asserts(), l.deasserts())),
                level
            );
        }
        acts && !write && offset == 0x1000 && length == 1
    }
}

/// Run one input against virtio-pci.
pub fn run_pci(data: &[u8]) {
    run_pci_rig(data);
}

/// Run `data` on a function with INTA# wired and one without, in lockstep; the wired one.
fn run_pci_rig(data: &[u8]) -> Option<PciRig> {
    let ops = Unstructured::new(data).arbitrary::<Vec<PciOp>>().ok()?;
    let mem = || GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok();
    let mut rig = PciRig::new(mem()?, true)?;
    let mut plain = PciRig::new(mem()?, false)?;
    for op in ops {
        let mut isr_read = false;
        for r in [&mut rig, &mut plain] {
            isr_read = match op {
                PciOp::Common(op) => r.op(op),
                PciOp::Window(w) => r.window(w),
            };
            check(r.t.core());
            r.check_intx(isr_read);
        }
        if isr_read {
            assert!(!rig.line_level());
        }
        // INTx changes nothing but the line.
        assert_eq!(rig.t.metrics(), plain.t.metrics());
        assert_eq!(rig.t.core().status(), plain.t.core().status());
        assert_eq!(rig.t.isr_status(), plain.t.isr_status());
        assert_eq!(rig.sink.sent(), plain.sink.sent());
        assert_eq!(rig.t.device().metrics(), plain.t.device().metrics());
    }
    Some(rig)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::{Op, PciOp, PciRig, WindowOp};

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

    /// The bytes `arbitrary` 1.x decodes into `ops` (little-endian integers, `u8 & 1` bools,
    /// `Option` as a bool then the value, enum variant `i` of `n` from a `u32` `v` with
    /// `v * n >> 32 == i`, a `Vec` as a continue-byte before each element).
    fn encode(ops: &[PciOp]) -> Vec<u8> {
        fn variant(out: &mut Vec<u8>, i: u64, n: u64) {
            out.extend_from_slice(&((((i << 32).div_ceil(n)) as u32).to_le_bytes()));
        }
        let mut out = Vec::new();
        for op in ops {
            out.push(1);
            match op {
                PciOp::Common(op) => {
                    variant(&mut out, 0, 2);
                    match *op {
                        Op::Reg {
                            offset,
                            write,
                            value,
                            len,
                        } => {
                            variant(&mut out, 0, 6);
                            out.extend_from_slice(&offset.to_le_bytes());
                            out.push(write as u8);
                            out.extend_from_slice(&value.to_le_bytes());
                            out.push(len);
                        }
                        Op::Config {
                            offset,
                            write,
                            value,
                            len,
                        } => {
                            variant(&mut out, 1, 6);
                            out.push(offset);
                            out.push(write as u8);
                            out.extend_from_slice(&value.to_le_bytes());
                            out.push(len);
                        }
                        Op::Mem { addr, bytes } => {
                            variant(&mut out, 2, 6);
                            out.extend_from_slice(&addr.to_le_bytes());
                            out.extend_from_slice(&bytes);
                        }
                        Op::BringUp {
                            ring,
                            size_log2,
                            event_idx,
                        } => {
                            variant(&mut out, 3, 6);
                            out.extend_from_slice(&ring.to_le_bytes());
                            out.push(size_log2);
                            out.push(event_idx as u8);
                        }
                        Op::Kick { queue } => {
                            variant(&mut out, 4, 6);
                            out.extend_from_slice(&queue.to_le_bytes());
                        }
                        Op::ConfigChanged => variant(&mut out, 5, 6),
                    }
                }
                &PciOp::Window(WindowOp {
                    bar,
                    offset,
                    length,
                    align,
                    write,
                    value,
                    width,
                    at,
                }) => {
                    variant(&mut out, 1, 2);
                    match bar {
                        None => out.push(0),
                        Some(b) => out.extend_from_slice(&[1, b]),
                    }
                    out.extend_from_slice(&offset.to_le_bytes());
                    out.extend_from_slice(&[length, align as u8, write as u8]);
                    out.extend_from_slice(&value.to_le_bytes());
                    out.extend_from_slice(&[width, at]);
                }
            }
        }
        out.push(0);
        out
    }

    /// A 4-byte `pci_cfg_data` access through a window onto BAR 0 of `length` 1, 2 or 4.
    fn win(offset: u32, length: u32, write: bool, value: u32) -> PciOp {
        let length = match length {
            1 => 0,
            2 => 1,
            _ => 2,
        };
        PciOp::Window(WindowOp {
            bar: None,
            offset,
            length,
            align: false,
            write,
            value,
            width: 2, // 4-byte pci_cfg_data access
            at: 0,
        })
    }

    /// The `pci_window_*` and `pci_intx` seeds of `corpus/virtio_pci/`: regenerate with
    /// `VMKIT_WRITE_CORPUS=1 cargo test -p vmkit-fuzz-common pci_window_seeds`.
    fn pci_window_seeds() -> Vec<(&'static str, Vec<PciOp>)> {
        let msix_ctrl = {
            let mem = vm_memory::GuestMemoryMmap::from_ranges(&[(
                vm_memory::GuestAddress(0),
                super::MEM_SIZE,
            )])
            .unwrap();
            let rig = PciRig::new(mem, true).unwrap();
            let caps = vmkit_devices::pci::PciFunction::config_space(&rig.t).capabilities();
            caps.iter().find(|c| c.0 == 0x11).unwrap().1 as u8 + 2
        };
        let mem = |addr, bytes| PciOp::Common(Op::Mem { addr, bytes });
        // Queue 0 of 16 at 0x1000 (avail 0x1100), one 16-byte writable buffer at 0x8000.
        let ring = || {
            vec![
                PciOp::Common(Op::BringUp {
                    ring: 0x1000,
                    size_log2: 4,
                    event_idx: false,
                }),
                mem(0x1000, [0, 0x80, 0, 0, 0, 0, 0, 0]),
                mem(0x1008, [16, 0, 0, 0, 2, 0, 0, 0]),
                mem(0x1100, [0, 0, 1, 0, 0, 0, 0, 0]),
            ]
        };
        let mut kick = ring();
        kick.extend([
            // MSI-X on, vector 0 programmed and unmasked through the window, then the
            // doorbell rung through it; ISR read through it.
            PciOp::Common(Op::Config {
                offset: msix_ctrl,
                write: true,
                value: 0x8000,
                len: 1,
            }),
            win(0x4000, 4, true, 0xfee0_0000),
            win(0x4008, 4, true, 0x41),
            win(0x400c, 4, true, 0),
            win(0x3000, 2, true, 0),
            win(0x1000, 1, false, 0),
            win(0x1000, 1, false, 0),
        ]);
        let reads = vec![
            win(0x00, 4, true, 1),
            win(0x04, 4, false, 0),
            win(0x12, 2, false, 0),
            win(0x14, 1, false, 0),
            win(0x15, 1, false, 0),
            win(0x16, 2, true, 0),
            win(0x18, 2, false, 0),
            win(0x4000, 4, false, 0),
            win(0x6000, 4, false, 0),
            win(0x2000, 4, false, 0),
        ];
        let bad = |bar, offset, length| {
            PciOp::Window(WindowOp {
                bar,
                offset,
                length,
                align: false,
                write: true,
                value: 0,
                width: 2,
                at: 0,
            })
        };
        let mut bad_windows = ring();
        bad_windows.extend([
            bad(None, 0x3000, 243),     // length 3
            bad(None, 0x3000, 248),     // length 8
            bad(None, 0x3002, 2),       // length 4, misaligned
            bad(None, 0x15, 1),         // length 2, misaligned
            bad(None, 0x8000, 0),       // at the BAR's end
            bad(None, 0xffff_fffc, 2),  // offset + length overflows u32
            bad(Some(1), 0x14, 0),      // upper half of BAR 0
            bad(Some(0xff), 0x3000, 2), // reserved bar
            bad(None, 0x7ffc, 2),       // acts: no register there
        ]);
        let partial = vec![
            PciOp::Window(WindowOp {
                bar: None,
                offset: 0,
                length: 2,
                align: true,
                write: true,
                value: 0x01,
                width: 0, // one byte
                at: 1,
            }),
            PciOp::Window(WindowOp {
                bar: None,
                offset: 4,
                length: 2,
                align: true,
                write: false,
                value: 0,
                width: 1, // a word
                at: 2,
            }),
        ];
        // INTx: MSI-X left disabled, the kick raises INTA#; Interrupt Disable holds it low and
        // clearing it raises it again; the ISR read drops it; a config change raises it and
        // an ISR read through the window drops it; with MSI-X enabled a kick uses the
        // (masked) vector and the line stays low.
        let cfg = |offset, write, value| {
            PciOp::Common(Op::Config {
                offset,
                write,
                value,
                len: 1, // two bytes
            })
        };
        let mut intx = ring();
        intx.extend([
            PciOp::Common(Op::Kick { queue: 0 }),
            cfg(0x04, true, 0x0406), // memory, bus master, Interrupt Disable
            cfg(0x06, false, 0),
            cfg(0x04, true, 0x0006),
            PciOp::Common(Op::Reg {
                offset: 0x1000,
                write: false,
                value: 0,
                len: 1,
            }),
            PciOp::Common(Op::ConfigChanged),
            win(0x1000, 1, false, 0),
            mem(0x1100, [0, 0, 2, 0, 0, 0, 0, 0]),
            cfg(msix_ctrl, true, 0x8000),
            PciOp::Common(Op::Kick { queue: 0 }),
        ]);
        vec![
            ("pci_window_kick", kick),
            ("pci_window_reads", reads),
            ("pci_window_bad", bad_windows),
            ("pci_window_partial", partial),
            ("pci_intx", intx),
        ]
    }

    #[test]
    fn pci_window_seeds_decode_and_run() {
        for (name, ops) in pci_window_seeds() {
            let bytes = encode(&ops);
            let back = arbitrary::Unstructured::new(&bytes)
                .arbitrary::<Vec<PciOp>>()
                .unwrap();
            assert_eq!(format!("{back:?}"), format!("{ops:?}"), "{name}");
            let rig = super::run_pci_rig(&bytes).unwrap();
            let (m, status) = (rig.t.metrics(), rig.t.core().status());
            let used: u16 = rig.mem.read_obj(GuestAddress(0x1128 + 2)).unwrap();
            match name {
                "pci_window_kick" => {
                    assert_eq!((status, used, m.trapped_notifies), (0xf, 1, 1));
                    assert_eq!(rig.sink.vectors(), [0x41]);
                }
                // Eight windows that must not act, one onto bytes no register decodes.
                "pci_window_bad" => {
                    assert_eq!((status, used, m.bad_register_accesses), (0xf, 0, 9))
                }
                "pci_intx" => {
                    let line = rig.line.as_ref().unwrap();
                    assert_eq!((status, used, m.bad_register_accesses), (0xf, 2, 0));
                    assert_eq!(
                        (line.asserts(), line.deasserts(), line.level()),
                        (3, 3, false)
                    );
                    assert!(rig.sink.vectors().is_empty(), "vector 0 is masked");
                    assert_eq!(rig.t.isr_status(), 1, "set in MSI-X mode too");
                }
                _ => assert_eq!(m.bad_register_accesses, 0, "{name}"),
            }
        }
        let files = pci_window_seeds()
            .into_iter()
            .map(|(name, ops)| (name.to_string(), encode(&ops)))
            .collect();
        crate::check_seed_files("virtio_pci", files);
    }
}
