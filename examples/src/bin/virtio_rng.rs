//! `virtio_rng`: a guest talking to a virtio entropy device over PCI.
//!
//! The VMM puts a virtio-rng function (vmkit-virtio's `VirtioPciTransport`) on a PCI root bus
//! behind ports 0xCF8/0xCFC, on a VM with the split irqchip (in-kernel LAPIC). The guest, a
//! small 64-bit program assembled below:
//!
//! 1. scans bus 0 for vendor 0x1af4 / device 0x1044 and prints where it found it;
//! 2. places BAR 0, enables memory decoding and MSI-X, and programs MSI-X vector 1 to IDT
//!    vector 0x41;
//! 3. drives the virtio status sequence through the common configuration (ACKNOWLEDGE, DRIVER,
//!    VERSION_1, FEATURES_OK, queue 0 with 16 entries on vector 1, DRIVER_OK);
//! 4. posts a 16-byte buffer and rings the queue's doorbell — an ioeventfd, so no exit; the
//!    VMM's notify worker runs the device, whose interrupt comes back through an irqfd;
//! 5. its interrupt handler counts, and the guest prints the random bytes and leaves through
//!    the debug-exit port with status 0.
//!
//! Run: `cargo run --release -p vmkit-examples --bin virtio_rng`

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_devices::kvm_irq::{KvmIrqRouter, enable_split_irqchip};
use vmkit_devices::pci::{PciFunction, PciRoot, cap_id};
use vmkit_devices::{IoBuses, debug_exit::DebugExit, interrupt::NoInterrupt, serial::Serial};
use vmkit_memory::{GuestLayout, PageSize, PageTableBuilder, paging::flags};
use vmkit_vcpu::{ExitStats, KvmVm, LongModeState, RunOutcome, StopHandle, run_until_exit};
use vmkit_virtio::notify::{NotifyWorker, register_ioeventfds};
use vmkit_virtio::pci::{MSIX_TABLE_OFFSET, NOTIFY_CFG_OFFSET, VirtioPciTransport};
use vmkit_virtio::rng::Rng;

/// Policy of this VMM: where things live.
const RAM_SIZE: u64 = 32 << 20;
const PAGE_TABLES: u64 = 0x9000;
const STACK_TOP: u64 = 0x8_0000;
const CODE: u64 = 0x10_0000;
const HANDLER: u64 = 0x10_2000;
const DATA: u64 = 0x20_0000; // interrupt counter
const IDTR: u64 = DATA + 0x100;
const IDT: u64 = DATA + 0x1000;
const DESC: u64 = 0x30_0000; // virtqueue 0: descriptors, available ring, used ring
const AVAIL: u64 = DESC + 0x100;
const USED: u64 = DESC + 0x200;
const BUF: u64 = 0x30_1000;
const BAR: u64 = 0xd000_0000;
const LAPIC: u64 = 0xfee0_0000;
const VECTOR: u32 = 0x41;
const PCI_SLOT: u8 = 4;
const COM1: u16 = 0x3f8;
const DEBUG_EXIT: u16 = 0xf4;

fn puts(a: &mut CodeAssembler, s: &str) -> Result<(), IcedError> {
    a.mov(dx, COM1 as u32)?;
    for c in s.bytes() {
        a.mov(al, c as u32)?;
        a.out(dx, al)?;
    }
    Ok(())
}

/// Configuration write to register `reg` of the device number in r15.
fn cfg_write(a: &mut CodeAssembler, reg: u32, v: u32, word: bool) -> Result<(), IcedError> {
    a.mov(eax, r15d)?;
    a.shl(eax, 11)?;
    a.or(eax, 0x8000_0000 | (reg & 0xfc))?;
    a.mov(dx, 0xcf8u32)?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfc + (reg & 3))?;
    a.mov(eax, v)?;
    if word { a.out(dx, ax) } else { a.out(dx, eax) }
}

