//! The six VMCS areas as plain data (Intel SDM vol. 3C ch. 25).

use serde::{Deserialize, Serialize};

use crate::state::Segment;

/// Segment access rights, "access-rights" format of SDM §25.4.1 table 25-2.
pub mod ar {
    /// Bits 3:0: segment type.
    pub const TYPE_MASK: u32 = 0xf;
    /// Bit 4: S — descriptor type (0 = system, 1 = code or data).
    pub const S: u32 = 1 << 4;
    /// Bits 6:5: DPL.
    pub const DPL_SHIFT: u32 = 5;
    /// Bit 7: P — present.
    pub const P: u32 = 1 << 7;
    /// Bit 12: AVL.
    pub const AVL: u32 = 1 << 12;
    /// Bit 13: L — 64-bit mode active (CS only).
    pub const L: u32 = 1 << 13;
    /// Bit 14: D/B — default operation size.
    pub const DB: u32 = 1 << 14;
    /// Bit 15: G — granularity.
    pub const G: u32 = 1 << 15;
    /// Bit 16: segment unusable.
    pub const UNUSABLE: u32 = 1 << 16;
    /// Reserved bits 11:8 and 31:17.
    pub const RESERVED: u32 = 0xf00 | 0xfffe_0000;
}

/// A guest segment register as the VMCS holds it: selector, base, limit and access rights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmcsSegment {
    /// Selector.
    pub selector: u16,
    /// Base address.
    pub base: u64,
    /// Limit in bytes.
    pub limit: u32,
    /// Access rights ([`ar`] format).
    pub access_rights: u32,
}

impl VmcsSegment {
    /// The unusable segment (access rights bit 16 set).
    pub const UNUSABLE: VmcsSegment = VmcsSegment {
        selector: 0,
        base: 0,
        limit: 0,
        access_rights: ar::UNUSABLE,
    };

    /// Segment type (access rights bits 3:0).
    pub const fn type_(&self) -> u8 {
        (self.access_rights & ar::TYPE_MASK) as u8
    }
    /// DPL (bits 6:5).
    pub const fn dpl(&self) -> u8 {
        ((self.access_rights >> ar::DPL_SHIFT) & 3) as u8
    }
    /// Requested privilege level: selector bits 1:0.
    pub const fn rpl(&self) -> u8 {
        (self.selector & 3) as u8
    }
    /// Table indicator: selector bit 2.
    pub const fn ti(&self) -> bool {
        self.selector & 4 != 0
    }
    /// Bit 16: unusable.
    pub const fn unusable(&self) -> bool {
        self.access_rights & ar::UNUSABLE != 0
    }
    /// True if access-rights bit `bit` is set.
    pub const fn has(&self, bit: u32) -> bool {
        self.access_rights & bit != 0
    }

    /// From the crate's [`Segment`] (a non-present segment becomes unusable).
    pub fn from_segment(s: &Segment) -> Self {
        let access_rights = (s.type_ as u32 & ar::TYPE_MASK)
            | if s.s { ar::S } else { 0 }
            | ((s.dpl as u32 & 3) << ar::DPL_SHIFT)
            | if s.present { ar::P } else { ar::UNUSABLE }
            | if s.avl { ar::AVL } else { 0 }
            | if s.l { ar::L } else { 0 }
            | if s.db { ar::DB } else { 0 }
            | if s.g { ar::G } else { 0 };
        Self {
            selector: s.selector,
            base: s.base,
            limit: s.limit,
            access_rights,
        }
    }

    /// To the crate's [`Segment`].
    pub fn to_segment(&self) -> Segment {
        Segment {
            base: self.base,
            limit: self.limit,
            selector: self.selector,
            type_: self.type_(),
            s: self.has(ar::S),
            dpl: self.dpl(),
            present: self.has(ar::P),
            avl: self.has(ar::AVL),
            l: self.has(ar::L),
            db: self.has(ar::DB),
            g: self.has(ar::G),
        }
    }
}

/// GDTR or IDTR: base and limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit (the VMCS field is 32 bits; bits 31:16 must be zero).
    pub limit: u32,
}

/// General-purpose registers other than RSP (which is in the guest-state area). VMX leaves
/// them to the VMM's software; the model keeps them next to the guest-state area so one value
/// describes the whole guest CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct GeneralRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

/// Guest MSRs that VMX switches through the VM-entry/VM-exit MSR-load lists rather than
/// dedicated VMCS fields (SDM §25.7.2, §25.8.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMsrs {
    /// IA32_STAR (0xc000_0081).
    pub star: u64,
    /// IA32_LSTAR (0xc000_0082).
    pub lstar: u64,
    /// IA32_CSTAR (0xc000_0083).
    pub cstar: u64,
    /// IA32_FMASK (0xc000_0084).
    pub fmask: u64,
    /// IA32_KERNEL_GS_BASE (0xc000_0102).
    pub kernel_gs_base: u64,
    /// IA32_TSC (0x10).
    pub tsc: u64,
    /// IA32_APIC_BASE (0x1b).
    pub apic_base: u64,
}

