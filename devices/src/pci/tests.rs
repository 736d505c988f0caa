//! Unit tests of the PCI config space, MSI-X and the root bus (no KVM).

use std::sync::{Arc, Mutex};

use super::*;
use crate::IoBuses;
use crate::interrupt::InterruptSource;
use crate::msi::{MsiEvent, MsiMessage, RecordingMsiSink};

fn header() -> PciHeader {
    PciHeader {
        vendor_id: 0x1af4,
        device_id: 0x1044,
        revision_id: 1,
        class_code: 0xff,
        subclass: 0x00,
        prog_if: 0x00,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x0004,
        interrupt_pin: 1,
    }
}

fn rd(c: &ConfigSpace, off: u16, len: usize) -> u32 {
    let mut b = [0u8; 4];
    c.read(off, &mut b[..len]);
    u32::from_le_bytes(b)
}

fn wr(c: &mut ConfigSpace, off: u16, len: usize, v: u32) {
    c.write(off, &v.to_le_bytes()[..len]);
}

#[test]
fn config_reads_at_every_width_and_alignment() {
    let c = ConfigSpace::new(&header());
    let dword0 = 0x1044_1af4u32;
    let bytes = dword0.to_le_bytes();
    for (off, len) in [(0, 1), (1, 1), (2, 1), (3, 1), (0, 2), (2, 2), (0, 4)] {
        let mut expect = [0u8; 4];
        expect[..len].copy_from_slice(&bytes[off..off + len]);
        assert_eq!(
            rd(&c, off as u16, len),
            u32::from_le_bytes(expect),
            "{off}/{len}"
        );
    }
    assert_eq!(rd(&c, 0x08, 4), 0xff00_0001); // class ff, subclass 0, prog-if 0, revision 1
    assert_eq!(rd(&c, 0x2c, 4), 0x0004_1af4);
    assert_eq!(rd(&c, 0x3d, 1), 1);
    assert_eq!(c.stats().bad_accesses, 0);
}

#[test]
fn config_writes_respect_masks_at_every_width() {
    let mut c = ConfigSpace::new(&header());
    // Read-only identity.
    wr(&mut c, 0, 4, 0);
    wr(&mut c, 2, 2, 0);
    wr(&mut c, 8, 4, 0);
    assert_eq!(rd(&c, 0, 4), 0x1044_1af4);
    assert_eq!(rd(&c, 8, 4), 0xff00_0001);
    // Command: only the defined bits stick, byte and word writes alike.
    wr(&mut c, 4, 2, 0xffff);
    assert_eq!(rd(&c, 4, 2), 0x0547);
    wr(&mut c, 5, 1, 0);
    assert_eq!(rd(&c, 4, 2), 0x0047);
    wr(&mut c, 4, 1, 0x02);
    assert_eq!(rd(&c, 4, 2), 0x0002);
    // Status: RW1C bits clear on 1, others read-only.
    c.set_u16(reg::STATUS, 0xf900 | status::CAPABILITIES_LIST);
    wr(&mut c, 6, 2, 0x8100);
    assert_eq!(rd(&c, 6, 2), 0x7810);
    // A dword write over command+status touches both with their own masks.
    wr(&mut c, 4, 4, 0x7800_0006);
    assert_eq!(rd(&c, 4, 4), 0x0010_0006);
    // Interrupt line is writable, pin is not.
    wr(&mut c, 0x3c, 2, 0x040b);
    assert_eq!(rd(&c, 0x3c, 2), 0x010b);
    // Unused header bytes and an unused BAR are read-only zero.
    wr(&mut c, 0x10, 4, 0xffff_ffff);
    wr(&mut c, 0x30, 4, 0xffff_ffff);
    assert_eq!(rd(&c, 0x10, 4), 0);
    assert_eq!(rd(&c, 0x30, 4), 0);
}

