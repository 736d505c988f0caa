//! A tiny-guest harness for KVM tests (feature `test-utils`).
//!
//! [`TinyGuest`] creates a KVM VM with a little RAM, identity-maps the low 4 GiB with 2 MiB pages
//! (so MMIO addresses in the 32-bit hole are reachable), writes a GDT, loads a 64-bit program
//! assembled with iced-x86 at [`CODE_ADDR`] and puts the vCPU in long mode at its first
//! instruction. Every test shows the guest program it runs.
//!
//! ```no_run
//! use iced_x86::code_asm::*;
//! use vmkit_vcpu::test_utils::TinyGuest;
//!
//! let mut g = TinyGuest::new(|a| {
//!     a.mov(al, b'!' as u32)?;
//!     a.out(0x3f8, al)?;
//!     a.hlt()
//! })
//! .unwrap();
//! // run with vmkit_vcpu::run_until_exit(&mut g.vcpu, &my_bus, &stop, &mut stats)
//! ```

use iced_x86::IcedError;
use iced_x86::code_asm::CodeAssembler;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_memory::{GuestLayout, PageSize, PageTableBuilder, paging::flags};

use crate::{KvmVcpu, KvmVm, LongModeState};

/// Where the guest program is loaded and starts.
pub const CODE_ADDR: u64 = 0x10_0000;
/// Initial RSP (the stack grows down from here).
pub const STACK_TOP: u64 = 0x8_0000;
/// First page of the page-table area (0x9000..0x10000).
pub const PAGE_TABLE_ADDR: u64 = 0x9000;
/// A scratch data page a guest may use.
pub const DATA_ADDR: u64 = 0x20_0000;
/// Where [`TinyGuest::install_idt`] puts the IDT (256 16-byte gates).
pub const IDT_ADDR: u64 = 0x1000;
/// A page for interrupt handlers, free for tests.
pub const HANDLER_ADDR: u64 = 0x30_0000;
/// Attribute byte of a present 64-bit interrupt gate with DPL 0.
pub const GATE_DPL0: u8 = 0x8e;
/// Attribute byte of a present 64-bit interrupt gate with DPL 3.
pub const GATE_DPL3: u8 = 0xee;
/// Ring-3 code selector [`TinyGuest::enter_ring3`] loads (GDT index 5, RPL 3).
pub const USER_CS: u16 = 0x2b;
/// Ring-3 stack selector [`TinyGuest::enter_ring3`] loads (GDT index 6, RPL 3).
pub const USER_SS: u16 = 0x33;
/// Default guest RAM size.
pub const DEFAULT_RAM: u64 = 16 << 20;

/// Errors the harness reports.
pub type HarnessError = Box<dyn std::error::Error + Send + Sync>;

/// Assemble a 64-bit program that will run at `ip`.
pub fn assemble(
    ip: u64,
    program: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    program(&mut a)?;
    a.assemble(ip)
}

/// A KVM VM with one vCPU in 64-bit mode at the start of a loaded program.
pub struct TinyGuest {
    /// The VM.
    pub vm: KvmVm,
    /// vCPU 0.
    pub vcpu: KvmVcpu,
    /// Guest RAM (registered with the VM).
    pub mem: GuestMemoryMmap,
    /// The state applied to the vCPU.
    pub state: LongModeState,
}

impl TinyGuest {
    /// A guest with [`DEFAULT_RAM`] running `program` from [`CODE_ADDR`].
    pub fn new(
        program: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    ) -> Result<Self, HarnessError> {
        Self::with_code(DEFAULT_RAM, &assemble(CODE_ADDR, program)?)
    }

    /// A guest with `ram` bytes running machine code `code` from [`CODE_ADDR`].
    pub fn with_code(ram: u64, code: &[u8]) -> Result<Self, HarnessError> {
        Self::build(ram, code, |_| Ok(()))
    }

    /// Like [`new`](Self::new) on a VM with an in-kernel irqchip (LAPIC state can be saved;
    /// `hlt` no longer exits to userspace).
    pub fn with_irqchip(
        program: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    ) -> Result<Self, HarnessError> {
        Self::build(DEFAULT_RAM, &assemble(CODE_ADDR, program)?, |vm| {
            Ok(vm.create_irqchip()?)
        })
    }

    /// Like [`new`](Self::new), running `setup` on the VM before its vCPU exists — for VM-wide
    /// capabilities that must precede vCPU creation, such as KVM_CAP_SPLIT_IRQCHIP.
    pub fn with_vm_setup(
        program: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
        setup: impl FnOnce(&mut KvmVm) -> Result<(), HarnessError>,
    ) -> Result<Self, HarnessError> {
        Self::build(DEFAULT_RAM, &assemble(CODE_ADDR, program)?, setup)
    }

    /// Write `code` (assembled at `addr` by [`assemble`]) into guest memory.
    pub fn load(
        &self,
        addr: u64,
        program: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    ) -> Result<(), HarnessError> {
        self.mem
            .write_slice(&assemble(addr, program)?, GuestAddress(addr))?;
        Ok(())
    }

