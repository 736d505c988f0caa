//! Tests against the real /dev/kvm with tiny guests (names start with `kvm_`): a guest
//! enumerates the PCI bus and finds virtio-rng, a guest reaches its BAR 0 only through the PCI
//! configuration access capability, a guest drives virtio-rng over virtio-pci
//! with an MSI-X interrupt (doorbell through ioeventfd, interrupt through irqfd), and one with
//! MSI-X disabled takes INTx through the I/O APIC.

use std::io::Write;
use std::sync::{Arc, Mutex};

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_devices::debug_exit::DebugExit;
use vmkit_devices::interrupt::NoInterrupt;
use vmkit_devices::kvm_irq::{KvmIrqRouter, dup_vm_fd, enable_split_irqchip};
use vmkit_devices::msi::RecordingMsiSink;
use vmkit_devices::pci::{PciFunction, PciRoot, cap_id};
use vmkit_devices::serial::Serial;
use vmkit_devices::{IoBuses, IrqLine};
use vmkit_vcpu::test_utils::{CODE_ADDR, DATA_ADDR, HarnessError, TinyGuest};
use vmkit_vcpu::{ExitStats, KvmVcpu, KvmVm, RunOutcome, StopHandle};

use crate::doorbell::DoorbellBinding;
use crate::notify::{NotifyWorker, register_ioeventfds};
use crate::pci::{ISR_CFG_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_CFG_OFFSET, VirtioPciTransport};
use crate::rng::Rng;

const SERIAL: u16 = 0x3f8;
const DEBUG_EXIT: u16 = 0xf4;
const HANDLER_ADDR: u64 = CODE_ADDR + 0x1000;
const COUNTER: u64 = DATA_ADDR;
const LAPIC_BASE: u64 = 0xfee0_0000;
/// Virtqueue 0 of the guest driver (16 entries) and its buffer.
const DESC: u64 = 0x30_0000;
const AVAIL: u64 = DESC + 0x100;
const USED: u64 = DESC + 0x200;
const BUF: u64 = 0x30_1000;

#[derive(Clone, Default)]
struct Out(Arc<Mutex<Vec<u8>>>);
impl Write for Out {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Print a literal through the serial port.
/// Run `vcpu` until the guest writes the debug-exit port, with a 16550 at [`SERIAL`] whose
/// output goes to `out`; the run's outcome and the output as text.
fn run_logged(vcpu: &mut KvmVcpu, buses: &IoBuses, out: &Out) -> (RunOutcome, String) {
    let serial = Serial::new(Arc::new(NoInterrupt), out.clone());
    buses
        .pio
        .insert(SERIAL as u64, 8, "com1", Arc::new(serial))
        .unwrap();
    let stop = stop_on_debug_exit(buses);
    let mut stats = ExitStats::default();
    let r = vmkit_vcpu::run_until_exit(vcpu, buses, &stop, &mut stats).unwrap();
    (r, String::from_utf8(out.0.lock().unwrap().clone()).unwrap())
}

/// Put the debug-exit device on its port; the handle it stops.
fn stop_on_debug_exit(buses: &IoBuses) -> StopHandle {
    let stop = StopHandle::new();
    let exit = Arc::new(DebugExit::new(stop.clone()));
    buses
        .pio
        .insert(DEBUG_EXIT as u64, 1, "exit", exit)
        .unwrap();
    stop
}

fn puts(a: &mut CodeAssembler, s: &str) -> Result<(), IcedError> {
    a.mov(dx, SERIAL as u32)?;
    for c in s.bytes() {
        a.mov(al, c as u32)?;
        a.out(dx, al)?;
    }
    Ok(())
}

/// `hex`: print the low `r9d` nibbles of `r8d` in hex (clobbers eax, ecx, edx, r8, r9).
fn hex_routine(a: &mut CodeAssembler, label: &mut CodeLabel) -> Result<(), IcedError> {
    let mut lp = a.create_label();
    let mut digit = a.create_label();
    a.set_label(label)?;
    a.mov(ecx, 8u32)?;
    a.sub(ecx, r9d)?;
    a.shl(ecx, 2)?;
    a.shl(r8d, cl)?;
    a.mov(dx, SERIAL as u32)?;
    a.set_label(&mut lp)?;
    a.rol(r8d, 4)?;
    a.mov(eax, r8d)?;
    a.and(eax, 0xfu32)?;
    a.cmp(eax, 10u32)?;
    a.jb(digit)?;
    a.add(eax, (b'a' - 10 - b'0') as u32)?;
    a.set_label(&mut digit)?;
    a.add(eax, b'0' as u32)?;
    a.out(dx, al)?;
    a.dec(r9d)?;
    a.jnz(lp)?;
    a.ret()
}

/// Point 0xCF8 at `reg` of the device number in `esi`.
fn cfg_select(a: &mut CodeAssembler, reg: u32) -> Result<(), IcedError> {
    a.mov(eax, esi)?;
    a.shl(eax, 11)?;
    a.or(eax, 0x8000_0000u32 | reg)?;
    a.mov(dx, 0xcf8u32)?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)
}