#[test]
fn bar_sizing_for_each_kind() {
    let mut c = ConfigSpace::new(&header());
    c.add_bar(
        0,
        BarKind::Memory32 {
            prefetchable: false,
        },
        0x1000,
    )
    .unwrap();
    c.add_bar(1, BarKind::Io, 0x40).unwrap();
    c.add_bar(2, BarKind::Memory64 { prefetchable: true }, 0x2_0000_0000)
        .unwrap();
    c.add_bar(
        4,
        BarKind::Memory64 {
            prefetchable: false,
        },
        0x4000,
    )
    .unwrap();
    // Type bits before sizing.
    assert_eq!(rd(&c, 0x10, 4), 0x0);
    assert_eq!(rd(&c, 0x14, 4), 0x1);
    assert_eq!(rd(&c, 0x18, 4), 0xc);
    assert_eq!(rd(&c, 0x20, 4), 0x4);
    for off in (0x10..0x28).step_by(4) {
        wr(&mut c, off, 4, 0xffff_ffff);
    }
    assert_eq!(rd(&c, 0x10, 4), 0xffff_f000); // 4 KiB memory32
    assert_eq!(rd(&c, 0x14, 4), 0x0000_ffc1); // 64-byte I/O, 16-bit port space
    assert_eq!(rd(&c, 0x18, 4), 0x0000_000c); // 8 GiB memory64: low dword has no address bits
    assert_eq!(rd(&c, 0x1c, 4), 0xffff_fffe);
    assert_eq!(rd(&c, 0x20, 4), 0xffff_c004); // 16 KiB memory64
    assert_eq!(rd(&c, 0x24, 4), 0xffff_ffff);
    // Program addresses; decoding follows the command register.
    wr(&mut c, 0x10, 4, 0xe000_0000);
    wr(&mut c, 0x14, 4, 0xc040);
    wr(&mut c, 0x18, 4, 0);
    wr(&mut c, 0x1c, 4, 0x4);
    wr(&mut c, 0x20, 4, 0xe010_0000);
    wr(&mut c, 0x24, 4, 0);
    assert!(c.bars().is_empty());
    wr(
        &mut c,
        4,
        2,
        (command::MEMORY_SPACE | command::IO_SPACE) as u32,
    );
    let bars = c.bars();
    assert_eq!(
        bars.iter()
            .map(|b| (b.index, b.address, b.size))
            .collect::<Vec<_>>(),
        [
            (0, 0xe000_0000, 0x1000),
            (1, 0xc040, 0x40),
            (2, 0x4_0000_0000, 0x2_0000_0000),
            (4, 0xe010_0000, 0x4000)
        ]
    );
    wr(&mut c, 4, 2, command::IO_SPACE as u32);
    assert_eq!(c.bars().len(), 1);
    // Definition errors.
    assert_eq!(c.add_bar(3, BarKind::Io, 4), Err(PciError::BarIndex(3)));
    assert_eq!(c.add_bar(6, BarKind::Io, 4), Err(PciError::BarIndex(6)));
    let mut d = ConfigSpace::new(&header());
    assert_eq!(
        d.add_bar(
            5,
            BarKind::Memory64 {
                prefetchable: false
            },
            0x1000
        ),
        Err(PciError::BarIndex(5))
    );
    assert_eq!(
        d.add_bar(0, BarKind::Io, 0x30),
        Err(PciError::BarSize(0x30))
    );
    assert_eq!(
        d.add_bar(0, BarKind::Io, 0x2_0000),
        Err(PciError::BarSize(0x2_0000))
    );
    assert_eq!(
        d.add_bar(
            0,
            BarKind::Memory32 {
                prefetchable: false
            },
            8
        ),
        Err(PciError::BarSize(8))
    );
}

#[test]
fn capability_list_walk() {
    let mut c = ConfigSpace::new(&header());
    assert_eq!(rd(&c, 6, 2) & status::CAPABILITIES_LIST as u32, 0);
    assert!(c.capabilities().is_empty());
    let a = c
        .add_capability(cap_id::VENDOR_SPECIFIC, &[16, 1, 2, 3], &[0, 0, 0xff])
        .unwrap();
    let b = c.add_capability(cap_id::PM, &[0; 6], &[]).unwrap();
    let x = c
        .add_capability(cap_id::VENDOR_SPECIFIC, &[5, 0, 0], &[])
        .unwrap();
    assert_eq!((a, b, x), (0x40, 0x48, 0x50));
    assert_ne!(rd(&c, 6, 2) & status::CAPABILITIES_LIST as u32, 0);
    assert_eq!(rd(&c, 0x34, 1), 0x40);
    assert_eq!(
        c.capabilities(),
        [
            (cap_id::VENDOR_SPECIFIC, 0x40),
            (cap_id::PM, 0x48),
            (cap_id::VENDOR_SPECIFIC, 0x50)
        ]
    );
    // Header and next pointers are read-only; the masked body byte is writable.
    wr(&mut c, 0x40, 4, 0xffff_ffff);
    assert_eq!(rd(&c, 0x40, 4), 0x0110_4809);
    wr(&mut c, 0x44, 4, 0xffff_ffff);
    assert_eq!(rd(&c, 0x44, 4), 0x0000_03ff);
    // Running out of room.
    assert_eq!(
        c.add_capability(1, &[0; 200], &[]),
        Err(PciError::NoCapabilitySpace(204))
    );
    assert_eq!(
        c.add_capability(1, &[0; 2], &[0; 3]),
        Err(PciError::MaskLength)
    );
    // Extended capabilities chain from 0x100.
    let e1 = c
        .add_ext_capability(ext_cap_id::VNDR, 1, &[1, 2, 3, 4], &[])
        .unwrap();
    let e2 = c
        .add_ext_capability(ext_cap_id::SRIOV, 1, &[0; 0x3c], &[])
        .unwrap();
    assert_eq!((e1, e2), (0x100, 0x108));
    assert_eq!(rd(&c, 0x100, 4), 0x1081_000b);
    assert_eq!(
        c.ext_capabilities(),
        [(ext_cap_id::VNDR, 1, 0x100), (ext_cap_id::SRIOV, 1, 0x108)]
    );
    let mut conv = ConfigSpace::conventional(&header());
    assert_eq!(
        conv.add_ext_capability(1, 1, &[], &[]),
        Err(PciError::NotExpress)
    );
    assert!(conv.ext_capabilities().is_empty());
}

