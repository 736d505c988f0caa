//! Plain-data CPU state for entering 64-bit long mode directly (no firmware, no mode switches);
//! the real-mode and 32-bit entry states are in [`entry`](crate::entry).
//!
//! [`LongModeState`] holds what the guest needs at its first instruction: a GDT, flat 64-bit code
//! and data segments, a TSS, CR0/CR3/CR4/EFER, RFLAGS, RIP and RSP. It is serialisable data; a
//! backend applies it with [`LongModeState::apply`].
//!
//! ```
//! use vmkit_vcpu::LongModeState;
//!
//! let s = LongModeState::flat_64(0x9000, 0x10_0000, 0x8_0000);
//! assert_eq!(s.cs.selector, 0x08);
//! assert!(s.cs.l);
//! // GDT entry for the code segment: present, DPL 0, execute/read, L = 1.
//! assert_eq!(s.gdt_entries()[1], 0x00af_9b00_0000_ffff);
//! ```

use kvm_bindings::{kvm_segment, kvm_sregs};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::entry::GeneralRegisters;
use crate::{Error, VcpuRegisters, VcpuSpecialRegisters};

/// CR0.PE — protection enable.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.ET — extension type (always 1).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NE — native x87 error reporting.
pub const CR0_NE: u64 = 1 << 5;
/// CR0.PG — paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE — physical address extension (required for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME — long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA — long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1, reserved, always 1.
pub const RFLAGS_RESERVED_1: u64 = 1 << 1;

/// A segment register (selector + hidden descriptor cache), as plain data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit in bytes (already scaled by G).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Type field (4 bits).
    pub type_: u8,
    /// S: code/data (true) or system (false) descriptor.
    pub s: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// P: present.
    pub present: bool,
    /// AVL: available to software.
    pub avl: bool,
    /// L: 64-bit code segment.
    pub l: bool,
    /// D/B: default operation size.
    pub db: bool,
    /// G: granularity (limit in 4 KiB units in the descriptor).
    pub g: bool,
}

impl Segment {
    /// Encode as an 8-byte GDT descriptor (SDM vol. 3A §3.4.5). For system descriptors in long mode
    /// this is the low half; the high half holds base bits 63:32.
    pub fn descriptor(&self) -> u64 {
        let limit = if self.g { self.limit >> 12 } else { self.limit } as u64;
        let base = self.base;
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | ((self.type_ as u64 & 0xf) << 40)
            | ((self.s as u64) << 44)
            | ((self.dpl as u64 & 3) << 45)
            | ((self.present as u64) << 47)
            | (((limit >> 16) & 0xf) << 48)
            | ((self.avl as u64) << 52)
            | ((self.l as u64) << 53)
            | ((self.db as u64) << 54)
            | ((self.g as u64) << 55)
            | (((base >> 24) & 0xff) << 56)
    }

    /// Convert to KVM's `kvm_segment`.
    pub fn to_kvm(&self) -> kvm_segment {
        kvm_segment {
            base: self.base,
            limit: self.limit,
            selector: self.selector,
            type_: self.type_,
            present: self.present as u8,
            dpl: self.dpl,
            db: self.db as u8,
            s: self.s as u8,
            l: self.l as u8,
            g: self.g as u8,
            avl: self.avl as u8,
            unusable: (!self.present) as u8,
            padding: 0,
        }
    }

    /// Convert from KVM's `kvm_segment`.
    pub fn from_kvm(k: &kvm_segment) -> Self {
        Self {
            base: k.base,
            limit: k.limit,
            selector: k.selector,
            type_: k.type_,
            s: k.s != 0,
            dpl: k.dpl,
            present: k.present != 0,
            avl: k.avl != 0,
            l: k.l != 0,
            db: k.db != 0,
            g: k.g != 0,
        }
    }
}

/// CPU state for a guest that starts in 64-bit mode at CPL 0 with flat segments.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LongModeState {
    /// GDT base (guest physical = guest virtual under an identity map).
    pub gdt_base: u64,
    /// 64-bit code segment (selector 0x08).
    pub cs: Segment,
    /// Data segment loaded into DS, ES, SS, FS, GS (selector 0x10).
    pub data: Segment,
    /// Task register (selector 0x18, a busy 64-bit TSS).
    pub tr: Segment,
    /// CR0.
    pub cr0: u64,
    /// CR3: the PML4's physical address.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// First instruction.
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// The other general registers: the boot protocol's arguments (RSI = `boot_params` for
    /// Linux). Their `rip`, `rsp` and `rflags` are ignored: the fields above are applied.
    #[serde(default)]
    pub args: GeneralRegisters,
}