fn rng_function(
    mem: GuestMemoryMmap,
    sink: Arc<dyn vmkit_devices::msi::MsiSink>,
) -> VirtioPciTransport<Rng> {
    let rng = Rng::default();
    let msix = VirtioPciTransport::msix_for(&rng, sink).unwrap();
    VirtioPciTransport::new(rng, mem, msix).unwrap()
}

/// A guest scans bus 0 through 0xCF8/0xCFC, finds the virtio-rng function (1af4:1044) and
/// sizes its 64-bit BAR 0, printing `dev id bar0 bar1` lines on the serial port.
#[test]
fn kvm_pci_enumeration() {
    let mut g = TinyGuest::new(|a| {
        let mut hex = a.create_label();
        let mut scan = a.create_label();
        let mut next = a.create_label();
        let mut start = a.create_label();
        a.jmp(start)?;
        hex_routine(a, &mut hex)?;
        a.set_label(&mut start)?;
        a.xor(esi, esi)?;
        a.set_label(&mut scan)?;
        cfg_select(a, 0)?;
        a.in_(eax, dx)?;
        a.cmp(eax, -1)?;
        a.je(next)?;
        a.mov(r12d, eax)?;
        a.mov(r8d, esi)?;
        a.mov(r9d, 2u32)?;
        a.call(hex)?;
        puts(a, " ")?;
        a.mov(r8d, r12d)?;
        a.mov(r9d, 8u32)?;
        a.call(hex)?;
        for reg in [0x10, 0x14] {
            // BAR sizing: write all-ones, read back the size mask.
            cfg_select(a, reg)?;
            a.mov(eax, 0xffff_ffffu32)?;
            a.out(dx, eax)?;
            a.in_(eax, dx)?;
            a.mov(r8d, eax)?;
            puts(a, " ")?;
            a.mov(r9d, 8u32)?;
            a.call(hex)?;
        }
        puts(a, "\n")?;
        a.set_label(&mut next)?;
        a.inc(esi)?;
        a.cmp(esi, 32)?;
        a.jb(scan)?;
        a.mov(al, 0u32)?;
        a.out(DEBUG_EXIT as i32, al)
    })
    .unwrap();
    let buses = Arc::new(IoBuses::default());
    let root = PciRoot::new(&buses);
    let f = rng_function(g.mem.clone(), Arc::new(RecordingMsiSink::default()));
    root.add(3, 0, "virtio-rng", Arc::new(Mutex::new(f)))
        .unwrap();
    buses.pio.insert(0xcf8, 8, "pci", root.config_io()).unwrap();
    let out = Out::default();
    let (r, text) = run_logged(&mut g.vcpu, &buses, &out);
    assert_eq!(r, RunOutcome::Stopped(0), "{text}");
    // 32 KiB 64-bit memory BAR: low dword 0xffff8000 | type 0b100, high dword all ones.
    assert_eq!(text, "03 10441af4 ffff8004 ffffffff\n");
}

/// Point 0xCF8 at register `r13d + reg` of the device number in `esi`.
fn cfg_select_at(a: &mut CodeAssembler, reg: u32) -> Result<(), IcedError> {
    a.mov(eax, esi)?;
    a.shl(eax, 11)?;
    a.or(eax, 0x8000_0000u32)?;
    a.add(eax, r13d)?;
    a.add(eax, reg)?;
    a.mov(dx, 0xcf8u32)?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)
}

