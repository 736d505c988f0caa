//! Entry states for the boot protocols that start a guest without firmware: real mode, flat
//! 32-bit protected mode (multiboot v1, PVH, Linux's 32-bit protocol) and — in
//! [`state`](crate::state) — 64-bit long mode.
//!
//! Each state is plain serde data holding *every* register its protocol defines, including the
//! general registers that carry the protocol's arguments ([`GeneralRegisters`], vmkit's own
//! type, so a VMM needs no kvm-bindings dependency to set EAX/EBX). `apply` writes them all;
//! registers a protocol leaves undefined are zero.
//!
//! ```
//! use vmkit_vcpu::entry::{MULTIBOOT_BOOTLOADER_MAGIC, ProtectedModeState};
//!
//! let s = ProtectedModeState::multiboot(0x10_0000, 0x9000);
//! assert_eq!(s.regs.rax, u64::from(MULTIBOOT_BOOTLOADER_MAGIC));
//! assert_eq!(s.regs.rbx, 0x9000);
//! assert_eq!(s.regs.rip, 0x10_0000);
//! assert!(s.cs.db && !s.cs.l); // 32-bit code
//! ```

use kvm_bindings::{kvm_regs, kvm_sregs};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemory;

use crate::state::{CR0_ET, CR0_PE, RFLAGS_RESERVED_1, Segment, write_gdt};
use crate::{Error, VcpuRegisters, VcpuSpecialRegisters};

/// EAX at a multiboot v1 kernel's entry (Multiboot Specification 0.6.96 §3.2).
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2bad_b002;

/// The general registers, RIP and RFLAGS as vmkit data (the `kvm_regs` fields, without the
/// kvm-bindings type in the caller's code). Read and write them with
/// [`VcpuRegisters::general_registers`] / [`VcpuRegisters::set_general_registers`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GeneralRegisters {
    /// RAX.
    pub rax: u64,
    /// RBX.
    pub rbx: u64,
    /// RCX.
    pub rcx: u64,
    /// RDX.
    pub rdx: u64,
    /// RSI.
    pub rsi: u64,
    /// RDI.
    pub rdi: u64,
    /// RSP.
    pub rsp: u64,
    /// RBP.
    pub rbp: u64,
    /// R8.
    pub r8: u64,
    /// R9.
    pub r9: u64,
    /// R10.
    pub r10: u64,
    /// R11.
    pub r11: u64,
    /// R12.
    pub r12: u64,
    /// R13.
    pub r13: u64,
    /// R14.
    pub r14: u64,
    /// R15.
    pub r15: u64,
    /// RIP.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
}

impl GeneralRegisters {
    /// Convert to KVM's `kvm_regs`.
    pub fn to_kvm(&self) -> kvm_regs {
        kvm_regs {
            rax: self.rax,
            rbx: self.rbx,
            rcx: self.rcx,
            rdx: self.rdx,
            rsi: self.rsi,
            rdi: self.rdi,
            rsp: self.rsp,
            rbp: self.rbp,
            r8: self.r8,
            r9: self.r9,
            r10: self.r10,
            r11: self.r11,
            r12: self.r12,
            r13: self.r13,
            r14: self.r14,
            r15: self.r15,
            rip: self.rip,
            rflags: self.rflags,
        }
    }

    /// Convert from KVM's `kvm_regs`.
    pub fn from_kvm(r: &kvm_regs) -> Self {
        Self {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: r.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip: r.rip,
            rflags: r.rflags,
        }
    }
}

/// A real-mode code or data segment: base = selector · 16, limit 64 KiB (SDM vol. 3A §20.1.1).
pub fn real_mode_segment(selector: u16, code: bool) -> Segment {
    Segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        s: true,
        dpl: 0,
        present: true,
        avl: false,
        l: false,
        db: false,
        g: false,
    }
}

/// The system segments a state loads besides its code/data segments: TR must be a usable TSS
/// for VM entry (SDM vol. 3C §27.3.1.2) even when the guest never switches tasks; LDTR is
/// unusable.
fn tss(selector: u16, limit: u32, busy_type: u8) -> Segment {
    Segment {
        base: 0,
        limit,
        selector,
        type_: busy_type,
        s: false,
        dpl: 0,
        present: true,
        avl: false,
        l: false,
        db: false,
        g: false,
    }
}

