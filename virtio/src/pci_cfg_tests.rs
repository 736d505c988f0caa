//! The `VIRTIO_PCI_CAP_PCI_CFG` window (virtio 1.2 §4.1.4.9): the capability as the spec lays
//! it out, BAR 0 reached through configuration space with the same effects as memory accesses
//! (a differential proptest against direct BAR accesses), a whole device driven through it, the
//! root bus path, and the table of windows that must not act.

use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};
use vmkit_devices::IoBuses;
use vmkit_devices::pci::{PciFunction, PciRoot, cap_id};

use crate::pci::*;
use crate::pci_tests::{MsixCap, Pci};
use crate::spec::*;
use crate::test_utils::ring_layout;

/// `struct virtio_pci_cap` field offsets (virtio 1.2 §4.1.4).
const CAP_LEN: u16 = 2;
const CFG_TYPE: u16 = 3;
const BAR: u16 = 4;
const ID: u16 = 5;
const OFFSET: u16 = 8;
const LENGTH: u16 = 12;
/// `pci_cfg_data` in `struct virtio_pci_cfg_cap`.
const DATA: u16 = 16;

/// How a test reaches BAR 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// A memory access to the BAR.
    Bar,
    /// The configuration-space window.
    Window,
}

fn cfg_read(f: &mut impl PciFunction, off: u16, len: usize) -> u32 {
    let mut b = [0u8; 4];
    f.config_read(off, &mut b[..len]);
    u32::from_le_bytes(b)
}

fn cfg_write(f: &mut impl PciFunction, off: u16, len: usize, v: u32) {
    f.config_write(off, &v.to_le_bytes()[..len]);
}

/// Bytes `len` of `v`.
fn low(v: u32, len: usize) -> u32 {
    if len >= 4 {
        v
    } else {
        v & ((1 << (8 * len)) - 1)
    }
}

impl Pci {
    /// Find the `VIRTIO_PCI_CAP_PCI_CFG` capability by walking the list as a driver does.
    fn pci_cfg_cap(&mut self) -> u16 {
        let mut at = cfg_read(&mut self.f, 0x34, 1) as u16;
        while at != 0 {
            let h = cfg_read(&mut self.f, at, 4);
            if h as u8 == cap_id::VENDOR_SPECIFIC && (h >> 24) as u8 == VIRTIO_PCI_CAP_PCI_CFG {
                return at;
            }
            at = (h >> 8) as u8 as u16;
        }
        panic!("no VIRTIO_PCI_CAP_PCI_CFG capability");
    }

    /// The driver's three steps: `cap.bar`, `cap.length`, `cap.offset`.
    fn set_window(&mut self, bar: u8, offset: u32, length: u32) {
        let cap = self.pci_cfg_cap();
        cfg_write(&mut self.f, cap + BAR, 1, bar as u32);
        cfg_write(&mut self.f, cap + LENGTH, 4, length);
        cfg_write(&mut self.f, cap + OFFSET, 4, offset);
    }

    /// `pci_cfg_data` as stored, read without going through the window.
    fn stored_data(&mut self) -> u32 {
        let cap = self.pci_cfg_cap();
        let mut b = [0u8; 4];
        self.f.config_space().read(cap + DATA, &mut b);
        u32::from_le_bytes(b)
    }

    /// A `len`-byte access to BAR 0 at `off`, either way; returns what a read returned.
    fn access(&mut self, via: Via, write: bool, off: u64, len: usize, v: u32) -> u32 {
        match (via, write) {
            (Via::Bar, false) => self.rd(off, len) as u32,
            (Via::Bar, true) => {
                self.wr(off, len, v as u64);
                0
            }
            (Via::Window, _) => {
                self.set_window(VIRTIO_PCI_BAR, off as u32, len as u32);
                let cap = self.pci_cfg_cap();
                if write {
                    cfg_write(&mut self.f, cap + DATA, 4, v);
                    0
                } else {
                    low(cfg_read(&mut self.f, cap + DATA, 4), len)
                }
            }
        }
    }