/// A guest reaches virtio-rng's BAR 0 only through the `VIRTIO_PCI_CAP_PCI_CFG` window
/// (virtio 1.2 §4.1.4.9) over 0xCF8/0xCFC, BAR 0 never programmed: it walks the capability
/// list to the capability (cfg_type 5), reads `num_queues` (cap.length 2, cap.offset 0x12),
/// writes ACKNOWLEDGE to `device_status` with a byte store to `pci_cfg_data` (cap.length 1,
/// cap.offset 0x14) and reads it back, printing `cap num_queues status`.
#[test]
fn kvm_pci_cfg_window_without_a_bar() {
    let mut g = TinyGuest::new(|a| {
        let mut hex = a.create_label();
        let mut walk = a.create_label();
        let mut found = a.create_label();
        let mut start = a.create_label();
        a.jmp(start)?;
        hex_routine(a, &mut hex)?;
        a.set_label(&mut start)?;
        a.mov(esi, 3u32)?; // device 3
        a.xor(r13d, r13d)?;
        cfg_select_at(a, 0x34)?;
        a.in_(al, dx)?;
        a.movzx(r13d, al)?;
        a.set_label(&mut walk)?;
        cfg_select_at(a, 0)?;
        a.in_(eax, dx)?;
        a.mov(ebx, eax)?;
        a.and(ebx, 0xff00_00ffu32)?;
        a.cmp(ebx, 0x0500_0009u32)?; // cap_vndr 0x09, cfg_type VIRTIO_PCI_CAP_PCI_CFG
        a.je(found)?;
        a.shr(eax, 8)?;
        a.movzx(r13d, al)?;
        a.jmp(walk)?;
        a.set_label(&mut found)?;
        a.mov(r8d, r13d)?;
        a.mov(r9d, 2u32)?;
        a.call(hex)?;
        // cap.bar is 0 already; cap.length = 2, cap.offset = num_queues.
        for (reg, v) in [(12, 2u32), (8, 0x12)] {
            cfg_select_at(a, reg)?;
            a.mov(eax, v)?;
            a.out(dx, eax)?;
        }
        cfg_select_at(a, 16)?;
        a.in_(eax, dx)?;
        a.mov(r8d, eax)?;
        puts(a, " ")?;
        a.mov(r9d, 4u32)?;
        a.call(hex)?;
        // cap.length = 1, cap.offset = device_status; store ACKNOWLEDGE, read it back.
        for (reg, v) in [(12, 1u32), (8, 0x14)] {
            cfg_select_at(a, reg)?;
            a.mov(eax, v)?;
            a.out(dx, eax)?;
        }
        cfg_select_at(a, 16)?;
        a.mov(al, 1u32)?;
        a.out(dx, al)?;
        a.in_(al, dx)?;
        a.movzx(r8d, al)?;
        puts(a, " ")?;
        a.mov(r9d, 2u32)?;
        a.call(hex)?;
        puts(a, "\n")?;
        a.mov(al, 0u32)?;
        a.out(DEBUG_EXIT as i32, al)
    })
    .unwrap();
    let buses = Arc::new(IoBuses::default());
    let root = PciRoot::new(&buses);
    let f = Arc::new(Mutex::new(rng_function(
        g.mem.clone(),
        Arc::new(RecordingMsiSink::default()),
    )));
    root.add(3, 0, "virtio-rng", f.clone()).unwrap();
    buses.pio.insert(0xcf8, 8, "pci", root.config_io()).unwrap();
    let out = Out::default();
    let (r, text) = run_logged(&mut g.vcpu, &buses, &out);
    assert_eq!(r, RunOutcome::Stopped(0), "{text}");
    let f = f.lock().unwrap();
    let cap = f
        .config_space()
        .capabilities()
        .iter()
        .filter(|c| c.0 == cap_id::VENDOR_SPECIFIC)
        .map(|c| c.1)
        .nth(4)
        .unwrap();
    assert_eq!(text, format!("{cap:02x} 0001 01\n"));
    assert_eq!(f.core().status(), crate::spec::STATUS_ACKNOWLEDGE);
    assert!(root.mapped_bars(3, 0).is_empty());
    assert_eq!(f.metrics().bad_register_accesses, 0);
}

/// A VM with the split irqchip (in-kernel LAPIC, enabled before the vCPU exists), `main` at
/// `CODE_ADDR`, `handler` behind IDT vector `vector`.
fn irq_guest(
    main: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    handler: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    vector: u8,
) -> Result<(KvmVm, KvmVcpu, GuestMemoryMmap), HarnessError> {
    let mut g = TinyGuest::with_vm_setup(main, |vm| Ok(enable_split_irqchip(vm)?))?;
    g.load(HANDLER_ADDR, handler)?;
    g.install_idt(&[(vector, HANDLER_ADDR)])?;
    Ok((g.vm, g.vcpu, g.mem))
}

fn msix_cap(f: &impl PciFunction) -> u16 {
    let caps = f.config_space().capabilities();
    caps.into_iter()
        .find_map(|(id, at)| (id == cap_id::MSIX).then_some(at))
        .expect("no MSI-X capability")
}

/// The guest programs BAR 0, enables MSI-X and points queue 0 at vector 1 (IDT vector 0x41),
/// brings virtio-rng up through the common configuration, posts a 16-byte buffer and rings
/// the doorbell — which KVM turns into an ioeventfd signal (no exit). The notify worker runs
/// the device, whose used-ring interrupt goes out through the vector's irqfd; the guest's IDT
/// handler counts it and the guest reports the count through the debug-exit port.
#[test]
fn kvm_msix_reaches_guest() {
    msix_rng_guest(None);
}

/// As [`kvm_msix_reaches_guest`], but the guest moves BAR 0 (decode off, new base, decode on)
/// after setting the device up and rings the doorbell at the new address: the transport's
/// [`DoorbellBinding`](crate::notify::DoorbellBinding) moves the ioeventfd with it, so the kick
/// still bypasses userspace.
#[test]
fn kvm_doorbell_ioeventfd_follows_bar_relocation() {
    msix_rng_guest(Some(0xd100_0000));
}

