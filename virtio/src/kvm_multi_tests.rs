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
use crate::guest_driver::{
    GuestQueue, Width, pci_cfg_write, publish, virtio_pci_bring_up, write_descriptor,
};
use crate::notify::{NotifyWorker, register_ioeventfds};
use crate::pci::{NOTIFY_CFG_OFFSET, VIRTIO_PCI_BAR, VirtioPciTransport};
use crate::rng::Rng;
use crate::spec::{VIRTIO_F_VERSION_1, VRING_DESC_F_WRITE};
use vmkit_devices::pci::{command, reg};

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

/// Queue 0 of function `dev`: 16 entries at `RINGS[dev]` (descriptors, +0x100 available,
/// +0x200 used), its buffer at +0x1000.
fn queue_of(dev: usize) -> GuestQueue {
    let ring = RINGS[dev];
    GuestQueue::at(0, 16, ring, ring + 0x100, ring + 0x200)
}

/// Bring virtio-rng up through the common configuration at `rsi` (VERSION_1, queue 0) and
/// publish descriptor 0, a 16-byte device-writable buffer.
fn bring_up(a: &mut CodeAssembler, dev: usize) -> Result<(), IcedError> {
    let q = queue_of(dev);
    virtio_pci_bring_up(a, rsi, 1 << VIRTIO_F_VERSION_1, &[q])?;
    write_descriptor(
        a,
        q.desc,
        0,
        q.desc + 0x1000,
        16,
        VRING_DESC_F_WRITE as u16,
        0,
    )?;
    publish(a, q, 0, 0)
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
        let devfn = dev << 3;
        pci_cfg_write(a, 0, devfn, reg::BAR0, bar as u32, Width::Dword)?;
        pci_cfg_write(a, 0, devfn, reg::BAR0 + 4, 0, Width::Dword)?;
        let enable = u32::from(command::MEMORY_SPACE | command::BUS_MASTER);
        pci_cfg_write(a, 0, devfn, reg::COMMAND, enable, Width::Word)?;
        a.mov(rsi, bar)?;
        bring_up(a, usize::from(dev))?;
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