    /// Program MSI-X vector `vector` (address, data, unmask) through BAR 0 `via`; MSI-X enable
    /// is in configuration space either way.
    fn msix_program_via(&mut self, via: Via, vector: u16, data: u32) {
        let cap = self.f.msix_cap();
        self.f.config_write(cap + 2, &0x8000u16.to_le_bytes());
        let e = MSIX_TABLE_OFFSET as u64 + 16 * vector as u64;
        for (o, v) in [(0, 0xfee0_0000), (4, 0), (8, data), (12, 0)] {
            self.access(via, true, e + o, 4, v);
        }
    }

    /// Negotiate VERSION_1 and bring queue 0 (size 16) up with vector `qvec`, every access at
    /// most 4 bytes wide (the window's limit), through BAR 0 `via`.
    fn bring_up_via(&mut self, via: Via, qvec: u16) {
        let l = ring_layout(0, 16);
        for (off, len, v) in [
            (0x14, 1, 1),
            (0x14, 1, 3),
            (0x08, 4, 1),
            (0x0c, 4, 1), // VERSION_1 (bit 32)
            (0x14, 1, 0xb),
            (0x16, 2, 0),
            (0x18, 2, 16),
            (0x20, 4, l.desc.0 as u32),
            (0x24, 4, 0),
            (0x28, 4, l.avail.0 as u32),
            (0x2c, 4, 0),
            (0x30, 4, l.used.0 as u32),
            (0x34, 4, 0),
            (0x1a, 2, qvec as u32),
            (0x1c, 2, 1),
            (0x14, 1, 0xf),
        ] {
            self.access(via, true, off, len, v);
        }
    }
}

#[test]
fn pci_cfg_capability_is_laid_out_as_the_spec_says() {
    let mut p = Pci::new();
    let cap = p.pci_cfg_cap();
    assert_eq!(cap % 4, 0);
    assert!(cap >= 0x40 && cap + 20 <= 0x100, "{cap:#x}");
    // struct virtio_pci_cfg_cap: cap_vndr 0x09, cap_len 20 (virtio_pci_cap + pci_cfg_data[4]),
    // cfg_type 5; bar, id, padding, offset, length and pci_cfg_data zero.
    assert_eq!(cfg_read(&mut p.f, cap, 1), cap_id::VENDOR_SPECIFIC as u32);
    assert_eq!(cfg_read(&mut p.f, cap + CAP_LEN, 1), 20);
    assert_eq!(cfg_read(&mut p.f, cap + CFG_TYPE, 1), 5);
    for (off, len) in [
        (BAR, 1),
        (ID, 1),
        (6, 2),
        (OFFSET, 4),
        (LENGTH, 4),
        (DATA, 4),
    ] {
        assert_eq!(cfg_read(&mut p.f, cap + off, len), 0, "byte {off}");
    }
    // cap.bar, cap.offset, cap.length and pci_cfg_data are read-write for the driver (all
    // bits); cap_vndr, cap_next, cap_len, cfg_type, id and padding are read-only.
    let next = cfg_read(&mut p.f, cap + 1, 1);
    for (off, len, v) in [
        (BAR, 1, 0xff),
        (OFFSET, 4, 0xffff_ffff),
        (LENGTH, 4, 0xffff_ffff),
        (DATA, 4, 0xffff_ffff),
    ] {
        cfg_write(&mut p.f, cap + off, len, v);
        assert_eq!(cfg_read(&mut p.f, cap + off, len), v, "byte {off}");
    }
    for off in [0, 1, CAP_LEN, CFG_TYPE, ID, 6, 7] {
        cfg_write(&mut p.f, cap + off, 1, 0x5a);
    }
    let expected = [cap_id::VENDOR_SPECIFIC as u32, next, 20, 5, 0xff, 0, 0, 0];
    for (off, want) in (0u16..).zip(expected) {
        assert_eq!(cfg_read(&mut p.f, cap + off, 1), want, "byte {off}");
    }
}