/// The driver side of virtio 1.2 §3.1.1 for virtio-rng, through the common configuration at
/// `rsi`: VERSION_1, queue 0 with 16 entries at DESC/AVAIL/USED (on MSI-X vector
/// `msix_vector` when given), DRIVER_OK; then descriptor 0 as a 16-byte device-writable buffer
/// at BUF (not yet published).
fn bring_up_rng_queue(a: &mut CodeAssembler, msix_vector: Option<u16>) -> Result<(), IcedError> {
    use crate::guest_driver::{GuestQueue, virtio_pci_bring_up, write_descriptor};
    let mut q = GuestQueue::at(0, 16, DESC, AVAIL, USED);
    q.msix_vector = msix_vector;
    virtio_pci_bring_up(a, rsi, 1 << crate::spec::VIRTIO_F_VERSION_1, &[q])?;
    write_descriptor(
        a,
        DESC,
        0,
        BUF,
        16,
        crate::spec::VRING_DESC_F_WRITE as u16,
        0,
    )
}

fn msix_rng_guest(relocate_to: Option<u64>) {
    const VECTOR: u32 = 0x41;
    const BAR: u64 = 0xd000_0000;
    const DEV: u32 = 1;
    // The MSI-X capability offset is a property of the transport; read it off a twin.
    let cap = {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        msix_cap(&rng_function(mem, Arc::new(RecordingMsiSink::default())))
    } as u32;
    let cfg_write =
        |a: &mut CodeAssembler, reg: u32, v: u32, word: bool| -> Result<(), IcedError> {
            use crate::guest_driver::{Width, pci_cfg_write};
            let width = if word { Width::Word } else { Width::Dword };
            pci_cfg_write(a, 0, (DEV as u8) << 3, reg as u16, v, width)
        };
    let (vm, mut vcpu, mem) = irq_guest(
        |a| {
            a.mov(rbx, LAPIC_BASE)?;
            a.mov(dword_ptr(rbx + 0xf0), 0x1ffu32)?; // LAPIC SVR: software enable
            cfg_write(a, 0x10, BAR as u32, false)?;
            cfg_write(a, 0x14, 0, false)?;
            cfg_write(a, 0x04, 0x6, true)?; // memory space + bus master
            cfg_write(a, cap + 2, 0x8000, true)?; // MSI-X enable
            a.mov(rsi, BAR)?;
            crate::guest_driver::msix_entry(a, rsi, MSIX_TABLE_OFFSET, 1, LAPIC_BASE, VECTOR)?;
            bring_up_rng_queue(a, Some(1))?;
            // Publish descriptor 0.
            a.mov(rdi, AVAIL)?;
            a.mov(word_ptr(rdi + 4), 0u32)?;
            a.mov(word_ptr(rdi + 2), 1u32)?;
            if let Some(to) = relocate_to {
                cfg_write(a, 0x04, 0x4, true)?; // memory decode off (bus master stays on)
                cfg_write(a, 0x10, to as u32, false)?;
                cfg_write(a, 0x04, 0x6, true)?; // decode on at the new base
                a.mov(rsi, to)?;
            }
            a.mov(rdi, COUNTER)?;
            a.sti()?;
            a.mov(word_ptr(rsi + NOTIFY_CFG_OFFSET as i32), 0u32)?; // doorbell, queue 0
            let mut again = a.create_label();
            let mut done = a.create_label();
            a.mov(ecx, 200_000u32)?;
            a.set_label(&mut again)?;
            a.cmp(dword_ptr(rdi), 1)?;
            a.jae(done)?;
            a.pause()?;
            a.dec(ecx)?;
            a.jnz(again)?;
            a.set_label(&mut done)?;
            a.mov(eax, dword_ptr(rdi))?;
            a.out(DEBUG_EXIT as i32, al)
        },
        |a| {
            a.push(rax)?;
            a.mov(rax, COUNTER)?;
            a.inc(dword_ptr(rax))?;
            a.mov(rax, LAPIC_BASE)?;
            a.mov(dword_ptr(rax + 0xb0), 0u32)?; // EOI
            a.pop(rax)?;
            a.iretq()
        },
        VECTOR as u8,
    )
    .unwrap();

    let router = KvmIrqRouter::new(&vm).unwrap();
    // irqfds go on the MSI-X vectors before the transport takes its vector handles.
    let msix = VirtioPciTransport::<Rng>::msix_for(&Rng::default(), router.clone()).unwrap();
    router.attach_msix(&msix).unwrap();
    let f = VirtioPciTransport::new(Rng::default(), mem.clone(), msix.clone()).unwrap();
    let f = Arc::new(Mutex::new(f));
    let buses = Arc::new(IoBuses::default());
    let root = PciRoot::new(&buses);
    root.add(DEV as u8, 0, "virtio-rng", f.clone()).unwrap();
    buses.pio.insert(0xcf8, 8, "pci", root.config_io()).unwrap();
    let stop = stop_on_debug_exit(&buses);
    // The guest will put BAR 0 at BAR: register the doorbell ioeventfd there.
    let doorbells = f.lock().unwrap().notify_addresses(BAR);
    let fds = register_ioeventfds(vm.fd(), &doorbells).unwrap();
    // The binding observes the root bus: a BAR move is its event.
    let rid = vmkit_devices::pci::RequesterId::new(0, DEV as u8, 0).unwrap();
    let binding = Arc::new(
        DoorbellBinding::new(
            dup_vm_fd(&vm).unwrap(),
            rid,
            crate::pci::VIRTIO_PCI_BAR,
            &fds,
            BAR,
        )
        .unwrap(),
    );
    root.observe(binding.clone());
    let worker = NotifyWorker::spawn(f.clone(), fds).unwrap();

    let mut stats = ExitStats::default();
    let r = vmkit_vcpu::run_until_exit(&mut vcpu, &*buses, &stop, &mut stats).unwrap();
    drop(worker);
    let t = f.lock().unwrap();
    let m = t.metrics();
    assert_eq!(r, RunOutcome::Stopped(1), "{m:?} {:?}", msix.stats());
    assert_eq!((m.notifies, m.trapped_notifies), (1, 0), "{m:?}");
    let want = relocate_to.unwrap_or(BAR);
    assert_eq!((binding.base(), binding.failures()), (Some(want), 0));
    assert_eq!(m.bad_register_accesses, 0);
    assert_eq!(msix.stats().delivered, 1);
    assert_eq!(t.device().metrics().bytes, 16);
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    let used_len: u32 = mem.read_obj(GuestAddress(USED + 8)).unwrap();
    assert_eq!((used_idx, used_len), (1, 16));
}