impl LongModeState {
    /// Flat 64-bit state: CS = 0x08 (L=1), data = 0x10, TR = 0x18, PE|PG|ET|NE, PAE, LME|LMA,
    /// interrupts disabled. The GDT is placed at `gdt_base` when [`write_gdt`](Self::write_gdt)
    /// runs.
    pub fn flat_64(cr3: u64, rip: u64, rsp: u64) -> Self {
        let code = Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x08,
            type_: 0xb, // execute/read, accessed
            s: true,
            dpl: 0,
            present: true,
            avl: false,
            l: true,
            db: false,
            g: true,
        };
        let data = Segment {
            selector: 0x10,
            type_: 0x3,
            l: false,
            db: true,
            ..code
        };
        let tr = Segment {
            base: 0,
            limit: 0x67,
            selector: 0x18,
            type_: 0xb, // busy 64-bit TSS
            s: false,
            dpl: 0,
            present: true,
            avl: false,
            l: false,
            db: false,
            g: false,
        };
        Self {
            gdt_base: 0x500,
            cs: code,
            data,
            tr,
            cr0: CR0_PE | CR0_ET | CR0_NE | CR0_PG,
            cr3,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA,
            rflags: RFLAGS_RESERVED_1,
            rip,
            rsp,
            args: GeneralRegisters::default(),
        }
    }

    /// The Linux 64-bit boot protocol (Documentation/arch/x86/boot.rst, "64-bit boot
    /// protocol"): [`flat_64`](Self::flat_64) with RSI = the physical address of `boot_params`
    /// (CS 0x08 and DS/ES/SS 0x10 are not `__BOOT_CS`/`__BOOT_DS`, which the 64-bit protocol
    /// does not require: it only asks for flat 4 GiB segments with a valid GDT).
    pub fn linux_64(cr3: u64, rip: u64, rsp: u64, boot_params: u64) -> Self {
        let mut s = Self::flat_64(cr3, rip, rsp);
        s.args.rsi = boot_params;
        s
    }

    /// The general registers [`apply`](Self::apply) writes: `args` with RIP, RSP, RFLAGS.
    pub fn general_registers(&self) -> GeneralRegisters {
        GeneralRegisters {
            rip: self.rip,
            rsp: self.rsp,
            rflags: self.rflags,
            ..self.args
        }
    }

    /// GDT contents: null, code, data, and the two halves of the TSS descriptor.
    pub fn gdt_entries(&self) -> [u64; 5] {
        [
            0,
            self.cs.descriptor(),
            self.data.descriptor(),
            self.tr.descriptor(),
            self.tr.base >> 32,
        ]
    }

    /// GDT limit (size − 1) in bytes.
    pub fn gdt_limit(&self) -> u16 {
        (self.gdt_entries().len() * 8 - 1) as u16
    }

    /// Write the GDT into guest memory at `gdt_base`.
    pub fn write_gdt<M: GuestMemory + ?Sized>(&self, mem: &M) -> Result<(), Error> {
        write_gdt(mem, self.gdt_base, &self.gdt_entries())
    }

    /// Fill `sregs` (keeping fields this state does not own, such as the APIC base).
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
        sregs.gdt.limit = self.gdt_limit();
        sregs.cr0 = self.cr0;
        sregs.cr3 = self.cr3;
        sregs.cr4 = self.cr4;
        sregs.efer = self.efer;
    }

    /// Apply to a vCPU: special registers, then every general register
    /// ([`general_registers`](Self::general_registers)).
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
        vcpu.set_general_registers(&self.general_registers())
    }
}

/// Write the descriptors `entries` as a GDT at guest-physical `base` (8 bytes each): what
/// every entry state's `write_gdt` does.
pub(crate) fn write_gdt<M: GuestMemory + ?Sized>(
    mem: &M,
    base: u64,
    entries: &[u64],
) -> Result<(), Error> {
    for (i, e) in entries.iter().enumerate() {
        let gpa = base + i as u64 * 8;
        mem.write_obj(*e, GuestAddress(gpa))
            .map_err(|source| Error::Memory { gpa, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_sdm_encoding() {
        let s = LongModeState::flat_64(0, 0, 0);
        // Well-known flat descriptors: 64-bit code 0x00af9b000000ffff, data 0x00cf93000000ffff.
        assert_eq!(s.cs.descriptor(), 0x00af_9b00_0000_ffff);
        assert_eq!(s.data.descriptor(), 0x00cf_9300_0000_ffff);
        assert_eq!(s.tr.descriptor(), 0x0000_8b00_0000_0067);
        assert_eq!(s.gdt_limit(), 39);
    }

    #[test]
    fn segment_kvm_round_trip() {
        let s = LongModeState::flat_64(0, 0, 0);
        for seg in [s.cs, s.data, s.tr] {
            assert_eq!(Segment::from_kvm(&seg.to_kvm()), seg);
        }
    }
}