#[test]
fn pci_cfg_window_target_table() {
    let w = |bar, offset, length| PciCfgWindow {
        bar,
        offset,
        length,
    };
    let rows: &[(PciCfgWindow, Option<(u64, usize)>)] = &[
        (w(0, 0x00, 4), Some((0, 4))),
        (w(0, 0x12, 2), Some((0x12, 2))),
        (w(0, 0x1000, 1), Some((0x1000, 1))),
        (w(0, 0x7fff, 1), Some((0x7fff, 1))),
        (w(0, 0x7ffc, 4), Some((0x7ffc, 4))),
        (w(0, 0x00, 0), None),
        (w(0, 0x00, 3), None),
        (w(0, 0x00, 8), None),
        (w(0, 0x00, u32::MAX), None),
        (w(0, 0x13, 2), None),
        (w(0, 0x12, 4), None),
        (w(0, 0x8000, 1), None),
        (w(0, 0x7ffe, 4), None),
        (w(0, 0xffff_fffc, 4), None),
        (w(0, u32::MAX, 1), None),
        (w(1, 0x00, 4), None),
        (w(2, 0x00, 4), None),
        (w(5, 0x00, 4), None),
        (w(6, 0x00, 4), None),
        (w(0xff, 0x00, 4), None),
    ];
    for &(win, want) in rows {
        assert_eq!(win.target(), want, "{win:?}");
    }
}

#[test]
fn pci_cfg_reads_equal_bar_reads() {
    let (mut a, mut b) = (Pci::new(), Pci::new());
    a.msix_program(1, 0x45);
    b.msix_program(1, 0x45);
    for select in [0, 1, 2] {
        a.wr(0x00, 4, select);
        b.wr(0x00, 4, select);
        // device_feature_select, device_feature, num_queues, status, generation, queue_select,
        // queue_size, vectors, notify_off; MSI-X table entry 1 and the PBA; device config.
        for (off, len) in [
            (0x00, 4),
            (0x04, 4),
            (0x10, 2),
            (0x12, 2),
            (0x14, 1),
            (0x15, 1),
            (0x16, 2),
            (0x18, 2),
            (0x1a, 2),
            (0x1c, 2),
            (0x1e, 2),
            (0x4010, 4),
            (0x4018, 4),
            (0x401c, 4),
            (0x6000, 4),
            (0x2000, 4),
        ] {
            let direct = a.access(Via::Bar, false, off, len, 0);
            let window = b.access(Via::Window, false, off, len, 0);
            assert_eq!(window, direct, "select {select}, {off:#x}/{len}");
        }
    }
    assert_eq!(b.access(Via::Window, false, 0x12, 2, 0), 1); // num_queues
    b.wr(0x00, 4, 1);
    assert_eq!(b.access(Via::Window, false, 0x04, 4, 0), 1); // VERSION_1
    assert_eq!(a.f.metrics(), b.f.metrics());
}

