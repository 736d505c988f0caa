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
//! The machine (memory, IDT, VM, PCI bus, console) and the driver steps shared with the other
//! PCI examples live in the crate's `machine` and `guest` modules.
//!
//! Run: `cargo run --release -p vmkit-examples --bin virtio_rng`

use std::process::ExitCode;

use iced_x86::code_asm::*;
use vmkit_examples::guest::{BUF, GuestAsm, VIRTQ_DESC_F_WRITE};
use vmkit_examples::machine::{Error, PciMachine, exit_code, print_report};
use vmkit_virtio::rng::Rng;
use vmkit_virtio::spec::VIRTIO_F_VERSION_1;

/// Exit statuses of the guest besides 0.
const NOT_FOUND: u8 = 1;
const NO_INTERRUPT: u8 = 2;
/// MSI-X table entry the guest assigns to queue 0.
const QUEUE_VECTOR: u16 = 1;

fn guest_program(msix_cap: u32) -> Result<Vec<u8>, IcedError> {
    let mut g = GuestAsm::new()?;
    // 1.-3. Find 1af4:1044, BAR 0 + MSI-X, virtio bring-up with queue 0.
    g.find_function(0x1044, "virtio-rng", NOT_FOUND)?;
    g.enable_msix(msix_cap, QUEUE_VECTOR as u32)?;
    g.virtio_bring_up(1 << VIRTIO_F_VERSION_1, QUEUE_VECTOR)?;

    // 4. One 16-byte device-writable buffer, published, then the doorbell.
    g.desc(0, BUF, 16, VIRTQ_DESC_F_WRITE, 0)?;
    g.sti()?;
    g.submit(0, 0)?;

    // 5. Wait for the interrupt, print the bytes, leave.
    g.wait_interrupts(1, NO_INTERRUPT)?;
    g.puts("guest: interrupt received; random bytes:")?;
    let mut print = g.create_label();
    g.mov(rbx, BUF)?;
    g.xor(r14d, r14d)?;
    g.set_label(&mut print)?;
    g.puts(" ")?;
    g.mov(r8b, byte_ptr(rbx + r14))?;
    g.print_hex(2)?;
    g.inc(r14d)?;
    g.cmp(r14d, 16)?;
    g.jb(print)?;
    g.puts("\n")?;
    g.exit(0)?;
    g.assemble()
}

fn main() -> ExitCode {
    exit_code("virtio_rng", run())
}

fn run() -> Result<u32, Error> {
    let mut machine = PciMachine::new()?;
    let rng = machine.add_virtio("virtio-rng", Rng::default())?;
    let program = guest_program(rng.msix_cap() as u32)?;
    let (status, exits) = machine.run(&program)?;
    let transport = rng.stop();
    let t = transport.lock().map_err(|_| "poisoned")?;
    print_report(status, &t, &format!("{:?}", t.device().metrics()), &exits);
    Ok(status)
}
