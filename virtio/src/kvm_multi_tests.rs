//! Several virtio functions on one root bus, in a real (tiny) KVM guest: the functions go in
//! at the next free slot, the guest finds them, puts their BARs where it likes (and moves one
//! through ECAM), and every doorbell reaches its device through an ioeventfd that followed the
//! BAR — the root bus's events drive one `DoorbellBinding` per function.

use std::sync::{Arc, Mutex};

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_devices::IoBuses;
use vmkit_devices::debug_exit::DebugExit;
use vmkit_devices::kvm_irq::dup_vm_fd;
use vmkit_devices::msi::RecordingMsiSink;
use vmkit_devices::pci::{PciRoot, RequesterId, root::PCI_ECAM_BUS_SIZE};
use vmkit_vcpu::test_utils::TinyGuest;
use vmkit_vcpu::{ExitStats, RunOutcome, StopHandle};

use crate::doorbell::DoorbellBinding;
use crate::notify::{NotifyWorker, register_ioeventfds};
use crate::pci::{NOTIFY_CFG_OFFSET, VIRTIO_PCI_BAR, VirtioPciTransport};
use crate::rng::Rng;
use crate::spec::common_cfg::*;
use crate::spec::{STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK};

const DEBUG_EXIT: u16 = 0xf4;
const ECAM: u64 = 0xb000_0000;
/// Where the guest first puts each function's BAR 0, and where it moves the second one.
const BAR_A: u64 = 0xd000_0000;
const BAR_B: u64 = 0xd010_0000;
const BAR_B_MOVED: u64 = 0xd800_0000;
/// Each function's queue 0 (16 entries) and buffer.
const RINGS: [u64; 2] = [0x30_0000, 0x31_0000];

fn rng_function(mem: GuestMemoryMmap) -> VirtioPciTransport<Rng> {
    let rng = Rng::default();
    let msix = VirtioPciTransport::msix_for(&rng, Arc::new(RecordingMsiSink::default())).unwrap();
    VirtioPciTransport::new(rng, mem, msix).unwrap()
}

/// A 32-bit config write to bus 0 `dev`/function 0 through 0xCF8/0xCFC (`word`: 16 bits).
fn cf8_write(
    a: &mut CodeAssembler,
    dev: u8,
    reg: u32,
    v: u32,
    word: bool,
) -> Result<(), IcedError> {
    a.mov(dx, 0xcf8u32)?;
    a.mov(eax, 0x8000_0000 | u32::from(dev) << 11 | (reg & 0xfc))?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfc + (reg & 3))?;
    a.mov(eax, v)?;
    if word { a.out(dx, ax) } else { a.out(dx, eax) }
}

/// The driver side of virtio 1.2 §3.1.1 for virtio-rng through the common configuration at
/// `rsi`: VERSION_1, queue 0 with 16 entries at `ring` (descriptors, +0x100 available, +0x200
/// used), DRIVER_OK; then descriptor 0 as a 16-byte device-writable buffer at `ring + 0x1000`,
/// published.
fn bring_up(a: &mut CodeAssembler, ring: u64) -> Result<(), IcedError> {
    let at = |off: u64| rsi + off as i32;
    let drv = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
    let fok = drv | STATUS_FEATURES_OK;
    a.mov(
        byte_ptr(at(VIRTIO_PCI_COMMON_STATUS)),
        u32::from(STATUS_ACKNOWLEDGE),
    )?;
    a.mov(byte_ptr(at(VIRTIO_PCI_COMMON_STATUS)), u32::from(drv))?;
    a.mov(dword_ptr(at(VIRTIO_PCI_COMMON_GFSELECT)), 1u32)?;
    a.mov(dword_ptr(at(VIRTIO_PCI_COMMON_GF)), 1u32)?; // VIRTIO_F_VERSION_1
    a.mov(byte_ptr(at(VIRTIO_PCI_COMMON_STATUS)), u32::from(fok))?;
    a.mov(word_ptr(at(VIRTIO_PCI_COMMON_Q_SELECT)), 0u32)?;
    a.mov(word_ptr(at(VIRTIO_PCI_COMMON_Q_SIZE)), 16u32)?;
    for (off, addr) in [
        (VIRTIO_PCI_COMMON_Q_DESCLO, ring),
        (VIRTIO_PCI_COMMON_Q_AVAILLO, ring + 0x100),
        (VIRTIO_PCI_COMMON_Q_USEDLO, ring + 0x200),
    ] {
        a.mov(dword_ptr(at(off)), addr as u32)?;
        a.mov(dword_ptr(at(off + 4)), 0u32)?;
    }
    a.mov(word_ptr(at(VIRTIO_PCI_COMMON_Q_ENABLE)), 1u32)?;
    a.mov(
        byte_ptr(at(VIRTIO_PCI_COMMON_STATUS)),
        u32::from(fok | STATUS_DRIVER_OK),
    )?;
    a.mov(rdi, ring)?;
    a.mov(rax, ring + 0x1000)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(dword_ptr(rdi + 8), 16u32)?;
    a.mov(word_ptr(rdi + 12), 2u32)?; // VRING_DESC_F_WRITE
    a.mov(word_ptr(rdi + 0x104), 0u32)?; // avail.ring[0] = 0
    a.mov(word_ptr(rdi + 0x102), 1u32) // avail.idx = 1
}