#[test]
fn pci_cfg_drives_the_device_with_bar0_unmapped() {
    let mut p = Pci::new();
    assert_eq!(p.f.bar_address(), None); // never programmed, memory decode off
    p.msix_program_via(Via::Window, 1, 0x45);
    p.bring_up_via(Via::Window, 1);
    assert_eq!(p.status(), 0xf);
    assert!(p.f.core().is_activated());
    // queue_select written through the window reads back through the BAR and vice versa.
    p.access(Via::Window, true, 0x16, 2, 0);
    assert_eq!(p.rd(0x16, 2), 0);
    assert_eq!(p.access(Via::Window, false, 0x1a, 2, 0), 1); // queue_msix_vector
    // config_msix_vector: an unsupported vector is refused (NO_VECTOR), a valid one kept.
    p.access(Via::Window, true, 0x10, 2, 7);
    assert_eq!(p.rd(0x10, 2), VIRTIO_MSI_NO_VECTOR as u64);
    p.access(Via::Window, true, 0x10, 2, 0);
    assert_eq!(p.access(Via::Window, false, 0x10, 2, 0), 0);
    // A buffer, the doorbell rung through the window: the device fills it and signals MSI-X
    // vector 1 (programmed through the window too).
    p.post(8);
    p.access(Via::Window, true, NOTIFY_CFG_OFFSET, 2, 0);
    assert_eq!(p.used_idx(), 1);
    assert_eq!(p.f.metrics().trapped_notifies, 1);
    assert_eq!(p.sink.vectors(), [0x45]);
    let mut buf = [0u8; 8];
    p.mem
        .read_slice(&mut buf, GuestAddress(0x200_0000))
        .unwrap();
    assert_eq!(buf, [1; 8]);
    // The ISR read through the window returns the queue bit and clears it.
    assert_eq!(
        p.access(Via::Window, false, ISR_CFG_OFFSET, 1, 0),
        VIRTIO_PCI_ISR_QUEUE as u32
    );
    assert_eq!(p.access(Via::Window, false, ISR_CFG_OFFSET, 1, 0), 0);
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), 0);
    // Masking vector 1 through the window: the next completion stays pending in the PBA.
    p.access(Via::Window, true, MSIX_TABLE_OFFSET as u64 + 16 + 12, 4, 1);
    p.post(4);
    p.access(Via::Window, true, NOTIFY_CFG_OFFSET, 4, 0);
    assert_eq!(p.sink.vectors(), [0x45]);
    assert_eq!(
        p.access(Via::Window, false, MSIX_PBA_OFFSET as u64, 4, 0),
        0b10
    );
    assert_eq!(p.f.metrics().bad_register_accesses, 0);
    // Reset through the window.
    p.access(Via::Window, true, 0x14, 1, 0);
    assert_eq!((p.status(), p.f.metrics().resets), (0, 1));
}

#[test]
fn pci_cfg_through_the_root_bus_config_mechanism() {
    let p = Pci::new();
    let f = Arc::new(Mutex::new(p.f));
    let buses = Arc::new(IoBuses::default());
    let root = PciRoot::new(&buses);
    root.add(3, 0, "rng", f.clone()).unwrap();
    buses
        .pio
        .insert(0xcf8, 8, "pci-conf", root.config_io())
        .unwrap();
    let select = |reg: u16| {
        let a = 0x8000_0000u32 | 3 << 11 | (reg as u32 & !3);
        buses.pio.write(0xcf8, &a.to_le_bytes());
    };
    let cap = {
        let mut g = f.lock().unwrap();
        let mut at = cfg_read(&mut *g, 0x34, 1) as u16;
        while cfg_read(&mut *g, at, 4) >> 24 != VIRTIO_PCI_CAP_PCI_CFG as u32
            || cfg_read(&mut *g, at, 1) != cap_id::VENDOR_SPECIFIC as u32
        {
            at = cfg_read(&mut *g, at + 1, 1) as u16;
            assert_ne!(at, 0);
        }
        at
    };
    // cap.bar = 0 (already), cap.length = 2, cap.offset = num_queues; then read pci_cfg_data
    // through 0xcfc as a dword and its low word.
    select(cap + LENGTH);
    buses.pio.write(0xcfc, &2u32.to_le_bytes());
    select(cap + OFFSET);
    buses.pio.write(0xcfc, &0x12u32.to_le_bytes());
    select(cap + DATA);
    let mut d = [0u8; 4];
    buses.pio.read(0xcfc, &mut d);
    assert_eq!(u16::from_le_bytes([d[0], d[1]]), 1);
    let mut w = [0u8; 2];
    buses.pio.read(0xcfc, &mut w);
    assert_eq!(u16::from_le_bytes(w), 1);
    // device_status = ACKNOWLEDGE through a one-byte window and a byte write at 0xcfc.
    select(cap + LENGTH);
    buses.pio.write(0xcfc, &1u32.to_le_bytes());
    select(cap + OFFSET);
    buses.pio.write(0xcfc, &0x14u32.to_le_bytes());
    select(cap + DATA);
    buses.pio.write(0xcfc, &[STATUS_ACKNOWLEDGE]);
    let g = f.lock().unwrap();
    assert_eq!(g.core().status(), STATUS_ACKNOWLEDGE);
    assert!(root.mapped_bars(3, 0).is_empty());
    assert_eq!(g.metrics().bad_register_accesses, 0);
}