fn msix_setup(vectors: u16) -> (Arc<RecordingMsiSink>, Msix, ConfigSpace, u16) {
    let sink = Arc::new(RecordingMsiSink::default());
    let msix = Msix::new(MsixConfig::in_bar(2, vectors, 0x800), sink.clone()).unwrap();
    let mut c = ConfigSpace::new(&header());
    c.add_bar(
        2,
        BarKind::Memory32 {
            prefetchable: false,
        },
        0x1000,
    )
    .unwrap();
    let cap = c.add_msix(&msix).unwrap();
    (sink, msix, c, cap)
}

fn program_entry(m: &Msix, v: u16, vector: u8) {
    let at = 0x800 + 16 * v as u64;
    m.bar_write(2, at, &0xfee0_1000u64.to_le_bytes());
    m.bar_write(2, at + 8, &(vector as u32).to_le_bytes());
}

fn unmask(m: &Msix, v: u16, masked: bool) {
    m.bar_write(
        2,
        0x800 + 16 * v as u64 + 12,
        &(masked as u32).to_le_bytes(),
    );
}

#[test]
fn msix_capability_layout() {
    let (_, _, c, cap) = msix_setup(3);
    assert_eq!(c.capabilities(), [(cap_id::MSIX, cap)]);
    assert_eq!(rd(&c, cap, 4), 0x0002_0011);
    assert_eq!(rd(&c, cap + 4, 4), 0x802);
    assert_eq!(rd(&c, cap + 8, 4), 0x832);
    // Only enable and function mask are writable in message control.
    let mut c = c;
    wr(&mut c, cap + 2, 2, 0xffff);
    assert_eq!(rd(&c, cap + 2, 2), 0xc002);
}

#[test]
fn msix_masking_holds_messages_pending_until_unmasked() {
    let (sink, msix, mut c, cap) = msix_setup(4);
    program_entry(&msix, 1, 0x51);
    program_entry(&msix, 2, 0x52);
    let v1 = msix.vector(1);
    // Disabled: dropped.
    v1.trigger().unwrap();
    assert_eq!(msix.stats().dropped, 1);
    // Enabled, vector masked (reset state): pending.
    wr(&mut c, cap + 2, 2, 0x8000);
    assert!(msix.enabled());
    v1.trigger().unwrap();
    assert!(msix.pending(1) && sink.sent().is_empty());
    let mut pba = [0u8; 8];
    assert!(msix.bar_read(2, 0x840, &mut pba));
    assert_eq!(u64::from_le_bytes(pba), 0b10);
    // Function mask holds it even after the vector is unmasked.
    wr(&mut c, cap + 3, 1, 0xc0);
    unmask(&msix, 1, false);
    assert!(msix.pending(1) && sink.sent().is_empty());
    // Clearing the function mask delivers the pending message once.
    wr(&mut c, cap + 2, 2, 0x8000);
    assert_eq!(
        sink.sent(),
        [MsiMessage {
            address: 0xfee0_1000,
            data: 0x51
        }]
    );
    assert!(!msix.pending(1));
    // Unmasked: direct delivery; vector 2 is masked, then unmasking delivers.
    v1.trigger().unwrap();
    msix.vector(2).trigger().unwrap();
    msix.vector(2).trigger().unwrap(); // coalesces into one pending bit
    assert_eq!(sink.vectors(), [0x51, 0x51]);
    unmask(&msix, 2, false);
    assert_eq!(sink.vectors(), [0x51, 0x51, 0x52]);
    // Masking again and reading the entry back.
    unmask(&msix, 2, true);
    let mut e = [0u8; 16];
    msix.bar_read(2, 0x820, &mut e[..8]);
    msix.bar_read(2, 0x828, &mut e[8..]);
    assert_eq!(
        e,
        [0, 0x10, 0xe0, 0xfe, 0, 0, 0, 0, 0x52, 0, 0, 0, 1, 0, 0, 0]
    );
    let s = msix.stats();
    assert_eq!(
        (s.delivered, s.pended, s.dropped, s.bad_accesses),
        (3, 3, 1, 0)
    );
}

