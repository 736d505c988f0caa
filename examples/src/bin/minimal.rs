//! `minimal`: the smallest complete vmkit VMM.
//!
//! Lays out guest memory, builds identity page tables, enters 64-bit long mode directly and runs a
//! guest program (assembled below with iced-x86) that prints through a 16550 serial port and leaves
//! through a debug-exit port. The VMM prints the guest's output and a table of exits by kind, and
//! exits with the guest's status code. The addresses and ports, the console devices and the
//! run-until-debug-exit loop are the ones every example shares (the crate's `guest` and
//! `machine` modules).
//!
//! Run: `cargo run --release -p vmkit-examples --bin minimal`

use std::process::ExitCode;

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};
use vmkit_devices::IoBuses;
use vmkit_examples::guest::{CODE, COM1, DEBUG_EXIT, PAGE_TABLES, STACK_TOP};
use vmkit_examples::machine::{Error, RAM_SIZE, add_console, exit_code, run_to_debug_exit};
use vmkit_memory::{GuestLayout, PageSize, PageTableBuilder, paging::flags};
use vmkit_vcpu::{KvmVm, LongModeState, StopHandle};

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
    exit_code("minimal", run())
}

fn run() -> Result<u32, Error> {
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

    // 4. Devices: COM1 (a 16550) to our stdout, and the debug-exit port.
    let stop = StopHandle::new();
    let buses = IoBuses::default();
    add_console(&buses, &stop)?;

    // 5. Run until the guest leaves; anything but a stop request is an error for this VMM.
    let (status, stats) = run_to_debug_exit(&mut vcpu, &buses, &stop)?;
    println!("--- guest stopped with status {status}");
    println!("{stats}");
    Ok(status)
}