/// A `pci_cfg_data` access through a window that must not act: `(what, bar, offset, length)`.
/// Offsets are chosen so that a device acting anyway (e.g. rounding the offset down, as QEMU
/// does, or ignoring `cap.bar`) would hit a register with a visible side effect: the status
/// (a write of 0 resets), the ISR (a read clears) or the doorbell (a write kicks).
const BAD_WINDOWS: &[(&str, u8, u32, u32)] = &[
    ("length 0", 0, 0x1000, 0),
    ("length 3", 0, 0x3000, 3),
    ("length 8", 0, 0x3000, 8),
    ("length u32::MAX", 0, 0x14, u32::MAX),
    ("length 4 misaligned", 0, 0x3002, 4),
    ("length 2 misaligned", 0, 0x15, 2),
    ("offset at the BAR's end", 0, 0x8000, 1),
    ("offset far beyond the BAR", 0, 0x8000_0000, 4),
    ("offset + length overflows u32", 0, 0xffff_fffc, 4),
    ("offset u32::MAX", 0, u32::MAX, 1),
    ("BAR 1: upper half of 64-bit BAR 0", 1, 0x14, 1),
    ("BAR 2: not defined", 2, 0x1000, 1),
    ("BAR 5", 5, 0x3000, 4),
    ("bar 6: reserved", 6, 0x14, 1),
    ("bar 0xff: reserved", 0xff, 0x1000, 1),
];

/// A device with DRIVER_OK, a posted but unkicked buffer and the ISR queue bit set; the
/// window set to `(bar, offset, length)` with `pci_cfg_data` holding 0x5a5a_5a5a.
fn bad_window_fixture(bar: u8, offset: u32, length: u32) -> Pci {
    let mut p = Pci::new();
    p.bring_up(VIRTIO_MSI_NO_VECTOR);
    p.post(4);
    p.wr(NOTIFY_CFG_OFFSET, 2, 0);
    p.post(4); // not kicked: a stray doorbell would complete it
    assert_eq!(p.used_idx(), 1);
    p.set_window(bar, offset, length);
    let cap = p.pci_cfg_cap();
    p.f.config_space_mut()
        .write(cap + DATA, &0x5a5a_5a5au32.to_le_bytes());
    p
}

/// Nothing but `bad_register_accesses` changed: status, queue, ISR (1 unless `isr_read`) and
/// the MSI sink are as [`bad_window_fixture`] left them.
fn assert_untouched(p: &mut Pci, m0: crate::TransportMetrics, what: &str) {
    let mut m = p.f.metrics();
    assert_eq!(
        m.bad_register_accesses,
        m0.bad_register_accesses + 1,
        "{what}"
    );
    m.bad_register_accesses = m0.bad_register_accesses;
    assert_eq!(m, m0, "{what}");
    assert_eq!(p.used_idx(), 1, "{what}");
    assert!(p.sink.sent().is_empty(), "{what}");
    assert_eq!(p.status(), 0xf, "{what}");
    assert_eq!(
        p.rd(ISR_CFG_OFFSET, 1),
        VIRTIO_PCI_ISR_QUEUE as u64,
        "{what}"
    );
}