#[test]
fn msix_irqfd_vectors_write_the_eventfd_and_keep_the_route() {
    let (sink, msix, mut c, cap) = msix_setup(2);
    let fd = Arc::new(vmm_sys_util::eventfd::EventFd::new(0).unwrap());
    msix.attach_irqfd(0, 40, fd.clone()).unwrap();
    program_entry(&msix, 0, 0x60);
    let routes: Vec<_> = sink
        .events()
        .into_iter()
        .filter_map(|e| match e {
            MsiEvent::Route(40, m) => m,
            _ => None,
        })
        .collect();
    assert_eq!(
        routes.last(),
        Some(&MsiMessage {
            address: 0xfee0_1000,
            data: 0x60
        })
    );
    let v = msix.vector(0);
    assert!(v.notifier().is_some());
    wr(&mut c, cap + 2, 2, 0x8000);
    v.trigger().unwrap(); // masked: pending, eventfd untouched
    unmask(&msix, 0, false);
    v.trigger().unwrap();
    assert_eq!(fd.read().unwrap(), 2);
    assert!(sink.sent().is_empty());
    assert!(msix.attach_irqfd(9, 41, fd).is_err());
}

/// A function for root-bus tests: a config space with BARs, MSI-X in BAR 2, a scratch BAR 0.
struct TestFn {
    cfg: ConfigSpace,
    msix: Msix,
    scratch: [u8; 16],
}

impl PciFunction for TestFn {
    fn config_space(&self) -> &ConfigSpace {
        &self.cfg
    }
    fn config_space_mut(&mut self) -> &mut ConfigSpace {
        &mut self.cfg
    }
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if self.msix.bar_read(bar, offset, data) {
            return;
        }
        let o = offset as usize;
        match self.scratch.get(o..o + data.len()) {
            Some(s) if bar == 0 => data.copy_from_slice(s),
            _ => data.fill(0),
        }
    }
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if self.msix.bar_write(bar, offset, data) {
            return;
        }
        let o = offset as usize;
        if let Some(s) = self.scratch.get_mut(o..o + data.len())
            && bar == 0
        {
            s.copy_from_slice(data);
        }
    }
}

fn root_setup() -> (Arc<IoBuses>, Arc<PciRoot>, Arc<RecordingMsiSink>) {
    let sink = Arc::new(RecordingMsiSink::default());
    let msix = Msix::new(MsixConfig::in_bar(2, 2, 0), sink.clone()).unwrap();
    let mut cfg = ConfigSpace::new(&header());
    cfg.add_bar(
        0,
        BarKind::Memory32 {
            prefetchable: false,
        },
        0x1000,
    )
    .unwrap();
    cfg.add_bar(1, BarKind::Io, 0x10).unwrap();
    cfg.add_bar(
        2,
        BarKind::Memory64 {
            prefetchable: false,
        },
        0x1000,
    )
    .unwrap();
    cfg.add_msix(&msix).unwrap();
    let buses = Arc::new(IoBuses::default());
    let root = PciRoot::new(&buses);
    let f = TestFn {
        cfg,
        msix,
        scratch: [0; 16],
    };
    assert_eq!(root.add_next("t", Arc::new(Mutex::new(f))).unwrap(), 0);
    buses
        .pio
        .insert(
            root::PCI_CONFIG_IO_PORT as u64,
            root::PCI_CONFIG_IO_LEN,
            "cf8",
            root.config_io(),
        )
        .unwrap();
    buses
        .mmio
        .insert(0xb000_0000, root::PCI_ECAM_BUS_SIZE, "ecam", root.ecam())
        .unwrap();
    (buses, root, sink)
}

