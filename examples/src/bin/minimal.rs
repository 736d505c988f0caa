//! `minimal`: the smallest complete vmkit VMM.
//!
//! Lays out guest memory, builds identity page tables, enters 64-bit long mode directly and runs a
//! guest program (assembled below with iced-x86) that prints through a 16550 serial port and leaves
//! through a debug-exit port. The VMM prints the guest's output and a table of exits by kind, and
//! exits with the guest's status code. It uses the vmkit crates only, so the whole VMM is in this
//! file (the bigger examples share the crate's `guest` and `machine` modules).
//!
//! Run: `cargo run --release -p vmkit-examples --bin minimal`

use std::process::ExitCode;
use std::sync::Arc;

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};
use vmkit_devices::{IoBuses, debug_exit::DebugExit, interrupt::NoInterrupt, serial::Serial};
use vmkit_memory::{GuestLayout, PageSize, PageTableBuilder, paging::flags};
use vmkit_vcpu::{ExitStats, KvmVm, LongModeState, RunOutcome, StopHandle, run_until_exit};

/// Policy of this VMM: where things live.
const RAM_SIZE: u64 = 32 << 20;
const PAGE_TABLES: u64 = 0x9000; // 0x9000..0x10000
const STACK_TOP: u64 = 0x8_0000;
const CODE: u64 = 0x10_0000;
const COM1: u16 = 0x3f8;
const DEBUG_EXIT: u16 = 0xf4;

/// The guest: print a NUL-terminated message byte by byte to COM1, then write status 0 to the
/// debug-exit port.
fn guest_program() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut msg = a.create_label();
    let mut next = a.create_label();
    let mut done = a.create_label();
    a.lea(rsi, ptr(msg))?;
    a.mov(dx, COM1 as u32)?;
    a.set_label(&mut next)?;
    a.mov(al, byte_ptr(rsi))?;
    a.test(al, al)?;
    a.jz(done)?;
    a.out(dx, al)?;
    a.inc(rsi)?;
    a.jmp(next)?;
    a.set_label(&mut done)?;
    a.mov(al, 0u32)?; // exit status
    a.out(DEBUG_EXIT as u32, al)?;
    a.hlt()?;
    a.set_label(&mut msg)?;
    a.db(b"Hello from the guest\n\0")?;
    a.assemble(CODE)
}

fn main() -> ExitCode {
    match run() {
        Ok(status) => ExitCode::from(status as u8),
        Err(e) => {
            eprintln!("minimal: {e}");
            ExitCode::from(255)
        }
    }
}

fn run() -> Result<u32, Box<dyn std::error::Error>> {
    // 1. Guest physical memory: RAM only, e820-style layout.
    let layout = GuestLayout::builder().ram_size(RAM_SIZE).build()?;
    let mem = layout.create_memory()?;

    // 2. Identity-map the first GiB with 2 MiB pages; load the program.
    let mut tables = PageTableBuilder::new(&mem, PAGE_TABLES, 0x7000)?;
    tables.identity_map(0, 1 << 30, PageSize::Size2M, flags::WRITABLE)?;
    mem.write_slice(&guest_program()?, GuestAddress(CODE))?;

    // 3. A VM with that memory and one vCPU, placed straight into long mode.
    let mut vm = KvmVm::new()?;
    vm.register_memory(&mem)?;
    let mut vcpu = vm.create_vcpu(0)?;
    let cpu = LongModeState::flat_64(tables.cr3(), CODE, STACK_TOP);
    cpu.write_gdt(&mem)?;
    cpu.apply(&mut vcpu)?;

    // 4. Devices: COM1 to our stdout, and the debug-exit port.
    let stop = StopHandle::new();
    let buses = IoBuses::default();
    let serial = Serial::new(Arc::new(NoInterrupt), std::io::stdout());
    buses.pio.insert(COM1 as u64, 8, "com1", Arc::new(serial))?;
    buses.pio.insert(
        DEBUG_EXIT as u64,
        4,
        "debug-exit",
        Arc::new(DebugExit::new(stop.clone())),
    )?;

    // 5. Run until the guest leaves; anything but a stop request is an error for this VMM.
    let mut stats = ExitStats::default();
    let status = match run_until_exit(&mut vcpu, &buses, &stop, &mut stats)? {
        RunOutcome::Stopped(status) => status,
        RunOutcome::Exit(exit) => return Err(format!("unexpected exit: {exit:?}").into()),
    };
    println!("--- guest stopped with status {status}");
    println!("{stats}");
    Ok(status)
}