/// The plain-exit fallback end to end: a guest drives virtio-rng over virtio-mmio, its
/// `QueueNotify` write traps to the transport (no ioeventfd), the device fills the buffer and
/// raises its line; the guest polls the used ring, reads `InterruptStatus` and reports both.
#[test]
fn kvm_mmio_trapped_notify() {
    use vmkit_devices::interrupt::RecordingInterrupt;

    use crate::mmio::{MMIO_WINDOW_SIZE, MmioTransport};
    const BASE: u64 = 0xd000_0000;
    let mut g = TinyGuest::new(|a| {
        a.mov(rsi, BASE)?;
        let w = |a: &mut CodeAssembler, off: i32, v: u32| a.mov(dword_ptr(rsi + off), v);
        w(a, 0x70, 1)?; // ACKNOWLEDGE
        w(a, 0x70, 3)?; // DRIVER
        w(a, 0x24, 1)?; // DriverFeaturesSel = 1
        w(a, 0x20, 1)?; // VIRTIO_F_VERSION_1
        w(a, 0x70, 0xb)?; // FEATURES_OK
        w(a, 0x30, 0)?; // QueueSel
        w(a, 0x38, 16)?; // QueueNum
        for (off, addr) in [(0x80, DESC), (0x90, AVAIL), (0xa0, USED)] {
            w(a, off, addr as u32)?;
            w(a, off + 4, 0)?;
        }
        w(a, 0x44, 1)?; // QueueReady
        w(a, 0x70, 0xf)?; // DRIVER_OK
        a.mov(rdi, DESC)?;
        a.mov(rax, BUF)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.mov(dword_ptr(rdi + 8), 16u32)?;
        a.mov(word_ptr(rdi + 12), 2u32)?; // VRING_DESC_F_WRITE
        a.mov(rdi, AVAIL)?;
        a.mov(word_ptr(rdi + 4), 0u32)?;
        a.mov(word_ptr(rdi + 2), 1u32)?;
        w(a, 0x50, 0)?; // QueueNotify: traps
        let mut again = a.create_label();
        let mut done = a.create_label();
        a.mov(rdi, USED)?;
        a.mov(ecx, 10_000u32)?;
        a.set_label(&mut again)?;
        a.cmp(word_ptr(rdi + 2), 1)?;
        a.jae(done)?;
        a.dec(ecx)?;
        a.jnz(again)?;
        a.set_label(&mut done)?;
        a.mov(eax, dword_ptr(rsi + 0x60))?; // InterruptStatus
        a.out(0x84, al)?;
        a.mov(dword_ptr(rsi + 0x64), eax)?; // InterruptACK
        a.mov(eax, dword_ptr(rdi + 8))?; // used[0].len
        a.out(DEBUG_EXIT as i32, al)
    })
    .unwrap();
    let irq = Arc::new(RecordingInterrupt::default());
    let t = Arc::new(Mutex::new(MmioTransport::new(
        Rng::default(),
        g.mem.clone(),
        irq.clone(),
    )));
    let buses = Arc::new(IoBuses::default());
    let stop = stop_on_debug_exit(&buses);
    let log = Out::default();
    buses
        .mmio
        .insert(BASE, MMIO_WINDOW_SIZE, "virtio-rng", t.clone())
        .unwrap();
    buses
        .pio
        .insert(
            0x84,
            1,
            "report",
            Arc::new(Serial::new(Arc::new(NoInterrupt), log.clone())),
        )
        .unwrap();
    let mut stats = ExitStats::default();
    let r = vmkit_vcpu::run_until_exit(&mut g.vcpu, &*buses, &stop, &mut stats).unwrap();
    let t = t.lock().unwrap();
    assert_eq!(r, RunOutcome::Stopped(16), "{:?}", t.metrics());
    assert_eq!(
        *log.0.lock().unwrap(),
        [crate::spec::VIRTIO_MMIO_INT_VRING as u8]
    );
    assert_eq!((t.metrics().notifies, t.metrics().trapped_notifies), (1, 1));
    assert_eq!(t.interrupt_status(), 0, "acknowledged by the guest");
    assert_eq!(irq.count(), 1);
}