fn cf8_read(b: &IoBuses, devfn: u8, reg: u16, len: usize) -> u32 {
    let addr = 0x8000_0000u32 | (devfn as u32) << 8 | (reg as u32 & 0xfc);
    b.pio.write(0xcf8, &addr.to_le_bytes());
    let mut d = [0u8; 4];
    b.pio.read(0xcfc + (reg as u64 & 3), &mut d[..len]);
    u32::from_le_bytes(d)
}

fn cf8_write(b: &IoBuses, devfn: u8, reg: u16, len: usize, v: u32) {
    let addr = 0x8000_0000u32 | (devfn as u32) << 8 | (reg as u32 & 0xfc);
    b.pio.write(0xcf8, &addr.to_le_bytes());
    b.pio
        .write(0xcfc + (reg as u64 & 3), &v.to_le_bytes()[..len]);
}

#[test]
fn mechanism1_and_ecam_at_every_width() {
    let (b, root, _) = root_setup();
    for (reg, len, want) in [
        (0, 4, 0x1044_1af4),
        (0, 2, 0x1af4),
        (2, 2, 0x1044),
        (1, 1, 0x1a),
        (3, 1, 0x10),
        (0x0b, 1, 0xff),
    ] {
        assert_eq!(cf8_read(&b, 0, reg, len), want, "cf8 {reg:#x}/{len}");
        let mut d = [0u8; 4];
        b.mmio.read(0xb000_0000 + reg as u64, &mut d[..len]);
        assert_eq!(u32::from_le_bytes(d), want, "ecam {reg:#x}/{len}");
    }
    // CONFIG_ADDRESS reads back with reserved bits clear.
    b.pio.write(0xcf8, &0xffff_ffffu32.to_le_bytes());
    let mut a = [0u8; 4];
    b.pio.read(0xcf8, &mut a);
    assert_eq!(u32::from_le_bytes(a), 0x80ff_fffc);
    // Enable bit clear: data reads all-ones.
    b.pio.write(0xcf8, &0u32.to_le_bytes());
    b.pio.read(0xcfc, &mut a);
    assert_eq!(a, [0xff; 4]);
    // Byte writes through 0xCFD reach the command register's upper byte.
    cf8_write(&b, 0, 5, 1, 0x04);
    assert_eq!(cf8_read(&b, 0, 4, 2), 0x0400);
    // Absent functions read all-ones and are counted.
    assert_eq!(cf8_read(&b, 1 << 3, 0, 4), 0xffff_ffff);
    let mut d = [0u8; 2];
    b.mmio.read(0xb000_0000 + (3 << 15) + 2, &mut d);
    assert_eq!(d, [0xff; 2]);
    assert_eq!(root.stats().absent_function_accesses, 2);
    assert_eq!(root.stats().bad_accesses, 0);
}

#[test]
fn bars_map_relocate_and_unmap_on_the_buses() {
    let (b, root, sink) = root_setup();
    cf8_write(&b, 0, 0x10, 4, 0xe000_0000);
    cf8_write(&b, 0, 0x14, 4, 0x6000);
    cf8_write(&b, 0, 0x18, 4, 0xe100_0000);
    cf8_write(&b, 0, 0x1c, 4, 0x1);
    assert!(root.mapped_bars(0, 0).is_empty());
    cf8_write(&b, 0, 4, 2, 0x7); // I/O + memory + bus master
    let names = |bus: &crate::Bus| bus.ranges().into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(&b.mmio),
        [
            (0xb000_0000, 1 << 20, "ecam".to_string()),
            (0xe000_0000, 0x1000, "t/bar0".to_string()),
            (0x1_e100_0000, 0x1000, "t/bar2".to_string())
        ]
    );
    assert!(names(&b.pio).contains(&(0x6000, 0x10, "t/bar1".to_string())));
    // BAR access reaches the function.
    b.mmio.write(0xe000_0004, &[1, 2, 3, 4]);
    let mut d = [0u8; 4];
    b.mmio.read(0xe000_0004, &mut d);
    assert_eq!(d, [1, 2, 3, 4]);
    // Relocate BAR0 (decoding on): the old range is gone, the new one serves the same device.
    cf8_write(&b, 0, 0x10, 4, 0xe800_0000);
    assert!(!b.mmio.read(0xe000_0004, &mut d));
    b.mmio.read(0xe800_0004, &mut d);
    assert_eq!(d, [1, 2, 3, 4]);
    // MSI-X through the mapped 64-bit BAR.
    let t = 0x1_e100_0000u64;
    b.mmio.write(t, &0xfee0_0000u32.to_le_bytes());
    b.mmio.write(t + 8, &0x77u32.to_le_bytes());
    b.mmio.write(t + 12, &0u32.to_le_bytes());
    let mut e = [0u8; 8];
    b.mmio.read(t + 8, &mut e);
    assert_eq!(e, [0x77, 0, 0, 0, 0, 0, 0, 0]);
    // Turning decoding off unmaps every BAR.
    cf8_write(&b, 0, 4, 2, 0x0);
    assert_eq!(b.mmio.ranges().len(), 1);
    assert_eq!(b.pio.ranges().len(), 1);
    // A BAR programmed over another device's range cannot map: counted, and nothing moves.
    cf8_write(&b, 0, 0x10, 4, 0xb000_0000);
    cf8_write(&b, 0, 4, 2, 0x2);
    assert_eq!(root.stats().bar_map_errors, 1);
    assert_eq!(
        root.mapped_bars(0, 0)
            .iter()
            .map(|b| b.index)
            .collect::<Vec<_>>(),
        [2]
    );
    // Moving it somewhere free maps it.
    cf8_write(&b, 0, 0x10, 4, 0xe000_0000);
    assert_eq!(root.mapped_bars(0, 0).len(), 2);
    assert!(sink.sent().is_empty());
}