fn write_sregs_common(sregs: &mut kvm_sregs, cr0: u64) {
    sregs.ldt = Segment::default().to_kvm(); // not present = unusable
    sregs.cr0 = cr0;
    sregs.cr2 = 0;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

/// Real mode at `cs:ip` (the 16-bit Linux boot protocol, option ROMs, test programs):
/// CR0 = ET (no protection, no paging), the IVT at 0 (IDTR base 0, limit 0x3ff), each segment
/// register with base = selector · 16 and a 64 KiB limit, interrupts disabled.
///
/// ```
/// use vmkit_vcpu::entry::RealModeState;
/// let s = RealModeState::new(0x1020, 0x0000, 0x1000, 0xfff0);
/// assert_eq!(s.cs.base, 0x10200);
/// assert_eq!((s.ss.base, s.regs.rsp), (0x10000, 0xfff0));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealModeState {
    /// CS.
    pub cs: Segment,
    /// DS, ES, FS and GS.
    pub data: Segment,
    /// SS.
    pub ss: Segment,
    /// General registers, IP (in `rip`, relative to CS) and FLAGS.
    pub regs: GeneralRegisters,
}

impl RealModeState {
    /// Start at `cs:ip` with DS = ES = FS = GS = SS = `data` and SP = `sp`; other registers 0.
    pub fn new(cs: u16, ip: u16, data: u16, sp: u16) -> Self {
        Self {
            cs: real_mode_segment(cs, true),
            data: real_mode_segment(data, false),
            ss: real_mode_segment(data, false),
            regs: GeneralRegisters {
                rip: u64::from(ip),
                rsp: u64::from(sp),
                rflags: RFLAGS_RESERVED_1,
                ..Default::default()
            },
        }
    }

    /// Fill `sregs` (keeping the APIC base and CR8).
    pub fn fill_sregs(&self, sregs: &mut kvm_sregs) {
        sregs.cs = self.cs.to_kvm();
        let data = self.data.to_kvm();
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = self.ss.to_kvm();
        // A busy TSS, base 0 limit 0xffff, as KVM's reset state has it (VM entry wants a
        // busy TSS in TR even in real mode).
        sregs.tr = tss(0, 0xffff, 0xb).to_kvm();
        sregs.gdt.base = 0;
        sregs.gdt.limit = 0xffff;
        sregs.idt.base = 0;
        sregs.idt.limit = 0x3ff;
        write_sregs_common(sregs, CR0_ET);
    }

    /// Apply to a vCPU: special registers, then every general register.
    ///
    /// # Errors
    /// The backend's register accessors fail.
    pub fn apply<V>(&self, vcpu: &mut V) -> Result<(), Error>
    where
        V: VcpuRegisters + VcpuSpecialRegisters + ?Sized,
    {
        let mut sregs = vcpu.sregs()?;
        self.fill_sregs(&mut sregs);
        vcpu.set_sregs(&sregs)?;
        vcpu.set_general_registers(&self.regs)
    }
}

/// Selector of [`ProtectedModeState`]'s code segment: `__BOOT_CS` of the Linux boot protocol
/// (Documentation/arch/x86/boot.rst, "32-bit boot protocol"); multiboot and PVH accept any.
pub const FLAT32_CS: u16 = 0x10;
/// Selector of its data segments (`__BOOT_DS`).
pub const FLAT32_DS: u16 = 0x18;
/// Selector of its TSS.
pub const FLAT32_TR: u16 = 0x20;

/// Flat 32-bit protected mode without paging, the entry state of multiboot v1 (Multiboot
/// Specification §3.2 "Machine state"), PVH (Xen `arch-x86/hvm/start_info.h`, "the entry point
/// … in 32-bit non-paged protected mode") and Linux's 32-bit boot protocol: CR0 = PE | ET,
/// CR4 = EFER = 0, CS a 32-bit execute/read segment and DS/ES/FS/GS/SS 32-bit read/write
/// segments, all base 0 limit 4 GiB, TR a 32-bit busy TSS with base 0 and limit 0x67 (PVH),
/// EFLAGS with IF, TF and VM clear. The GDT (null, null, code 0x10, data 0x18, TSS 0x20) is
/// written by [`write_gdt`](Self::write_gdt); the protocols allow the guest to find no valid
/// GDT or IDT, but one is there for the guest that reloads a segment register.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectedModeState {
    /// GDT base (guest physical).
    pub gdt_base: u64,
    /// Code segment ([`FLAT32_CS`]).
    pub cs: Segment,
    /// Data segment loaded into DS, ES, FS, GS and SS ([`FLAT32_DS`]).
    pub data: Segment,
    /// Task register ([`FLAT32_TR`]).
    pub tr: Segment,
    /// General registers: the protocol's arguments, EIP and EFLAGS.
    pub regs: GeneralRegisters,
}