/// A level line that forwards to an I/O APIC pin and records its edges.
struct TappedLine {
    pin: vmkit_devices::ioapic::IoapicLine,
    tap: vmkit_devices::interrupt::RecordingIrqLine,
}

impl IrqLine for TappedLine {
    fn set_level(&self, asserted: bool) {
        self.tap.set_level(asserted);
        IrqLine::set_level(&self.pin, asserted);
    }
}

/// virtio-rng over virtio-pci with MSI-X left disabled: INTA# wired to I/O APIC pin 10
/// (level, vector 0x31) with the split irqchip. The guest programs the pin, writes the
/// Interrupt Line register and prints Interrupt Pin/Line (`010a`), brings the device up
/// without MSI-X vectors and kicks it twice (trapped doorbell), waiting after each kick for its
/// handler to have seen the interrupt. The handler reads the ISR byte (acknowledging the
/// device: the line drops), prints it, counts and writes the LAPIC EOI.
///
/// The host asserts one line assertion and one acknowledgement per notification, and the
/// delivery accounting of [`intx_accounting`]: usually one delivery per notification (text
/// `010a 11`). vmkit-devices' `kvm_ioapic_level_interrupt` measured this machine's PVM reporting
/// a level vector's EOI when it injects it; should that come before the handler's ISR read, the
/// EOI finds the line high and redelivers, and that redelivery either finds ISR 0 (a `0` in the
/// text) or, when the guest's next notification comes while it is still pending, serves that one.
#[test]
fn kvm_intx_interrupt_through_the_ioapic() {
    use vmkit_devices::ioapic::{IOAPIC_DEFAULT_BASE, IOAPIC_MMIO_SIZE, Ioapic, IoapicLine};
    use vmkit_vcpu::Exit;

    const PIN: u32 = 10;
    const VECTOR: u32 = 0x31;
    const BAR: u64 = 0xd000_0000;
    const DEV: u32 = 1;
    const ACKED: u64 = COUNTER + 4;
    let cfg_write = |a: &mut CodeAssembler, reg: u32, v: u32, len: u32| {
        a.mov(dx, 0xcf8u32)?;
        a.mov(eax, 0x8000_0000 | DEV << 11 | (reg & 0xfc))?;
        a.out(dx, eax)?;
        a.mov(dx, 0xcfc + (reg & 3))?;
        a.mov(eax, v)?;
        match len {
            1 => a.out(dx, al),
            2 => a.out(dx, ax),
            _ => a.out(dx, eax),
        }
    };
    // Wait (boundedly) until the handler has acknowledged `n` interrupts.
    let wait_acked = |a: &mut CodeAssembler, n: i32| -> Result<(), IcedError> {
        let mut again = a.create_label();
        let mut done = a.create_label();
        a.mov(rdi, ACKED)?;
        a.mov(ecx, 200_000u32)?;
        a.set_label(&mut again)?;
        a.cmp(dword_ptr(rdi), n)?;
        a.jae(done)?;
        a.pause()?;
        a.dec(ecx)?;
        a.jnz(again)?;
        a.set_label(&mut done)
    };
    let (vm, mut vcpu, mem) = irq_guest(
        |a| {
            let mut hex = a.create_label();
            let mut start = a.create_label();
            a.jmp(start)?;
            hex_routine(a, &mut hex)?;
            a.set_label(&mut start)?;
            a.mov(rbx, LAPIC_BASE)?;
            a.mov(dword_ptr(rbx + 0xf0), 0x1ffu32)?; // LAPIC SVR: software enable
            a.mov(rbx, IOAPIC_DEFAULT_BASE)?;
            a.mov(dword_ptr(rbx), 0x10 + 2 * PIN)?; // IOREGSEL: entry PIN, low dword
            a.mov(dword_ptr(rbx + 0x10), 0x8000 | VECTOR)?; // IOWIN: level, fixed, unmasked
            cfg_write(a, 0x10, BAR as u32, 4)?;
            cfg_write(a, 0x14, 0, 4)?;
            cfg_write(a, 0x04, 0x6, 2)?; // memory space + bus master, INTx enabled
            cfg_write(a, 0x3c, PIN, 1)?; // Interrupt Line, as firmware records the routing
            // Interrupt Pin and Line (the dword at 0x3c, low 16 bits).
            a.mov(dx, 0xcf8u32)?;
            a.mov(eax, 0x8000_0000 | DEV << 11 | 0x3c)?;
            a.out(dx, eax)?;
            a.mov(dx, 0xcfcu32)?;
            a.in_(eax, dx)?;
            a.mov(r8d, eax)?;
            a.mov(r9d, 4u32)?;
            a.call(hex)?;
            puts(a, " ")?;
            // No MSI-X vectors: notifications take INTx. Descriptor 0 is offered twice.
            a.mov(rsi, BAR)?;
            bring_up_rng_queue(a, None)?;
            a.sti()?;
            for n in 1..=2u32 {
                a.mov(rdi, AVAIL)?;
                a.mov(word_ptr(rdi + 2 + 2 * n as i32), 0u32)?; // ring[n - 1] = 0
                a.mov(word_ptr(rdi + 2), n)?; // idx
                a.mov(word_ptr(rsi + NOTIFY_CFG_OFFSET as i32), 0u32)?; // doorbell: traps
                wait_acked(a, n as i32)?;
            }
            // Give a stray delivery time to show, then report the handler runs.
            let mut spin = a.create_label();
            a.mov(ecx, 5_000u32)?;
            a.set_label(&mut spin)?;
            a.pause()?;
            a.dec(ecx)?;
            a.jnz(spin)?;
            puts(a, "\n")?;
            a.mov(rdi, COUNTER)?;
            a.mov(eax, dword_ptr(rdi))?;
            a.out(DEBUG_EXIT as i32, al)
        },
        |a| {
            let mut spurious = a.create_label();
            a.push(rax)?;
            a.push(rbx)?;
            a.push(rdx)?;
            a.mov(rbx, BAR)?;
            a.movzx(eax, byte_ptr(rbx + ISR_CFG_OFFSET as i32))?; // read clears, line drops
            a.mov(rbx, COUNTER)?;
            a.inc(dword_ptr(rbx))?;
            a.test(al, al)?;
            a.jz(spurious)?;
            a.inc(dword_ptr(rbx + 4))?; // ACKED
            a.set_label(&mut spurious)?;
            a.add(al, b'0' as u32)?;
            a.mov(dx, SERIAL as u32)?;
            a.out(dx, al)?;
            a.mov(rbx, LAPIC_BASE)?;
            a.mov(dword_ptr(rbx + 0xb0), 0u32)?; // EOI
            a.pop(rdx)?;
            a.pop(rbx)?;
            a.pop(rax)?;
            a.iretq()
        },
        VECTOR as u8,
    )
    .unwrap();

    let router = KvmIrqRouter::new(&vm).unwrap();
    let ioapic = Arc::new(Mutex::new(Ioapic::new(router.clone())));
    let line = Arc::new(TappedLine {
        pin: IoapicLine::new(ioapic.clone(), PIN as u8).unwrap(),
        tap: Default::default(),
    });
    let msix = VirtioPciTransport::<Rng>::msix_for(&Rng::default(), router).unwrap();
    let f = VirtioPciTransport::new(Rng::default(), mem.clone(), msix.clone())
        .unwrap()
        .with_intx(line.clone());
    let f = Arc::new(Mutex::new(f));
    let buses = Arc::new(IoBuses::default());
    let root = PciRoot::new(&buses);
    root.add(DEV as u8, 0, "virtio-rng", f.clone()).unwrap();
    buses.pio.insert(0xcf8, 8, "pci", root.config_io()).unwrap();
    buses
        .mmio
        .insert(
            IOAPIC_DEFAULT_BASE,
            IOAPIC_MMIO_SIZE,
            "ioapic",
            ioapic.clone(),
        )
        .unwrap();
    let out = Out::default();
    let serial = Serial::new(Arc::new(NoInterrupt), out.clone());
    buses
        .pio
        .insert(SERIAL as u64, 8, "com1", Arc::new(serial))
        .unwrap();
    let stop = stop_on_debug_exit(&buses);

    let mut stats = ExitStats::default();
    // Per EOI exit: (line asserted, deliveries before, deliveries after).
    let mut eois = Vec::new();
    let runs = loop {
        assert!(eois.len() < 20, "EOI exit storm: {eois:?}");
        match vmkit_vcpu::run_until_exit(&mut vcpu, &*buses, &stop, &mut stats).unwrap() {
            RunOutcome::Stopped(s) => break s,
            RunOutcome::Exit(Exit::IoapicEoi { vector }) => {
                assert_eq!(vector, VECTOR as u8);
                let asserted = line.tap.level();
                let mut io = ioapic.lock().unwrap();
                let before = io.stats().delivered;
                io.end_of_interrupt(vector);
                eois.push((asserted, before, io.stats().delivered));
            }
            RunOutcome::Exit(other) => panic!("unexpected exit {other:?}"),
        }
    };
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    let t = f.lock().unwrap();
    let m = t.metrics();
    let io = ioapic.lock().unwrap().stats();
    let ctx = format!("{text:?} {eois:?} {m:?} {io:?}");
    // The guest saw INTA# and its own Interrupt Line; both notifications went out as INTx.
    let (regs, isrs) = text.split_once(' ').expect(&ctx);
    assert_eq!(regs, format!("01{PIN:02x}"), "{ctx}");
    assert_eq!((m.notifies, m.trapped_notifies), (2, 2), "{ctx}");
    assert_eq!(msix.stats().delivered, 0, "{ctx}");
    // One assertion per notification, each acknowledged by the handler's ISR read.
    assert_eq!((line.tap.asserts(), line.tap.deasserts()), (2, 2), "{ctx}");
    assert!(!line.tap.level() && !t.intx_pending(), "{ctx}");
    // Every delivery ran the handler and was EOI'd; each EOI redelivered exactly when the
    // line was still high; apart from those, exactly one delivery per notification.
    assert_eq!(runs as u64, io.delivered, "{ctx}");
    if let Err(e) = intx_accounting(2, &eois, io.delivered, isrs.trim_end_matches('\n')) {
        panic!("{e}: {ctx}");
    }
    assert_eq!(io.bad_accesses, 0, "{ctx}");
    assert_eq!(m.bad_register_accesses, 0, "{ctx}");
    assert_eq!(t.device().metrics().bytes, 32, "{ctx}");
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
    assert_eq!(used_idx, 2, "{ctx}");
}