/// The guest: count the virtio-rng functions on bus 0 (CF8 scan of devices 0..32), program
/// BAR 0 of devices 0 and 1, bring both up, move device 1's BAR through ECAM, ring both
/// doorbells, wait for both used rings, and report `found * 4 + used0 + 2 * used1`.
fn program(a: &mut CodeAssembler) -> Result<(), IcedError> {
    // Enumerate.
    let mut scan = a.create_label();
    let mut next = a.create_label();
    a.xor(r13d, r13d)?;
    a.xor(esi, esi)?;
    a.set_label(&mut scan)?;
    a.mov(eax, esi)?;
    a.shl(eax, 11)?;
    a.or(eax, 0x8000_0000u32)?;
    a.mov(dx, 0xcf8u32)?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)?;
    a.in_(eax, dx)?;
    a.cmp(eax, 0x1044_1af4)?;
    a.jne(next)?;
    a.inc(r13d)?;
    a.set_label(&mut next)?;
    a.inc(esi)?;
    a.cmp(esi, 32)?;
    a.jb(scan)?;
    // Program, bring up.
    for (dev, bar) in [(0u8, BAR_A), (1, BAR_B)] {
        cf8_write(a, dev, 0x10, bar as u32, false)?;
        cf8_write(a, dev, 0x14, 0, false)?;
        cf8_write(a, dev, 0x04, 0x6, true)?; // memory space + bus master
        a.mov(rsi, bar)?;
        bring_up(a, RINGS[usize::from(dev)])?;
    }
    // Move device 1's BAR through ECAM: decode off, new base, decode on.
    a.mov(rbx, ECAM + (1 << 15))?;
    a.mov(word_ptr(rbx + 0x04), 0x4u32)?;
    a.mov(dword_ptr(rbx + 0x10), BAR_B_MOVED as u32)?;
    a.mov(word_ptr(rbx + 0x04), 0x6u32)?;
    // Ring both doorbells (queue 0 of each).
    a.mov(rsi, BAR_A)?;
    a.mov(word_ptr(rsi + NOTIFY_CFG_OFFSET as i32), 0u32)?;
    a.mov(rsi, BAR_B_MOVED)?;
    a.mov(word_ptr(rsi + NOTIFY_CFG_OFFSET as i32), 0u32)?;
    // Wait for both used rings (bounded).
    let mut again = a.create_label();
    let mut done = a.create_label();
    a.mov(ecx, 2_000_000u32)?;
    a.set_label(&mut again)?;
    a.mov(rdi, RINGS[0] + 0x202)?;
    a.movzx(eax, word_ptr(rdi))?;
    a.mov(rdi, RINGS[1] + 0x202)?;
    a.movzx(ebx, word_ptr(rdi))?;
    a.lea(r8d, dword_ptr(rax + rbx * 2))?;
    a.cmp(r8d, 3)?;
    a.je(done)?;
    a.pause()?;
    a.dec(ecx)?;
    a.jnz(again)?;
    a.set_label(&mut done)?;
    a.lea(eax, dword_ptr(r8 + r13 * 4))?;
    a.out(DEBUG_EXIT as i32, al)
}

#[test]
fn kvm_two_virtio_functions_on_one_machine() {
    let mut g = TinyGuest::new(program).unwrap();
    let buses = Arc::new(IoBuses::default());
    let root = PciRoot::new(&buses);
    buses.pio.insert(0xcf8, 8, "pci", root.config_io()).unwrap();
    buses
        .mmio
        .insert(ECAM, PCI_ECAM_BUS_SIZE, "ecam", root.ecam())
        .unwrap();
    let stop = StopHandle::new();
    buses
        .pio
        .insert(
            DEBUG_EXIT as u64,
            1,
            "exit",
            Arc::new(DebugExit::new(stop.clone())),
        )
        .unwrap();
    let mut functions = Vec::new();
    for (name, bar) in [("rng-a", BAR_A), ("rng-b", BAR_B)] {
        let f = Arc::new(Mutex::new(rng_function(g.mem.clone())));
        let dev = root.add_next(name, f.clone()).unwrap();
        let rid = RequesterId::new(0, dev, 0).unwrap();
        // The doorbells start where the guest will first put the BAR; the binding, an
        // observer of the root bus, moves them with it.
        let fds = register_ioeventfds(g.vm.fd(), &f.lock().unwrap().notify_addresses(bar)).unwrap();
        let binding = Arc::new(
            DoorbellBinding::new(dup_vm_fd(&g.vm).unwrap(), rid, VIRTIO_PCI_BAR, &fds, bar)
                .unwrap(),
        );
        root.observe(binding.clone());
        let worker = NotifyWorker::spawn(f.clone(), fds).unwrap();
        functions.push((dev, f, binding, worker));
    }
    assert_eq!(
        functions.iter().map(|f| f.0).collect::<Vec<_>>(),
        [0, 1],
        "next free slots"
    );
    let mut stats = ExitStats::default();
    let r = vmkit_vcpu::run_until_exit(&mut g.vcpu, &*buses, &stop, &mut stats).unwrap();
    let mut report = Vec::new();
    for (dev, f, binding, worker) in functions {
        drop(worker);
        let t = f.lock().unwrap();
        let m = t.metrics();
        report.push((
            dev,
            m.notifies,
            m.trapped_notifies,
            binding.base(),
            binding.failures(),
        ));
        assert_eq!(t.device().metrics().bytes, 16, "device {dev}");
    }
    assert_eq!(r, RunOutcome::Stopped(2 * 4 + 3), "{report:?}");
    assert_eq!(
        report,
        [(0, 1, 0, Some(BAR_A), 0), (1, 1, 0, Some(BAR_B_MOVED), 0)],
        "(device, notifies, trapped, doorbell base, failures)"
    );
    for ring in RINGS {
        let used_len: u32 = g.mem.read_obj(GuestAddress(ring + 0x208)).unwrap();
        assert_eq!(used_len, 16);
    }
}
