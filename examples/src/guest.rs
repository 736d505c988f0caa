//! Guest-side assembly shared by the PCI example guests (`virtio_rng`, `virtio_blk`).
//!
//! [`GuestAsm`] wraps an iced-x86 [`CodeAssembler`] (64-bit, it derefs to it, so programs mix
//! plain instructions with the helpers) and adds what every tiny PCI driver here needs:
//! printing on COM1, PCI configuration writes through ports 0xCF8/0xCFC (PCI Local Bus 3.0
//! §3.2.2.3.2, configuration mechanism #1), finding a function on bus 0, placing BAR 0 and
//! programming an MSI-X table entry (PCI 3.0 §6.8.2), the virtio status sequence through the
//! common configuration structure (virtio 1.2 §3.1.1, §4.1.4.3), split-virtqueue descriptors
//! and doorbells (§2.7), and waiting for interrupts counted by [`interrupt_handler`].
//!
//! The addresses below are the examples' policy: one guest-physical layout for every PCI
//! example, set up on the host side by [`crate::machine::PciMachine`].
//!
//! ```
//! use iced_x86::code_asm::*;
//! use vmkit_examples::guest::GuestAsm;
//!
//! let mut g = GuestAsm::new().unwrap();
//! g.puts("hello\n").unwrap();
//! g.mov(r8d, 0x2au32).unwrap(); // plain instructions through Deref
//! g.print_hex(2).unwrap(); // prints "2a"
//! g.exit(0).unwrap();
//! assert!(!g.assemble().unwrap().is_empty());
//! ```

use std::ops::{Deref, DerefMut};

use iced_x86::code_asm::*;
use vmkit_virtio::guest_driver;
use vmkit_virtio::pci::{MSIX_TABLE_OFFSET, NOTIFY_CFG_OFFSET};
use vmkit_virtio::spec::VIRTIO_PCI_VENDOR_ID;

/// Where the identity page tables are built.
pub const PAGE_TABLES: u64 = 0x9000;
/// Initial stack pointer.
pub const STACK_TOP: u64 = 0x8_0000;
/// Where the guest program is assembled and loaded.
pub const CODE: u64 = 0x10_0000;
/// Where [`interrupt_handler`] is loaded.
pub const HANDLER: u64 = 0x10_2000;
/// The interrupt counter (a dword the handler increments).
pub const DATA: u64 = 0x20_0000;
/// The IDTR image the guest loads (limit, base).
pub const IDTR: u64 = DATA + 0x100;
/// The IDT (256 16-byte gates).
pub const IDT: u64 = DATA + 0x1000;
/// Virtqueue 0: descriptor table (16 entries).
pub const DESC: u64 = 0x30_0000;
/// Virtqueue 0: available (driver) ring.
pub const AVAIL: u64 = DESC + 0x100;
/// Virtqueue 0: used (device) ring.
pub const USED: u64 = DESC + 0x200;
/// Buffers the guest hands to the device start here.
pub const BUF: u64 = 0x30_1000;
/// Where the guest places BAR 0 of the virtio function.
pub const BAR: u64 = 0xd000_0000;
/// The local APIC's MMIO base.
pub const LAPIC: u64 = 0xfee0_0000;
/// The IDT vector MSI-X messages name.
pub const VECTOR: u32 = 0x41;
/// Device number of the virtio function on bus 0.
pub const PCI_SLOT: u8 = 4;
/// The serial port (16550) base.
pub const COM1: u16 = 0x3f8;
/// The debug-exit port: a byte written there stops the VM with that status.
pub const DEBUG_EXIT: u16 = 0xf4;
/// Entries of virtqueue 0.
pub const QUEUE_SIZE: u16 = 16;

/// `VIRTQ_DESC_F_NEXT` (virtio 1.2 §2.7.5).
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: the device writes this buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// A 64-bit guest program under construction, with the shared helpers.
///
/// Register conventions: `rsi` holds [`BAR`] after [`GuestAsm::enable_msix`]; `r15d` holds the
/// device number [`GuestAsm::find_function`] found; [`GuestAsm::print_hex`] prints from `r8`.
pub struct GuestAsm {
    a: CodeAssembler,
    hex: CodeLabel,
}

impl Deref for GuestAsm {
    type Target = CodeAssembler;
    fn deref(&self) -> &CodeAssembler {
        &self.a
    }
}