/// Bad guest input on the config and MSI-X paths: ignored, counted, never a panic.
#[test]
fn bad_input_table() {
    // (name, access, expected root bad, expected absent)
    type Op = fn(&IoBuses) -> bool;
    let root_cases: &[(&str, Op, u64, u64)] = &[
        (
            "ecam unaligned word",
            |b| b.mmio.write(0xb000_0001, &[0, 0]),
            1,
            0,
        ),
        (
            "ecam unaligned dword read",
            |b| b.mmio.read(0xb000_0002, &mut [0; 4]),
            1,
            0,
        ),
        (
            "ecam 8-byte read",
            |b| b.mmio.read(0xb000_0000, &mut [0; 8]),
            1,
            0,
        ),
        (
            "ecam 3-byte write",
            |b| b.mmio.write(0xb000_0000, &[0; 3]),
            1,
            0,
        ),
        (
            "cf8 word at 0xcfd",
            |b| {
                b.pio.write(0xcf8, &0x8000_0000u32.to_le_bytes());
                b.pio.read(0xcfd, &mut [0; 2])
            },
            1,
            0,
        ),
        (
            // Bus 1 exists (any bus number does), but nothing is there.
            "cf8 bus 1, no function",
            |b| {
                b.pio.write(0xcf8, &0x8001_0000u32.to_le_bytes());
                b.pio.write(0xcfc, &[0; 4])
            },
            0,
            1,
        ),
        (
            "cf8 absent device 31 fn 7",
            |b| {
                b.pio.write(0xcf8, &0x8000_ff00u32.to_le_bytes());
                b.pio.read(0xcfc, &mut [0; 4])
            },
            0,
            1,
        ),
        (
            "cf8 byte write to CONFIG_ADDRESS",
            |b| b.pio.write(0xcf8, &[0xff]),
            0,
            0,
        ),
    ];
    for (name, op, bad, absent) in root_cases {
        let (b, root, _) = root_setup();
        op(&b);
        assert_eq!(root.stats().bad_accesses, *bad, "{name}");
        assert_eq!(root.stats().absent_function_accesses, *absent, "{name}");
        assert_eq!(cf8_read(&b, 0, 0, 4), 0x1044_1af4, "{name}");
    }

    // Config accesses beyond a conventional function's 256 bytes (via its ConfigSpace).
    let mut conv = ConfigSpace::conventional(&header());
    let mut d = [0u8; 4];
    conv.read(0x100, &mut d);
    conv.write(0xffc, &[1, 2, 3, 4]);
    conv.read(0x1000, &mut d[..1]);
    conv.write(0xfffe, &[1, 2]);
    assert_eq!(d, [0xff; 4]);
    assert_eq!(conv.stats().bad_accesses, 4);

    // MSI-X table/PBA accesses with bad offsets or widths.
    type MOp = fn(&Msix);
    let msix_cases: &[(&str, MOp)] = &[
        ("table byte write", |m| {
            m.bar_write(2, 0x80c, &[0]);
        }),
        ("table word write", |m| {
            m.bar_write(2, 0x80c, &[0, 0]);
        }),
        ("table unaligned dword", |m| {
            m.bar_write(2, 0x80d, &[0; 4]);
        }),
        ("table qword at dword alignment", |m| {
            m.bar_write(2, 0x804, &[0; 8]);
        }),
        ("table qword straddling the end", |m| {
            m.bar_write(2, 0x83c, &[0; 8]);
        }),
        ("table 16-byte write", |m| {
            m.bar_write(2, 0x800, &[0; 16]);
        }),
        ("pba write", |m| {
            m.bar_write(2, 0x840, &[0xff; 8]);
        }),
        ("table byte read", |m| {
            m.bar_read(2, 0x800, &mut [0]);
        }),
    ];
    for (name, op) in msix_cases {
        let (sink, msix, _, _) = msix_setup(4);
        op(&msix);
        assert_eq!(msix.stats().bad_accesses, 1, "{name}");
        for v in 0..4 {
            assert!(msix.masked(v), "{name}");
            assert_eq!(msix.message(v), Some(MsiMessage::default()), "{name}");
            assert!(!msix.pending(v), "{name}");
        }
        assert!(sink.events().is_empty(), "{name}");
    }
    // Outside both structures: not claimed by MSI-X at all.
    let (_, msix, _, _) = msix_setup(4);
    assert!(!msix.bar_write(2, 0x7fc, &[0; 4]));
    assert!(!msix.bar_write(1, 0x800, &[0; 4]));
    assert!(!msix.bar_read(2, 0x848, &mut [0; 4]));
    assert!(!msix.bar_read(2, u64::MAX, &mut [0; 4]));
    assert_eq!(msix.stats().bad_accesses, 0);
    // Signals to vectors that do not exist are dropped and counted.
    msix.signal(4).unwrap();
    assert_eq!(msix.stats().dropped, 1);
}