#[test]
fn pci_cfg_bad_windows_do_nothing() {
    for &(what, bar, offset, length) in BAD_WINDOWS {
        for width in [1usize, 2, 4] {
            // Read: pci_cfg_data keeps (and returns) what it held; no BAR read happened.
            let mut p = bad_window_fixture(bar, offset, length);
            let cap = p.pci_cfg_cap();
            let m0 = p.f.metrics();
            let at = cap + DATA + (4 - width as u16);
            let want = low(0x5a5a_5a5a, width);
            assert_eq!(cfg_read(&mut p.f, at, width), want, "{what} read/{width}");
            assert_eq!(p.stored_data(), 0x5a5a_5a5a, "{what}");
            assert_untouched(&mut p, m0, what);

            // Write: stored in pci_cfg_data, no BAR write (0 would reset the status or ring
            // the doorbell).
            let mut p = bad_window_fixture(bar, offset, length);
            let m0 = p.f.metrics();
            cfg_write(&mut p.f, cap + DATA, width, 0);
            let want = 0x5a5a_5a5a & !low(u32::MAX, width);
            assert_eq!(p.stored_data(), want, "{what} write/{width}");
            assert_untouched(&mut p, m0, what);
        }
    }
}

#[test]
fn pci_cfg_window_onto_no_register_is_a_bad_bar_access() {
    // A window that acts, onto BAR bytes no structure decodes: the same as a memory access
    // there (reads 0, counted) — and the 0 lands in pci_cfg_data.
    let mut p = bad_window_fixture(0, 0x7ffc, 4);
    let cap = p.pci_cfg_cap();
    let m0 = p.f.metrics();
    assert_eq!(cfg_read(&mut p.f, cap + DATA, 4), 0);
    assert_untouched(&mut p, m0, "read");
    let mut p = bad_window_fixture(0, 0x7ffc, 4);
    let m0 = p.f.metrics();
    cfg_write(&mut p.f, cap + DATA, 4, 1);
    assert_untouched(&mut p, m0, "write");
    // A width the register refuses (4 bytes at the one-byte status): counted by the BAR
    // decode, status unchanged.
    let mut p = bad_window_fixture(0, 0x14, 4);
    let m0 = p.f.metrics();
    cfg_write(&mut p.f, cap + DATA, 4, 0);
    assert_untouched(&mut p, m0, "status/4");
}

#[test]
fn pci_cfg_data_partial_accesses() {
    let mut p = Pci::new();
    let cap = p.pci_cfg_cap();
    // cap.length 4 onto device_feature_select: a byte write into pci_cfg_data writes the
    // whole stored dword to the BAR.
    p.set_window(0, 0x00, 4);
    cfg_write(&mut p.f, cap + DATA + 1, 1, 0x01);
    assert_eq!(p.rd(0x00, 4), 0x0000_0100);
    cfg_write(&mut p.f, cap + DATA + 2, 2, 0xabcd);
    assert_eq!(p.rd(0x00, 4), 0xabcd_0100);
    // cap.length 4 onto device_feature with select 1: byte and word reads of pci_cfg_data each
    // read the whole dword from the BAR and return their part.
    p.wr(0x00, 4, 1);
    p.set_window(0, 0x04, 4);
    assert_eq!(cfg_read(&mut p.f, cap + DATA, 1), 1);
    assert_eq!(cfg_read(&mut p.f, cap + DATA + 2, 2), 0);
    assert_eq!(p.stored_data(), 1);
    // cap.length 1 onto device_status: a dword write sends only its first byte.
    p.set_window(0, 0x14, 1);
    cfg_write(&mut p.f, cap + DATA, 4, 0xffff_ff01);
    assert_eq!(p.status(), STATUS_ACKNOWLEDGE);
    // cap.length 2 onto queue_select: a byte write beyond cap.length still writes the first
    // two stored bytes (here 0x01, 0xff: queue 0xff01 selected).
    p.set_window(0, 0x16, 2);
    cfg_write(&mut p.f, cap + DATA + 3, 1, 0x00);
    assert_eq!(p.rd(0x16, 2), 0xff01);
    // cap.length 1 onto the ISR: byte 0 is the ISR, bytes 1..3 keep what they held.
    p.f.core_mut().config_changed();
    p.set_window(0, ISR_CFG_OFFSET as u32, 1);
    assert_eq!(
        cfg_read(&mut p.f, cap + DATA, 4),
        0x00ff_ff00 | VIRTIO_PCI_ISR_CONFIG as u32
    );
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), 0);
    assert_eq!(p.f.metrics().bad_register_accesses, 0);
    // Accesses the configuration space itself refuses (misaligned, odd width) read all-ones
    // and reach no BAR.
    p.set_window(0, 0x16, 2);
    let bad0 = p.f.config_space().stats().bad_accesses;
    let mut b = [0u8; 3];
    p.f.config_read(cap + DATA, &mut b);
    assert_eq!(b, [0xff; 3]);
    assert_eq!(cfg_read(&mut p.f, cap + DATA + 1, 2), 0xffff);
    p.f.config_write(cap + DATA + 1, &[0, 0]);
    assert_eq!(p.f.config_space().stats().bad_accesses, bad0 + 3);
    assert_eq!(p.rd(0x16, 2), 0xff01);
    assert_eq!(p.f.metrics().bad_register_accesses, 0);
}