/// The delivery accounting of [`kvm_intx_interrupt_through_the_ioapic`]: `notifications`
/// notifications (the guest waits for each to be acknowledged), the EOI exits as (line
/// asserted, deliveries before, deliveries after), the I/O APIC's deliveries and the ISR bytes
/// the handler runs printed (`1`: it acknowledged a notification, `0`: nothing to acknowledge).
///
/// A level interrupt signals a line state, not a count (82093AA §3.2.4): while a pin's delivery
/// is in service (remote IRR set, until the EOI for its vector) an assertion sends nothing, the
/// pending delivery serves it. So the redelivery of an early EOI either finds the device
/// acknowledged (prints `0`) or serves the next notification (prints `1`: issue 23's `"11"`
/// with EOIs `[(true, 1, 2), (false, 2, 2)]`, once in ~600 runs under load). Deliveries that
/// are not redeliveries are therefore between 1 and one per notification, not exactly one per
/// notification as this test first assumed.
fn intx_accounting(
    notifications: u64,
    eois: &[(bool, u64, u64)],
    delivered: u64,
    isrs: &str,
) -> Result<(), String> {
    // Every delivery was EOI'd; each EOI redelivered exactly when the line was still high.
    if eois.len() as u64 != delivered {
        return Err(format!("{} EOIs for {delivered} deliveries", eois.len()));
    }
    for &(asserted, before, after) in eois {
        if after.checked_sub(before) != Some(asserted as u64) {
            return Err(format!(
                "EOI with line {asserted}: {before} -> {after} deliveries"
            ));
        }
    }
    // Every delivery ran the handler; exactly one run acknowledged each notification.
    let (acks, empty) = (isrs.matches('1').count(), isrs.matches('0').count());
    if isrs.len() as u64 != delivered
        || acks as u64 != notifications
        || Some(empty as u64) != delivered.checked_sub(notifications)
    {
        return Err(format!("handler runs {isrs:?} for {delivered} deliveries"));
    }
    // A delivery that is not a redelivery needs an assertion while remote IRR is clear: the
    // first one, at most one per notification. (So every empty run was a redelivery.)
    let redeliveries = eois.iter().filter(|e| e.0).count() as u64;
    let fresh = delivered.saturating_sub(redeliveries);
    if !(1..=notifications).contains(&fresh) {
        return Err(format!(
            "{fresh} deliveries besides {redeliveries} redeliveries for {notifications} notifications"
        ));
    }
    Ok(())
}