impl DerefMut for GuestAsm {
    fn deref_mut(&mut self) -> &mut CodeAssembler {
        &mut self.a
    }
}

impl GuestAsm {
    /// An empty program.
    pub fn new() -> Result<Self, IcedError> {
        let mut a = CodeAssembler::new(64)?;
        let hex = a.create_label();
        Ok(Self { a, hex })
    }

    /// Print `s` on COM1, one `out` per byte (clobbers al, dx).
    pub fn puts(&mut self, s: &str) -> Result<(), IcedError> {
        self.a.mov(dx, COM1 as u32)?;
        for c in s.bytes() {
            self.a.mov(al, c as u32)?;
            self.a.out(dx, al)?;
        }
        Ok(())
    }

    /// Print the low `digits` hex digits of `r8` (clobbers rax, rcx, rdx, r9).
    pub fn print_hex(&mut self, digits: u32) -> Result<(), IcedError> {
        self.a.mov(r9d, digits)?;
        self.a.call(self.hex)
    }

    /// Leave through the debug-exit port with `status`.
    pub fn exit(&mut self, status: u8) -> Result<(), IcedError> {
        self.a.mov(al, status as u32)?;
        self.a.out(DEBUG_EXIT as i32, al)
    }

    /// Select configuration register `reg` of device `r15d` on bus 0: write the address to
    /// 0xCF8 and leave the matching data port (0xCFC + `reg & 3`) in dx.
    fn cfg_select(&mut self, reg: u32) -> Result<(), IcedError> {
        let a = &mut self.a;
        a.mov(eax, r15d)?;
        a.shl(eax, 11)?;
        a.or(eax, 0x8000_0000 | (reg & 0xfc))?;
        a.mov(dx, 0xcf8u32)?;
        a.out(dx, eax)?;
        a.mov(dx, 0xcfc + (reg & 3))
    }

    /// Configuration write of `v` (a word if `word`, else a dword) to register `reg` of the
    /// device number in `r15d`.
    pub fn cfg_write(&mut self, reg: u32, v: u32, word: bool) -> Result<(), IcedError> {
        self.cfg_select(reg)?;
        self.a.mov(eax, v)?;
        if word {
            self.a.out(dx, ax)
        } else {
            self.a.out(dx, eax)
        }
    }

    /// Scan bus 0 for virtio device `device_id` (vendor 0x1af4); leave its device number in
    /// `r15d` and print `guest: {name} at 00:DD.0`. Not found: exit with `not_found`.
    pub fn find_function(
        &mut self,
        device_id: u16,
        name: &str,
        not_found: u8,
    ) -> Result<(), IcedError> {
        let (mut scan, mut found) = (self.a.create_label(), self.a.create_label());
        self.a.xor(r15d, r15d)?;
        self.a.set_label(&mut scan)?;
        self.cfg_select(0)?;
        let a = &mut self.a;
        a.in_(eax, dx)?;
        a.cmp(eax, (device_id as u32) << 16 | VIRTIO_PCI_VENDOR_ID as u32)?;
        a.je(found)?;
        a.inc(r15d)?;
        a.cmp(r15d, 32)?;
        a.jb(scan)?;
        self.exit(not_found)?;
        self.a.set_label(&mut found)?;
        self.puts(&format!("guest: {name} at 00:"))?;
        self.a.mov(r8d, r15d)?;
        self.print_hex(2)?;
        self.puts(".0\n")
    }

    /// Load the IDT, enable the local APIC, place BAR 0 (64-bit) at [`BAR`], enable memory
    /// decoding and bus mastering, enable MSI-X (capability at `msix_cap`) and point table
    /// entry `entry` at [`VECTOR`] on this CPU. Leaves [`BAR`] in `rsi`.
    pub fn enable_msix(&mut self, msix_cap: u32, entry: u32) -> Result<(), IcedError> {
        self.a.mov(rax, IDTR)?;
        self.a.lidt(ptr(rax))?;
        self.a.mov(rbx, LAPIC)?;
        self.a.mov(dword_ptr(rbx + 0xf0), 0x1ffu32)?; // spurious-vector register: enable
        self.cfg_write(0x10, BAR as u32, false)?;
        self.cfg_write(0x14, (BAR >> 32) as u32, false)?;
        self.cfg_write(0x04, 0x6, true)?; // Memory Space + Bus Master
        self.cfg_write(msix_cap + 2, 0x8000, true)?; // Message Control: MSI-X Enable
        self.a.mov(rsi, BAR)?;
        // Message Address: APIC ID 0; Message Data: fixed, edge; unmasked.
        guest_driver::msix_entry(
            &mut self.a,
            rsi,
            MSIX_TABLE_OFFSET,
            entry as u16,
            LAPIC,
            VECTOR,
        )
    }