/// One step of the differential test.
#[derive(Clone, Debug)]
enum Step {
    /// A `len`-byte access at `off` (aligned down to `len`).
    Access {
        off: u64,
        len: usize,
        write: bool,
        value: u32,
    },
    /// A full bring-up with queue vector `qvec`.
    BringUp { qvec: u16 },
    /// Post a buffer on queue 0 (guest memory, not a register access).
    Post,
}

fn step() -> impl Strategy<Value = Step> {
    let off = prop_oneof![
        0u64..0x40,
        0x1000u64..0x1004,
        0x2000u64..0x2010,
        0x3000u64..0x3008,
        0x4000u64..0x4030,
        0x6000u64..0x6008,
        0x7ff0u64..0x8000,
    ];
    let value = prop_oneof![0u32..0x20, any::<u32>(), Just(0xffff)];
    prop_oneof![
        8 => (off, prop::sample::select(vec![1usize, 2, 4]), any::<bool>(), value).prop_map(
            |(off, len, write, value)| Step::Access {
                off: off & !(len as u64 - 1),
                len,
                write,
                value,
            }
        ),
        1 => prop_oneof![Just(VIRTIO_MSI_NO_VECTOR), 0u16..3].prop_map(|qvec| Step::BringUp { qvec }),
        1 => Just(Step::Post),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any sequence of (aligned, in-BAR) accesses has the same results and effects through the
    /// window as through the BAR: read values, counters, status, used ring, MSIs sent.
    #[test]
    fn pci_cfg_window_matches_bar_accesses(steps in prop::collection::vec(step(), 1..48)) {
        let (mut a, mut b) = (Pci::new(), Pci::new());
        a.msix_program(1, 0x45);
        b.msix_program_via(Via::Window, 1, 0x45);
        for s in steps {
            match s {
                Step::Access { off, len, write, value } => {
                    let x = a.access(Via::Bar, write, off, len, value);
                    let y = b.access(Via::Window, write, off, len, value);
                    prop_assert_eq!(x, y, "{:#x}/{} write {}", off, len, write);
                }
                Step::BringUp { qvec } => {
                    a.bring_up_via(Via::Bar, qvec);
                    b.bring_up_via(Via::Window, qvec);
                }
                Step::Post => {
                    a.post(4);
                    b.post(4);
                }
            }
            prop_assert_eq!(a.f.metrics(), b.f.metrics());
            prop_assert_eq!(a.f.core().status(), b.f.core().status());
            prop_assert_eq!(a.used_idx(), b.used_idx());
            prop_assert_eq!(a.sink.sent(), b.sink.sent());
        }
    }
}