impl ProtectedModeState {
    /// Flat 32-bit state at `eip` with the GDT at 0x500; every general register 0.
    pub fn flat_32(eip: u32) -> Self {
        let code = Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: FLAT32_CS,
            type_: 0xb,
            s: true,
            dpl: 0,
            present: true,
            avl: false,
            l: false,
            db: true,
            g: true,
        };
        Self {
            gdt_base: 0x500,
            cs: code,
            data: Segment {
                selector: FLAT32_DS,
                type_: 0x3,
                ..code
            },
            tr: tss(FLAT32_TR, 0x67, 0xb),
            regs: GeneralRegisters {
                rip: u64::from(eip),
                rflags: RFLAGS_RESERVED_1,
                ..Default::default()
            },
        }
    }

    /// Multiboot v1 entry (§3.2): EAX = [`MULTIBOOT_BOOTLOADER_MAGIC`], EBX = the physical
    /// address of the multiboot information structure. ESP is undefined by the protocol (the
    /// kernel sets its own stack); it is 0 here.
    pub fn multiboot(entry: u32, info: u32) -> Self {
        let mut s = Self::flat_32(entry);
        s.regs.rax = u64::from(MULTIBOOT_BOOTLOADER_MAGIC);
        s.regs.rbx = u64::from(info);
        s
    }

    /// PVH entry (Xen `start_info.h`): EBX = the physical address of the `hvm_start_info`.
    pub fn pvh(entry: u32, start_info: u32) -> Self {
        let mut s = Self::flat_32(entry);
        s.regs.rbx = u64::from(start_info);
        s
    }

    /// Linux 32-bit boot protocol: ESI = the physical address of `boot_params`; EBP, EDI and
    /// EBX zero.
    pub fn linux_32(entry: u32, boot_params: u32) -> Self {
        let mut s = Self::flat_32(entry);
        s.regs.rsi = u64::from(boot_params);
        s
    }

    /// GDT contents: two null entries (index 1 is unused, as in Linux's boot GDT), code, data,
    /// TSS.
    pub fn gdt_entries(&self) -> [u64; 5] {
        [
            0,
            0,
            self.cs.descriptor(),
            self.data.descriptor(),
            self.tr.descriptor(),
        ]
    }

    /// Write the GDT into guest memory at `gdt_base`.
    ///
    /// # Errors
    /// [`Error::Memory`] when the GDT does not fit in `mem`.
    pub fn write_gdt<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), Error> {
        write_gdt(mem, self.gdt_base, &self.gdt_entries())
    }

    /// Fill `sregs` (keeping the APIC base and CR8).
    pub fn fill_sregs(&self, sregs: &mut kvm_sregs) {
        sregs.cs = self.cs.to_kvm();
        let data = self.data.to_kvm();
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = self.tr.to_kvm();
        sregs.gdt.base = self.gdt_base;
        sregs.gdt.limit = (self.gdt_entries().len() * 8 - 1) as u16;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        write_sregs_common(sregs, CR0_PE | CR0_ET);
    }

    /// Apply to a vCPU: special registers, then every general register.
    ///
    /// # Errors
    /// The backend's register accessors fail.
    pub fn apply<V>(&self, vcpu: &mut V) -> Result<(), Error>
    where
        V: VcpuRegisters + VcpuSpecialRegisters + ?Sized,
    {
        let mut sregs = vcpu.sregs()?;
        self.fill_sregs(&mut sregs);
        vcpu.set_sregs(&sregs)?;
        vcpu.set_general_registers(&self.regs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_32_descriptors_match_the_sdm_encoding() {
        let s = ProtectedModeState::flat_32(0);
        // The well-known flat 32-bit descriptors (Linux's boot GDT): code 0x00cf9b000000ffff,
        // data 0x00cf93000000ffff; a busy 32-bit TSS with limit 0x67.
        assert_eq!(s.gdt_entries()[2], 0x00cf_9b00_0000_ffff);
        assert_eq!(s.gdt_entries()[3], 0x00cf_9300_0000_ffff);
        assert_eq!(s.gdt_entries()[4], 0x0000_8b00_0000_0067);
        assert_eq!(s.cs.selector as usize / 8, 2);
        assert_eq!(s.data.selector as usize / 8, 3);
        assert_eq!(s.tr.selector as usize / 8, 4);
    }

    #[test]
    fn protocol_registers() {
        let pvh = ProtectedModeState::pvh(0x1000, 0x6000);
        assert_eq!(
            (pvh.regs.rbx, pvh.regs.rax, pvh.regs.rip),
            (0x6000, 0, 0x1000)
        );
        let linux = ProtectedModeState::linux_32(0x10_0000, 0x7000);
        assert_eq!((linux.regs.rsi, linux.regs.rbx), (0x7000, 0));
        // IF (bit 9), TF (bit 8) and VM (bit 17) clear.
        assert_eq!(linux.regs.rflags, 2);
        let r = GeneralRegisters {
            rax: 1,
            r15: 15,
            rip: 3,
            ..Default::default()
        };
        assert_eq!(GeneralRegisters::from_kvm(&r.to_kvm()), r);
    }
}