    /// virtio 1.2 §3.1.1 through the common configuration at `rsi`: ACKNOWLEDGE, DRIVER,
    /// accept `features`, FEATURES_OK, queue 0 with [`QUEUE_SIZE`] entries at
    /// [`DESC`]/[`AVAIL`]/[`USED`] on MSI-X entry `vector`, enabled, DRIVER_OK.
    pub fn virtio_bring_up(&mut self, features: u64, vector: u16) -> Result<(), IcedError> {
        let q = guest_driver::GuestQueue::at(0, QUEUE_SIZE, DESC, AVAIL, USED).with_vector(vector);
        guest_driver::virtio_pci_bring_up(&mut self.a, rsi, features, &[q])
    }

    /// Write descriptor `i` of queue 0 (clobbers rax, rdi).
    pub fn desc(
        &mut self,
        i: u64,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), IcedError> {
        guest_driver::write_descriptor(&mut self.a, DESC, i as u16, addr, len, flags, next)
    }

    /// Publish the chain at `head` in available-ring slot `slot` (available index `slot + 1`)
    /// and ring queue 0's doorbell in the BAR at `rsi` (clobbers rdi).
    pub fn submit(&mut self, slot: u64, head: u16) -> Result<(), IcedError> {
        let q = guest_driver::GuestQueue::at(0, QUEUE_SIZE, DESC, AVAIL, USED);
        guest_driver::publish(&mut self.a, q, slot as u16, head)?;
        self.a.mov(word_ptr(rsi + NOTIFY_CFG_OFFSET as i32), 0u32)
    }

    /// Wait (bounded) until [`interrupt_handler`] has counted `n` interrupts; if none comes,
    /// exit with `timeout` (clobbers rdi, ecx).
    pub fn wait_interrupts(&mut self, n: u32, timeout: u8) -> Result<(), IcedError> {
        let (mut wait, mut got) = (self.a.create_label(), self.a.create_label());
        let a = &mut self.a;
        a.mov(rdi, DATA)?;
        a.mov(ecx, 1_000_000u32)?;
        a.set_label(&mut wait)?;
        a.cmp(dword_ptr(rdi), n)?;
        a.jae(got)?;
        a.pause()?;
        a.dec(ecx)?;
        a.jnz(wait)?;
        self.exit(timeout)?;
        self.a.set_label(&mut got)
    }

    /// Append the shared subroutines and assemble the program at [`CODE`].
    pub fn assemble(mut self) -> Result<Vec<u8>, IcedError> {
        let a = &mut self.a;
        a.hlt()?;
        // hex: print the low r9d digits of r8 on COM1.
        let (mut next, mut digit) = (a.create_label(), a.create_label());
        a.set_label(&mut self.hex)?;
        a.mov(dx, COM1 as u32)?;
        a.mov(ecx, r9d)?;
        a.shl(ecx, 2)?;
        a.set_label(&mut next)?;
        a.sub(ecx, 4)?;
        a.mov(rax, r8)?;
        a.shr(rax, cl)?;
        a.and(eax, 0xfu32)?;
        a.cmp(eax, 10u32)?;
        a.jb(digit)?;
        a.add(eax, (b'a' - 10 - b'0') as u32)?;
        a.set_label(&mut digit)?;
        a.add(eax, b'0' as u32)?;
        a.out(dx, al)?;
        a.test(ecx, ecx)?;
        a.jnz(next)?;
        a.ret()?;
        a.assemble(CODE)
    }
}

/// The interrupt handler at [`HANDLER`]: count in the dword at [`DATA`], EOI, return.
pub fn interrupt_handler() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.push(rax)?;
    a.mov(rax, DATA)?;
    a.inc(dword_ptr(rax))?;
    a.mov(rax, LAPIC)?;
    a.mov(dword_ptr(rax + 0xb0), 0u32)?; // EOI register
    a.pop(rax)?;
    a.iretq()?;
    a.assemble(HANDLER)
}