#[test]
fn slot_and_layout_errors() {
    let buses = Arc::new(IoBuses::default());
    let root = PciRoot::new(&buses);
    let mk = || {
        let sink = Arc::new(RecordingMsiSink::default());
        let msix = Msix::new(MsixConfig::in_bar(0, 1, 0), sink).unwrap();
        Arc::new(Mutex::new(TestFn {
            cfg: ConfigSpace::new(&header()),
            msix,
            scratch: [0; 16],
        }))
    };
    root.add(3, 1, "a", mk()).unwrap();
    assert_eq!(
        root.add(3, 1, "b", mk()),
        Err(PciError::SlotInUse {
            device: 3,
            function: 1
        })
    );
    assert_eq!(
        root.add(32, 0, "b", mk()),
        Err(PciError::BadSlot {
            device: 32,
            function: 0
        })
    );
    assert_eq!(
        root.add(0, 8, "b", mk()),
        Err(PciError::BadSlot {
            device: 0,
            function: 8
        })
    );
    for d in 0..31 {
        root.add_next("n", mk())
            .unwrap_or_else(|e| panic!("{d}: {e}"));
    }
    assert_eq!(root.add_next("full", mk()), Err(PciError::BusFull));
    let sink: Arc<RecordingMsiSink> = Arc::default();
    for (cfg, why) in [
        (MsixConfig::in_bar(0, 0, 0), "vector count must be 1..=2048"),
        (
            MsixConfig::in_bar(0, 2049, 0),
            "vector count must be 1..=2048",
        ),
        (
            MsixConfig::in_bar(0, 1, 4),
            "table and PBA must be 8-byte aligned",
        ),
        (
            MsixConfig {
                pba_offset: 0x8,
                ..MsixConfig::in_bar(0, 2, 0)
            },
            "table and PBA overlap",
        ),
    ] {
        assert_eq!(
            Msix::new(cfg, sink.clone()).err(),
            Some(PciError::MsixLayout(why))
        );
    }
    // Table outside its BAR.
    let msix = Msix::new(MsixConfig::in_bar(0, 128, 0x800), sink.clone()).unwrap();
    let mut c = ConfigSpace::new(&header());
    assert!(matches!(c.add_msix(&msix), Err(PciError::MsixLayout(_))));
    c.add_bar(
        0,
        BarKind::Memory32 {
            prefetchable: false,
        },
        0x1000,
    )
    .unwrap();
    assert!(matches!(c.add_msix(&msix), Err(PciError::MsixLayout(_))));
    let small = Msix::new(MsixConfig::in_bar(0, 8, 0), sink).unwrap();
    c.add_msix(&small).unwrap();
    assert_eq!(c.add_msix(&small), Err(PciError::MsixTwice));
}