fn guest_program(msix_cap: u32) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let (mut hex, mut start, mut scan, mut found) = (
        a.create_label(),
        a.create_label(),
        a.create_label(),
        a.create_label(),
    );
    a.jmp(start)?;
    // hex: print the byte in r8b as two hex digits (clobbers eax, ecx, edx).
    a.set_label(&mut hex)?;
    a.mov(dx, COM1 as u32)?;
    for shift in [4u32, 0] {
        let mut digit = a.create_label();
        a.movzx(eax, r8b)?;
        a.shr(eax, shift)?;
        a.and(eax, 0xfu32)?;
        a.cmp(eax, 10u32)?;
        a.jb(digit)?;
        a.add(eax, (b'a' - 10 - b'0') as u32)?;
        a.set_label(&mut digit)?;
        a.add(eax, b'0' as u32)?;
        a.out(dx, al)?;
    }
    a.ret()?;

    a.set_label(&mut start)?;
    // 1. Find 1af4:1044 on bus 0.
    a.xor(r15d, r15d)?;
    a.set_label(&mut scan)?;
    a.mov(eax, r15d)?;
    a.shl(eax, 11)?;
    a.or(eax, 0x8000_0000u32)?;
    a.mov(dx, 0xcf8u32)?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)?;
    a.in_(eax, dx)?;
    a.cmp(eax, 0x1044_1af4)?;
    a.je(found)?;
    a.inc(r15d)?;
    a.cmp(r15d, 32)?;
    a.jb(scan)?;
    a.mov(al, 1u32)?; // not found
    a.out(DEBUG_EXIT as i32, al)?;
    a.set_label(&mut found)?;
    puts(&mut a, "guest: virtio-rng at 00:")?;
    a.mov(r8d, r15d)?;
    a.call(hex)?;
    puts(&mut a, ".0\n")?;

    // 2. BAR 0, memory decoding + bus mastering, MSI-X enable; vector 1 -> IDT 0x41.
    a.mov(rax, IDTR)?;
    a.lidt(ptr(rax))?;
    a.mov(rbx, LAPIC)?;
    a.mov(dword_ptr(rbx + 0xf0), 0x1ffu32)?; // LAPIC spurious-vector register: enable
    cfg_write(&mut a, 0x10, BAR as u32, false)?;
    cfg_write(&mut a, 0x14, 0, false)?;
    cfg_write(&mut a, 0x04, 0x6, true)?;
    cfg_write(&mut a, msix_cap + 2, 0x8000, true)?;
    a.mov(rsi, BAR)?;
    let e = MSIX_TABLE_OFFSET as i32 + 16;
    a.mov(dword_ptr(rsi + e), LAPIC as u32)?;
    a.mov(dword_ptr(rsi + e + 4), 0u32)?;
    a.mov(dword_ptr(rsi + e + 8), VECTOR)?;
    a.mov(dword_ptr(rsi + e + 12), 0u32)?;

    // 3. virtio 1.2 §3.1.1 through the common configuration structure.
    a.mov(byte_ptr(rsi + 0x14), 1u32)?; // ACKNOWLEDGE
    a.mov(byte_ptr(rsi + 0x14), 3u32)?; // DRIVER
    a.mov(dword_ptr(rsi + 0x08), 1u32)?; // driver_feature_select: bits 32..63
    a.mov(dword_ptr(rsi + 0x0c), 1u32)?; // VIRTIO_F_VERSION_1
    a.mov(byte_ptr(rsi + 0x14), 0xbu32)?; // FEATURES_OK
    a.mov(word_ptr(rsi + 0x16), 0u32)?; // queue_select 0
    a.mov(word_ptr(rsi + 0x18), 16u32)?; // queue_size
    for (off, addr) in [(0x20, DESC), (0x28, AVAIL), (0x30, USED)] {
        a.mov(dword_ptr(rsi + off), addr as u32)?;
        a.mov(dword_ptr(rsi + off + 4), 0u32)?;
    }
    a.mov(word_ptr(rsi + 0x1a), 1u32)?; // queue_msix_vector
    a.mov(word_ptr(rsi + 0x1c), 1u32)?; // queue_enable
    a.mov(byte_ptr(rsi + 0x14), 0xfu32)?; // DRIVER_OK

    // 4. One 16-byte device-writable buffer, published, then the doorbell.
    a.mov(rdi, DESC)?;
    a.mov(rax, BUF)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(dword_ptr(rdi + 8), 16u32)?;
    a.mov(word_ptr(rdi + 12), 2u32)?; // VRING_DESC_F_WRITE
    a.mov(rdi, AVAIL)?;
    a.mov(word_ptr(rdi + 4), 0u32)?;
    a.mov(word_ptr(rdi + 2), 1u32)?;
    a.sti()?;
    a.mov(word_ptr(rsi + NOTIFY_CFG_OFFSET as i32), 0u32)?;

    // 5. Wait for the interrupt (bounded), print the bytes, leave.
    let (mut wait, mut got, mut print) = (a.create_label(), a.create_label(), a.create_label());
    a.mov(rdi, DATA)?;
    a.mov(ecx, 1_000_000u32)?;
    a.set_label(&mut wait)?;
    a.cmp(dword_ptr(rdi), 1)?;
    a.jae(got)?;
    a.pause()?;
    a.dec(ecx)?;
    a.jnz(wait)?;
    a.mov(al, 2u32)?; // no interrupt
    a.out(DEBUG_EXIT as i32, al)?;
    a.set_label(&mut got)?;
    puts(&mut a, "guest: interrupt received; random bytes:")?;
    a.mov(rbx, BUF)?;
    a.xor(r14d, r14d)?;
    a.set_label(&mut print)?;
    puts(&mut a, " ")?;
    a.mov(r8b, byte_ptr(rbx + r14))?;
    a.call(hex)?;
    a.inc(r14d)?;
    a.cmp(r14d, 16)?;
    a.jb(print)?;
    puts(&mut a, "\n")?;
    a.mov(al, 0u32)?;
    a.out(DEBUG_EXIT as i32, al)?;
    a.hlt()?;
    a.assemble(CODE)
}