/// [`intx_accounting`] on the traces the KVM test produces, and on ones it must refuse.
#[test]
fn intx_accounting_of_early_eoi_traces() {
    // Issue 23: the early EOI's redelivery served the second notification. The old accounting
    // (deliveries − redeliveries = notifications) refused this trace.
    assert_eq!(
        intx_accounting(2, &[(true, 1, 2), (false, 2, 2)], 2, "11"),
        Ok(())
    );
    // No early EOI; an early EOI whose redelivery found ISR 0.
    assert_eq!(
        intx_accounting(2, &[(false, 1, 1), (false, 2, 2)], 2, "11"),
        Ok(())
    );
    let early = [(true, 1, 2), (false, 2, 2), (false, 3, 3)];
    assert_eq!(intx_accounting(2, &early, 3, "101"), Ok(()));
    // An EOI with the line high that did not redeliver; a delivery never EOI'd; an empty
    // handler run that no redelivery explains; a notification never acknowledged.
    assert!(intx_accounting(2, &[(true, 1, 1), (false, 2, 2)], 2, "11").is_err());
    assert!(intx_accounting(2, &[(false, 1, 1)], 2, "11").is_err());
    let three = [(false, 1, 1), (false, 2, 2), (false, 3, 3)];
    assert!(intx_accounting(2, &three, 3, "101").is_err());
    assert!(intx_accounting(2, &[(true, 1, 2), (false, 2, 2)], 2, "10").is_err());
}