fn full_function() -> ConfigSpace {
    let sink: Arc<RecordingMsiSink> = Arc::default();
    let msix = Msix::new(MsixConfig::in_bar(2, 4, 0x800), sink).unwrap();
    let mut c = ConfigSpace::new(&header());
    c.add_bar(0, BarKind::Memory32 { prefetchable: true }, 0x1000)
        .unwrap();
    c.add_bar(1, BarKind::Io, 0x20).unwrap();
    c.add_bar(
        2,
        BarKind::Memory64 {
            prefetchable: false,
        },
        0x1000,
    )
    .unwrap();
    c.add_capability(cap_id::VENDOR_SPECIFIC, &[6, 1, 2, 3], &[0, 0xff])
        .unwrap();
    c.add_msix(&msix).unwrap();
    c.add_ext_capability(ext_cap_id::VNDR, 1, &[0; 12], &[0xff; 4])
        .unwrap();
    c
}

#[test]
fn every_aligned_width_reads_the_same_bytes() {
    let c = full_function();
    let mut all = vec![0u8; 4096];
    for off in (0..4096u16).step_by(4) {
        c.read(off, &mut all[off as usize..off as usize + 4]);
    }
    for len in [1usize, 2, 4] {
        for off in (0..4096u16).step_by(len) {
            let mut d = [0u8; 4];
            c.read(off, &mut d[..len]);
            assert_eq!(
                d[..len],
                all[off as usize..off as usize + len],
                "{off:#x}/{len}"
            );
        }
    }
    assert_eq!(c.stats().bad_accesses, 0);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]
    /// A dword write equals its four byte writes, and read-only bytes (identity, capability
    /// headers, MSI-X table location) never change, whatever the guest writes at any width.
    #[test]
    fn writes_at_any_width_respect_read_only_bytes(
        writes in proptest::collection::vec((0u16..1024, 0usize..3, proptest::prelude::any::<u32>()), 1..64)
    ) {
        let mut a = full_function();
        let mut b = full_function();
        let ro: Vec<u16> = (0..4)
            .chain(8..0x0c)
            .chain(0x40..0x43)
            .chain(0x48..0x4a)
            .chain(0x4c..0x54)
            .chain(0x100..0x104)
            .collect();
        let before: Vec<u8> = ro.iter().map(|&o| a.get_u8(o)).collect();
        for (off, w, v) in writes {
            let len = [1usize, 2, 4][w];
            let off = off / len as u16 * len as u16;
            let bytes = v.to_le_bytes();
            a.write(off, &bytes[..len]);
            for i in 0..len {
                b.write(off + i as u16, &bytes[i..i + 1]);
            }
        }
        let after: Vec<u8> = ro.iter().map(|&o| a.get_u8(o)).collect();
        proptest::prop_assert_eq!(before, after);
        for off in (0..4096u16).step_by(4) {
            proptest::prop_assert_eq!(a.get_u32(off), b.get_u32(off), "{:#x}", off);
        }
        proptest::prop_assert_eq!(a.capabilities(), b.capabilities());
    }
}

#[test]
fn config_and_msix_state_round_trip() {
    let (sink, msix, mut c, cap) = msix_setup(4);
    program_entry(&msix, 1, 0x51);
    wr(&mut c, cap + 2, 2, 0x8000);
    msix.signal(1).unwrap(); // masked: pending
    wr(&mut c, 0x3c, 1, 0x0b);
    let (cfg_state, msix_state) = (c.state(), msix.state());

    let (sink2, msix2, mut c2, _) = msix_setup(4);
    c2.restore(&cfg_state).unwrap();
    msix2.restore(&msix_state).unwrap();
    assert_eq!(c2.state(), cfg_state);
    assert_eq!(msix2.state(), msix_state);
    assert!(msix2.enabled() && msix2.pending(1));
    assert!(sink2.sent().is_empty());
    unmask(&msix2, 1, false);
    assert_eq!(sink2.vectors(), [0x51]);
    assert!(sink.sent().is_empty());

    assert_eq!(c2.restore(&[0; 16]), Err(PciError::StateSize(16)));
    let (_, small, _, _) = msix_setup(1);
    let mut big = msix_state.clone();
    big.table.push([0; 4]);
    assert!(small.restore(&big).is_err());
}