    /// Write a 64-bit IDT at [`IDT_ADDR`] with interrupt gates (CS 0x08) for `(vector, handler)`
    /// and point the vCPU's IDTR at it.
    pub fn install_idt(&mut self, handlers: &[(u8, u64)]) -> Result<(), HarnessError> {
        let gates: Vec<_> = handlers
            .iter()
            .map(|&(vector, h)| (vector, h, GATE_DPL0))
            .collect();
        self.install_gates(&gates)
    }

    /// Like [`install_idt`](Self::install_idt) with each gate's attribute byte given (P, DPL,
    /// type: [`GATE_DPL0`], [`GATE_DPL3`], or anything else a test needs).
    pub fn install_gates(&mut self, gates: &[(u8, u64, u8)]) -> Result<(), HarnessError> {
        use crate::VcpuSpecialRegisters;
        for &(vector, h, attr) in gates {
            let lo: u64 =
                (h & 0xffff) | (0x08 << 16) | (attr as u64) << 40 | ((h >> 16) & 0xffff) << 48;
            let hi: u64 = h >> 32;
            let at = IDT_ADDR + vector as u64 * 16;
            self.mem.write_obj(lo, GuestAddress(at))?;
            self.mem.write_obj(hi, GuestAddress(at + 8))?;
        }
        let mut sregs = self.vcpu.sregs()?;
        sregs.idt.base = IDT_ADDR;
        sregs.idt.limit = 256 * 16 - 1;
        self.vcpu.set_sregs(&sregs)?;
        Ok(())
    }

    /// Like [`new`](Self::new) with every page user-accessible (U/S = 1), so code can run at
    /// CPL 3 after [`enter_ring3`](Self::enter_ring3).
    pub fn with_user_pages(
        program: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    ) -> Result<Self, HarnessError> {
        Self::build_with(
            DEFAULT_RAM,
            &assemble(CODE_ADDR, program)?,
            flags::WRITABLE | flags::USER,
            |_| Ok(()),
        )
    }

    /// Put the vCPU at CPL 3: adds a DPL-3 64-bit code segment ([`USER_CS`]) and data segment
    /// ([`USER_SS`]) to the GDT, sets the TSS's RSP0 to [`STACK_TOP`] (the stack interrupts
    /// from ring 3 switch to), loads CS/SS with them and RIP/RSP with `rip`/`rsp`. The pages
    /// must be user-accessible ([`with_user_pages`](Self::with_user_pages)).
    pub fn enter_ring3(&mut self, rip: u64, rsp: u64) -> Result<(), HarnessError> {
        use crate::{Segment, VcpuRegisters, VcpuSpecialRegisters};
        let code = Segment {
            selector: USER_CS,
            dpl: 3,
            ..self.state.cs
        };
        let data = Segment {
            selector: USER_SS,
            dpl: 3,
            ..self.state.data
        };
        let gdt = self.state.gdt_base;
        let entries = self.state.gdt_entries().len() as u64;
        self.mem
            .write_obj(code.descriptor(), GuestAddress(gdt + entries * 8))?;
        self.mem
            .write_obj(data.descriptor(), GuestAddress(gdt + entries * 8 + 8))?;
        // 64-bit TSS: RSP0 at offset 4.
        self.mem
            .write_obj(STACK_TOP, GuestAddress(self.state.tr.base + 4))?;
        let mut sregs = self.vcpu.sregs()?;
        sregs.gdt.limit = ((entries + 2) * 8 - 1) as u16;
        sregs.cs = code.to_kvm();
        sregs.ss = data.to_kvm();
        self.vcpu.set_sregs(&sregs)?;
        let mut regs = self.vcpu.regs()?;
        regs.rip = rip;
        regs.rsp = rsp;
        self.vcpu.set_regs(&regs)?;
        Ok(())
    }

    fn build(
        ram: u64,
        code: &[u8],
        setup: impl FnOnce(&mut KvmVm) -> Result<(), HarnessError>,
    ) -> Result<Self, HarnessError> {
        Self::build_with(ram, code, flags::WRITABLE, setup)
    }

    fn build_with(
        ram: u64,
        code: &[u8],
        leaf_flags: u64,
        setup: impl FnOnce(&mut KvmVm) -> Result<(), HarnessError>,
    ) -> Result<Self, HarnessError> {
        let layout = GuestLayout::builder().ram_size(ram).build()?;
        let mem = layout.create_memory()?;
        let mut pt = PageTableBuilder::new(&mem, PAGE_TABLE_ADDR, 0x7000)?;
        pt.identity_map(0, 4 << 30, PageSize::Size2M, leaf_flags)?;
        mem.write_slice(code, GuestAddress(CODE_ADDR))?;
        let state = LongModeState::flat_64(pt.cr3(), CODE_ADDR, STACK_TOP);
        state.write_gdt(&mem)?;
        let mut vm = KvmVm::new()?;
        setup(&mut vm)?;
        vm.register_memory(&mem)?;
        let mut vcpu = vm.create_vcpu(0)?;
        state.apply(&mut vcpu)?;
        Ok(Self {
            vm,
            vcpu,
            mem,
            state,
        })
    }
}