/// The interrupt handler: count, EOI, return.
fn handler() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.push(rax)?;
    a.mov(rax, DATA)?;
    a.inc(dword_ptr(rax))?;
    a.mov(rax, LAPIC)?;
    a.mov(dword_ptr(rax + 0xb0), 0u32)?;
    a.pop(rax)?;
    a.iretq()?;
    a.assemble(HANDLER)
}

fn msix_cap(f: &mut impl PciFunction) -> Option<u16> {
    let mut p = [0u8; 2];
    f.config_read(0x34, &mut p[..1]);
    let mut at = p[0] as u16;
    while at != 0 {
        f.config_read(at, &mut p);
        if p[0] == cap_id::MSIX {
            return Some(at);
        }
        at = p[1] as u16;
    }
    None
}

fn main() -> ExitCode {
    match run() {
        Ok(status) => ExitCode::from(status as u8),
        Err(e) => {
            eprintln!("virtio_rng: {e}");
            ExitCode::from(255)
        }
    }
}

fn run() -> Result<u32, Box<dyn std::error::Error>> {
    // Memory, page tables, IDT with one 64-bit interrupt gate (SDM Vol. 3 §6.14.1).
    let mem: GuestMemoryMmap = GuestLayout::builder()
        .ram_size(RAM_SIZE)
        .build()?
        .create_memory()?;
    let mut tables = PageTableBuilder::new(&mem, PAGE_TABLES, 0x7000)?;
    tables.identity_map(0, 4 << 30, PageSize::Size2M, flags::WRITABLE)?;
    let gate_lo = (HANDLER & 0xffff) | 0x08 << 16 | 0x8e00 << 32 | ((HANDLER >> 16) & 0xffff) << 48;
    mem.write_obj(gate_lo, GuestAddress(IDT + 16 * VECTOR as u64))?;
    mem.write_obj(HANDLER >> 32, GuestAddress(IDT + 16 * VECTOR as u64 + 8))?;
    mem.write_obj(256u16 * 16 - 1, GuestAddress(IDTR))?;
    mem.write_obj(IDT, GuestAddress(IDTR + 2))?;
    mem.write_slice(&handler()?, GuestAddress(HANDLER))?;

    // The VM: split irqchip before the vCPU, so MSIs reach an in-kernel LAPIC.
    let mut vm = KvmVm::new()?;
    enable_split_irqchip(&vm)?;
    vm.register_memory(&mem)?;
    let router = KvmIrqRouter::new(&vm)?;

    // virtio-rng on PCI; its MSI-X vectors get irqfds before the transport takes them.
    let msix = VirtioPciTransport::<Rng>::msix_for(&Rng::default(), router.clone())?;
    router.attach_msix(&msix)?;
    let mut function = VirtioPciTransport::new(Rng::default(), mem.clone(), msix)?;
    let cap = msix_cap(&mut function).ok_or("no MSI-X capability")?;
    mem.write_slice(&guest_program(cap as u32)?, GuestAddress(CODE))?;
    let function = Arc::new(Mutex::new(function));
    let buses = Arc::new(IoBuses::default());
    let root = PciRoot::new(&buses);
    root.add(PCI_SLOT, 0, "virtio-rng", function.clone())?;
    buses.pio.insert(0xcf8, 8, "pci", root.config_io())?;
    let stop = StopHandle::new();
    let serial = Serial::new(Arc::new(NoInterrupt), std::io::stdout());
    buses.pio.insert(COM1 as u64, 8, "com1", Arc::new(serial))?;
    buses.pio.insert(
        DEBUG_EXIT as u64,
        1,
        "debug-exit",
        Arc::new(DebugExit::new(stop.clone())),
    )?;

    // Doorbells through ioeventfd at the BAR address this guest programs.
    let doorbells = function
        .lock()
        .map_err(|_| "poisoned")?
        .notify_addresses(BAR);
    let fds = register_ioeventfds(vm.fd(), &doorbells)?;
    let worker = NotifyWorker::spawn(function.clone(), fds)?;

    let mut vcpu = vm.create_vcpu(0)?;
    let cpu = LongModeState::flat_64(tables.cr3(), CODE, STACK_TOP);
    cpu.write_gdt(&mem)?;
    cpu.apply(&mut vcpu)?;
    let mut stats = ExitStats::default();
    let status = match run_until_exit(&mut vcpu, &*buses, &stop, &mut stats)? {
        RunOutcome::Stopped(status) => status,
        RunOutcome::Exit(exit) => return Err(format!("unexpected exit: {exit:?}").into()),
    };
    drop(worker);
    let t = function.lock().map_err(|_| "poisoned")?;
    println!("--- guest stopped with status {status}");
    println!("transport: {:?}", t.metrics());
    println!("device:    {:?}", t.device().metrics());
    println!("msi-x:     {:?}", t.msix().stats());
    println!("{stats}");
    Ok(status)
}