/// Guest-state area (SDM §25.4), plus the register state VMX leaves to software
/// ([`GeneralRegisters`], CR2, CR8, DR0–DR3/DR6, XCR0, [`GuestMsrs`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct GuestState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub dr7: u64,
    pub rsp: u64,
    pub rip: u64,
    pub rflags: u64,
    pub es: VmcsSegment,
    pub cs: VmcsSegment,
    pub ss: VmcsSegment,
    pub ds: VmcsSegment,
    pub fs: VmcsSegment,
    pub gs: VmcsSegment,
    pub ldtr: VmcsSegment,
    pub tr: VmcsSegment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub ia32_debugctl: u64,
    pub ia32_sysenter_cs: u32,
    pub ia32_sysenter_esp: u64,
    pub ia32_sysenter_eip: u64,
    pub ia32_perf_global_ctrl: u64,
    pub ia32_pat: u64,
    pub ia32_efer: u64,
    pub smbase: u32,
    /// Activity state (SDM §25.4.2): 0 active, 1 HLT, 2 shutdown, 3 wait-for-SIPI.
    pub activity_state: u32,
    /// Interruptibility state (SDM §25.4.2 table 25-3).
    pub interruptibility_state: u32,
    pub pending_debug_exceptions: u64,
    pub vmcs_link_pointer: u64,
    pub vmx_preemption_timer_value: u32,
    pub pdpte0: u64,
    pub pdpte1: u64,
    pub pdpte2: u64,
    pub pdpte3: u64,
    pub interrupt_status: u16,
    /// Not in the VMCS: general-purpose registers.
    pub regs: GeneralRegisters,
    /// Not in the VMCS: CR2.
    pub cr2: u64,
    /// Not in the VMCS: CR8 (TPR).
    pub cr8: u64,
    /// Not in the VMCS: DR0–DR3.
    pub dr0_3: [u64; 4],
    /// Not in the VMCS: DR6.
    pub dr6: u64,
    /// Not in the VMCS: XCR0.
    pub xcr0: u64,
    /// Not in the VMCS: MSRs switched by MSR-load lists.
    pub msrs: GuestMsrs,
}

/// Host-state area (SDM §25.5). KVM owns the host state; the model keeps it for completeness
/// and for code written against VMX.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct HostState {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub rsp: u64,
    pub rip: u64,
    pub es_selector: u16,
    pub cs_selector: u16,
    pub ss_selector: u16,
    pub ds_selector: u16,
    pub fs_selector: u16,
    pub gs_selector: u16,
    pub tr_selector: u16,
    pub fs_base: u64,
    pub gs_base: u64,
    pub tr_base: u64,
    pub gdtr_base: u64,
    pub idtr_base: u64,
    pub ia32_sysenter_cs: u32,
    pub ia32_sysenter_esp: u64,
    pub ia32_sysenter_eip: u64,
    pub ia32_pat: u64,
    pub ia32_efer: u64,
    pub ia32_perf_global_ctrl: u64,
}

/// VM-execution control fields (SDM §25.6).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct ExecutionControls {
    pub virtual_processor_id: u16,
    /// Pin-based controls ([`pin`](super::controls::pin)).
    pub pin_based: u32,
    /// Primary processor-based controls ([`primary`](super::controls::primary)).
    pub primary_processor_based: u32,
    /// Secondary processor-based controls ([`secondary`](super::controls::secondary)).
    pub secondary_processor_based: u32,
    /// Exception bitmap: bit n set = exception n causes a VM exit.
    pub exception_bitmap: u32,
    pub page_fault_error_code_mask: u32,
    pub page_fault_error_code_match: u32,
    pub io_bitmap_a: u64,
    pub io_bitmap_b: u64,
    pub msr_bitmap_address: u64,
    pub tsc_offset: u64,
    pub virtual_apic_page_addr: u64,
    pub ept_pointer: u64,
    pub cr0_guest_host_mask: u64,
    pub cr4_guest_host_mask: u64,
    pub cr0_read_shadow: u64,
    pub cr4_read_shadow: u64,
    pub cr3_target_count: u32,
    pub cr3_target_value0: u64,
    pub cr3_target_value1: u64,
    pub cr3_target_value2: u64,
    pub cr3_target_value3: u64,
    pub tpr_threshold: u32,
    /// The contents of the MSR-bitmap page (SDM §25.6.9), which real hardware reads from
    /// `msr_bitmap_address`.
    pub msr_bitmap: super::MsrBitmap,
}

/// VM-exit control fields (SDM §25.7).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct ExitControls {
    /// Exit controls ([`exit`](super::controls::exit)).
    pub controls: u32,
    pub msr_store_count: u32,
    pub msr_store_addr: u64,
    pub msr_load_count: u32,
    pub msr_load_addr: u64,
}

/// VM-entry control fields (SDM §25.8), including event injection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct EntryControls {
    /// Entry controls ([`entry`](super::controls::entry)).
    pub controls: u32,
    pub msr_load_count: u32,
    pub msr_load_addr: u64,
    /// VM-entry interruption-information field (SDM §25.8.3 table 25-17).
    pub interruption_info: u32,
    pub exception_error_code: u32,
    pub instruction_length: u32,
}

/// VM-exit information fields (SDM §25.9), read-only for [`Vmcs::write`](super::Vmcs::write).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct ExitInfo {
    pub vm_instruction_error: u32,
    /// Exit reason: basic reason in bits 15:0, VM-entry failure in bit 31.
    pub exit_reason: u32,
    pub exit_qualification: u64,
    pub guest_linear_address: u64,
    pub guest_physical_address: u64,
    pub interruption_info: u32,
    pub interruption_error_code: u32,
    pub idt_vectoring_info: u32,
    pub idt_vectoring_error_code: u32,
    pub instruction_length: u32,
    pub instruction_info: u32,
    pub io_rcx: u64,
    pub io_rsi: u64,
    pub io_rdi: u64,
    pub io_rip: u64,
}
