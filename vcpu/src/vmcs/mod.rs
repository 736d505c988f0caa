//! A VMCS model: the six areas of Intel's virtual-machine control structure as plain data
//! (Intel SDM vol. 3C ch. 25), addressable by architectural field encoding (appendix B).
//!
//! The [KVM backend](crate::kvm_map) maps the guest-state area to and from KVM's register
//! structures and expresses the execution controls it can with KVM mechanisms, so code written
//! in VMCS terms runs on KVM. [`checks`] implements the guest-state checks of SDM §27.3.1;
//! [`exit_reason`] the basic exit reasons and exit-qualification decoders.
//!
//! ```
//! use vmkit_vcpu::vmcs::{Vmcs, VmcsField, VmcsError, checks::check_guest_state};
//!
//! // Flat 64-bit guest: CR3 = 0x9000, RIP = 0x10_0000, RSP = 0x8_0000.
//! let mut vmcs = Vmcs::flat_64(0x9000, 0x10_0000, 0x8_0000);
//! assert_eq!(vmcs.read(VmcsField::GUEST_RIP)?, 0x10_0000);
//! vmcs.write(VmcsField::GUEST_RSP, 0x7_0000)?;
//! assert_eq!(vmcs.guest.rsp, 0x7_0000);
//! // Widths are checked: a selector is 16 bits.
//! assert!(matches!(
//!     vmcs.write(VmcsField::GUEST_CS_SELECTOR, 0x1_0000),
//!     Err(VmcsError::ValueTooWide { .. })
//! ));
//! // 64-bit fields can be accessed by halves (encoding bit 0 = high).
//! vmcs.write(VmcsField::GUEST_IA32_PAT, 0x0007_0406_0007_0406)?;
//! assert_eq!(vmcs.read(VmcsField(VmcsField::GUEST_IA32_PAT.0 | 1))?, 0x0007_0406);
//! // Exit information is read-only.
//! assert!(vmcs.write(VmcsField::VM_EXIT_REASON, 12).is_err());
//! // The state passes the SDM §27.3.1 guest-state checks.
//! check_guest_state(&vmcs).unwrap();
//! # Ok::<(), VmcsError>(())
//! ```

mod areas;
pub mod checks;
pub mod controls;
pub mod delivery;
pub mod exit_reason;
mod field;
pub mod interruption;
pub mod msr_bitmap;

pub use areas::{
    DescriptorTable, EntryControls, ExecutionControls, ExitControls, ExitInfo, GeneralRegisters,
    GuestMsrs, GuestState, HostState, VmcsSegment, ar,
};
pub use exit_reason::ExitReason;
pub use field::{
    FieldType, FieldWidth, VMCS_FIELD_ACCESS_HIGH, VMCS_FIELD_RESERVED_MASK, VmcsField,
};
pub use interruption::{InterruptionInfo, InterruptionType};
pub use msr_bitmap::{MsrBitmap, MsrBitmapError};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::state::LongModeState;

/// Errors of [`Vmcs::read`] / [`Vmcs::write`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum VmcsError {
    /// The encoding sets bit 12 or bits 31:15.
    #[error("field encoding {0:#x} has reserved bits set")]
    ReservedEncodingBits(u32),
    /// No such field in the model.
    #[error("unknown VMCS field {0:#x}")]
    UnknownField(u32),
    /// A high access (bit 0 = 1) to a field that is not 64 bits wide.
    #[error("high access to non-64-bit field {0:#x}")]
    HighAccessToNon64Bit(u32),
    /// The value does not fit the field's width.
    #[error("value {value:#x} too wide for {width:?} field {field:#x}")]
    ValueTooWide {
        /// Field encoding.
        field: u32,
        /// Rejected value.
        value: u64,
        /// The field's width.
        width: FieldWidth,
    },
    /// VM-exit information fields are read-only.
    #[error("VMCS field {0:#x} is read-only")]
    ReadOnlyField(u32),
}

/// The six areas of a VMCS (SDM §25.3): guest state, host state, VM-execution controls,
/// VM-exit controls, VM-entry controls and VM-exit information.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vmcs {
    /// VMCS revision identifier (SDM §25.2; 0 in this model).
    pub revision_id: u32,
    /// Guest-state area.
    pub guest: GuestState,
    /// Host-state area.
    pub host: HostState,
    /// VM-execution control fields.
    pub execution: ExecutionControls,
    /// VM-exit control fields.
    pub exit: ExitControls,
    /// VM-entry control fields.
    pub entry: EntryControls,
    /// VM-exit information fields.
    pub exit_info: ExitInfo,
}

macro_rules! vmcs_fields {
    ($( $name:ident = $enc:literal => $($path:ident).+ : $ty:ty ;)*) => {
        impl VmcsField {
            $(
                #[doc = concat!("`", stringify!($name), "` (", stringify!($enc), ").")]
                pub const $name: VmcsField = VmcsField($enc);
            )*
        }

        /// Every field the model holds with its name, in encoding order.
        pub(crate) const KNOWN_FIELDS: &[(VmcsField, &str)] =
            &[$((VmcsField($enc), stringify!($name)),)*];

        impl Vmcs {
            fn get_full(&self, enc: u32) -> Option<u64> {
                match enc {
                    $($enc => Some(self.$($path).+ as u64),)*
                    _ => None,
                }
            }

            // The caller checked `v` against the field's width.
            fn set_full(&mut self, enc: u32, v: u64) -> bool {
                match enc {
                    $($enc => { self.$($path).+ = v as $ty; true })*
                    _ => false,
                }
            }
        }
    };
}

vmcs_fields! {
    // 16-bit control fields.
    VIRTUAL_PROCESSOR_ID = 0x0000 => execution.virtual_processor_id: u16;
    // 16-bit guest-state fields.
    GUEST_ES_SELECTOR = 0x0800 => guest.es.selector: u16;
    GUEST_CS_SELECTOR = 0x0802 => guest.cs.selector: u16;
    GUEST_SS_SELECTOR = 0x0804 => guest.ss.selector: u16;
    GUEST_DS_SELECTOR = 0x0806 => guest.ds.selector: u16;
    GUEST_FS_SELECTOR = 0x0808 => guest.fs.selector: u16;
    GUEST_GS_SELECTOR = 0x080a => guest.gs.selector: u16;
    GUEST_LDTR_SELECTOR = 0x080c => guest.ldtr.selector: u16;
    GUEST_TR_SELECTOR = 0x080e => guest.tr.selector: u16;
    GUEST_INTR_STATUS = 0x0810 => guest.interrupt_status: u16;
    // 16-bit host-state fields.
    HOST_ES_SELECTOR = 0x0c00 => host.es_selector: u16;
    HOST_CS_SELECTOR = 0x0c02 => host.cs_selector: u16;
    HOST_SS_SELECTOR = 0x0c04 => host.ss_selector: u16;
    HOST_DS_SELECTOR = 0x0c06 => host.ds_selector: u16;
    HOST_FS_SELECTOR = 0x0c08 => host.fs_selector: u16;
    HOST_GS_SELECTOR = 0x0c0a => host.gs_selector: u16;
    HOST_TR_SELECTOR = 0x0c0c => host.tr_selector: u16;
    // 64-bit control fields.
    IO_BITMAP_A = 0x2000 => execution.io_bitmap_a: u64;
    IO_BITMAP_B = 0x2002 => execution.io_bitmap_b: u64;
    MSR_BITMAP = 0x2004 => execution.msr_bitmap_address: u64;
    VM_EXIT_MSR_STORE_ADDR = 0x2006 => exit.msr_store_addr: u64;
    VM_EXIT_MSR_LOAD_ADDR = 0x2008 => exit.msr_load_addr: u64;
    VM_ENTRY_MSR_LOAD_ADDR = 0x200a => entry.msr_load_addr: u64;
    TSC_OFFSET = 0x2010 => execution.tsc_offset: u64;
    VIRTUAL_APIC_PAGE_ADDR = 0x2012 => execution.virtual_apic_page_addr: u64;
    EPT_POINTER = 0x201a => execution.ept_pointer: u64;
    // 64-bit read-only data field.
    GUEST_PHYSICAL_ADDRESS = 0x2400 => exit_info.guest_physical_address: u64;
    // 64-bit guest-state fields.
    VMCS_LINK_POINTER = 0x2800 => guest.vmcs_link_pointer: u64;
    GUEST_IA32_DEBUGCTL = 0x2802 => guest.ia32_debugctl: u64;
    GUEST_IA32_PAT = 0x2804 => guest.ia32_pat: u64;
    GUEST_IA32_EFER = 0x2806 => guest.ia32_efer: u64;
    GUEST_IA32_PERF_GLOBAL_CTRL = 0x2808 => guest.ia32_perf_global_ctrl: u64;
    GUEST_PDPTE0 = 0x280a => guest.pdpte0: u64;
    GUEST_PDPTE1 = 0x280c => guest.pdpte1: u64;
    GUEST_PDPTE2 = 0x280e => guest.pdpte2: u64;
    GUEST_PDPTE3 = 0x2810 => guest.pdpte3: u64;
    // 64-bit host-state fields.
    HOST_IA32_PAT = 0x2c00 => host.ia32_pat: u64;
    HOST_IA32_EFER = 0x2c02 => host.ia32_efer: u64;
    HOST_IA32_PERF_GLOBAL_CTRL = 0x2c04 => host.ia32_perf_global_ctrl: u64;
    // 32-bit control fields.
    PIN_BASED_VM_EXEC_CONTROL = 0x4000 => execution.pin_based: u32;
    CPU_BASED_VM_EXEC_CONTROL = 0x4002 => execution.primary_processor_based: u32;
    EXCEPTION_BITMAP = 0x4004 => execution.exception_bitmap: u32;
    PAGE_FAULT_ERROR_CODE_MASK = 0x4006 => execution.page_fault_error_code_mask: u32;
    PAGE_FAULT_ERROR_CODE_MATCH = 0x4008 => execution.page_fault_error_code_match: u32;
    CR3_TARGET_COUNT = 0x400a => execution.cr3_target_count: u32;
    VM_EXIT_CONTROLS = 0x400c => exit.controls: u32;
    VM_EXIT_MSR_STORE_COUNT = 0x400e => exit.msr_store_count: u32;
    VM_EXIT_MSR_LOAD_COUNT = 0x4010 => exit.msr_load_count: u32;
    VM_ENTRY_CONTROLS = 0x4012 => entry.controls: u32;
    VM_ENTRY_MSR_LOAD_COUNT = 0x4014 => entry.msr_load_count: u32;
    VM_ENTRY_INTR_INFO_FIELD = 0x4016 => entry.interruption_info: u32;
    VM_ENTRY_EXCEPTION_ERROR_CODE = 0x4018 => entry.exception_error_code: u32;
    VM_ENTRY_INSTRUCTION_LEN = 0x401a => entry.instruction_length: u32;
    TPR_THRESHOLD = 0x401c => execution.tpr_threshold: u32;
    SECONDARY_VM_EXEC_CONTROL = 0x401e => execution.secondary_processor_based: u32;
    // 32-bit read-only data fields.
    VM_INSTRUCTION_ERROR = 0x4400 => exit_info.vm_instruction_error: u32;
    VM_EXIT_REASON = 0x4402 => exit_info.exit_reason: u32;
    VM_EXIT_INTR_INFO = 0x4404 => exit_info.interruption_info: u32;
    VM_EXIT_INTR_ERROR_CODE = 0x4406 => exit_info.interruption_error_code: u32;
    IDT_VECTORING_INFO_FIELD = 0x4408 => exit_info.idt_vectoring_info: u32;
    IDT_VECTORING_ERROR_CODE = 0x440a => exit_info.idt_vectoring_error_code: u32;
    VM_EXIT_INSTRUCTION_LEN = 0x440c => exit_info.instruction_length: u32;
    VMX_INSTRUCTION_INFO = 0x440e => exit_info.instruction_info: u32;
    // 32-bit guest-state fields.
    GUEST_ES_LIMIT = 0x4800 => guest.es.limit: u32;
    GUEST_CS_LIMIT = 0x4802 => guest.cs.limit: u32;
    GUEST_SS_LIMIT = 0x4804 => guest.ss.limit: u32;
    GUEST_DS_LIMIT = 0x4806 => guest.ds.limit: u32;
    GUEST_FS_LIMIT = 0x4808 => guest.fs.limit: u32;
    GUEST_GS_LIMIT = 0x480a => guest.gs.limit: u32;
    GUEST_LDTR_LIMIT = 0x480c => guest.ldtr.limit: u32;
    GUEST_TR_LIMIT = 0x480e => guest.tr.limit: u32;
    GUEST_GDTR_LIMIT = 0x4810 => guest.gdtr.limit: u32;
    GUEST_IDTR_LIMIT = 0x4812 => guest.idtr.limit: u32;
    GUEST_ES_AR_BYTES = 0x4814 => guest.es.access_rights: u32;
    GUEST_CS_AR_BYTES = 0x4816 => guest.cs.access_rights: u32;
    GUEST_SS_AR_BYTES = 0x4818 => guest.ss.access_rights: u32;
    GUEST_DS_AR_BYTES = 0x481a => guest.ds.access_rights: u32;
    GUEST_FS_AR_BYTES = 0x481c => guest.fs.access_rights: u32;
    GUEST_GS_AR_BYTES = 0x481e => guest.gs.access_rights: u32;
    GUEST_LDTR_AR_BYTES = 0x4820 => guest.ldtr.access_rights: u32;
    GUEST_TR_AR_BYTES = 0x4822 => guest.tr.access_rights: u32;
    GUEST_INTERRUPTIBILITY_INFO = 0x4824 => guest.interruptibility_state: u32;
    GUEST_ACTIVITY_STATE = 0x4826 => guest.activity_state: u32;
    GUEST_SMBASE = 0x4828 => guest.smbase: u32;
    GUEST_SYSENTER_CS = 0x482a => guest.ia32_sysenter_cs: u32;
    VMX_PREEMPTION_TIMER_VALUE = 0x482e => guest.vmx_preemption_timer_value: u32;
    // 32-bit host-state field.
    HOST_IA32_SYSENTER_CS = 0x4c00 => host.ia32_sysenter_cs: u32;
    // Natural-width control fields.
    CR0_GUEST_HOST_MASK = 0x6000 => execution.cr0_guest_host_mask: u64;
    CR4_GUEST_HOST_MASK = 0x6002 => execution.cr4_guest_host_mask: u64;
    CR0_READ_SHADOW = 0x6004 => execution.cr0_read_shadow: u64;
    CR4_READ_SHADOW = 0x6006 => execution.cr4_read_shadow: u64;
    CR3_TARGET_VALUE0 = 0x6008 => execution.cr3_target_value0: u64;
    CR3_TARGET_VALUE1 = 0x600a => execution.cr3_target_value1: u64;
    CR3_TARGET_VALUE2 = 0x600c => execution.cr3_target_value2: u64;
    CR3_TARGET_VALUE3 = 0x600e => execution.cr3_target_value3: u64;
    // Natural-width read-only data fields.
    EXIT_QUALIFICATION = 0x6400 => exit_info.exit_qualification: u64;
    IO_RCX = 0x6402 => exit_info.io_rcx: u64;
    IO_RSI = 0x6404 => exit_info.io_rsi: u64;
    IO_RDI = 0x6406 => exit_info.io_rdi: u64;
    IO_RIP = 0x6408 => exit_info.io_rip: u64;
    GUEST_LINEAR_ADDRESS = 0x640a => exit_info.guest_linear_address: u64;
    // Natural-width guest-state fields.
    GUEST_CR0 = 0x6800 => guest.cr0: u64;
    GUEST_CR3 = 0x6802 => guest.cr3: u64;
    GUEST_CR4 = 0x6804 => guest.cr4: u64;
    GUEST_ES_BASE = 0x6806 => guest.es.base: u64;
    GUEST_CS_BASE = 0x6808 => guest.cs.base: u64;
    GUEST_SS_BASE = 0x680a => guest.ss.base: u64;
    GUEST_DS_BASE = 0x680c => guest.ds.base: u64;
    GUEST_FS_BASE = 0x680e => guest.fs.base: u64;
    GUEST_GS_BASE = 0x6810 => guest.gs.base: u64;
    GUEST_LDTR_BASE = 0x6812 => guest.ldtr.base: u64;
    GUEST_TR_BASE = 0x6814 => guest.tr.base: u64;
    GUEST_GDTR_BASE = 0x6816 => guest.gdtr.base: u64;
    GUEST_IDTR_BASE = 0x6818 => guest.idtr.base: u64;
    GUEST_DR7 = 0x681a => guest.dr7: u64;
    GUEST_RSP = 0x681c => guest.rsp: u64;
    GUEST_RIP = 0x681e => guest.rip: u64;
    GUEST_RFLAGS = 0x6820 => guest.rflags: u64;
    GUEST_PENDING_DBG_EXCEPTIONS = 0x6822 => guest.pending_debug_exceptions: u64;
    GUEST_SYSENTER_ESP = 0x6824 => guest.ia32_sysenter_esp: u64;
    GUEST_SYSENTER_EIP = 0x6826 => guest.ia32_sysenter_eip: u64;
    // Natural-width host-state fields.
    HOST_CR0 = 0x6c00 => host.cr0: u64;
    HOST_CR3 = 0x6c02 => host.cr3: u64;
    HOST_CR4 = 0x6c04 => host.cr4: u64;
    HOST_FS_BASE = 0x6c06 => host.fs_base: u64;
    HOST_GS_BASE = 0x6c08 => host.gs_base: u64;
    HOST_TR_BASE = 0x6c0a => host.tr_base: u64;
    HOST_GDTR_BASE = 0x6c0c => host.gdtr_base: u64;
    HOST_IDTR_BASE = 0x6c0e => host.idtr_base: u64;
    HOST_IA32_SYSENTER_ESP = 0x6c10 => host.ia32_sysenter_esp: u64;
    HOST_IA32_SYSENTER_EIP = 0x6c12 => host.ia32_sysenter_eip: u64;
    HOST_RSP = 0x6c14 => host.rsp: u64;
    HOST_RIP = 0x6c16 => host.rip: u64;
}

impl Vmcs {
    /// A VMCS whose guest-state area holds [`LongModeState::flat_64`]: 64-bit CPL 0 with flat
    /// segments, the "IA-32e mode guest" and "load IA32_EFER" entry controls set, IDTR empty.
    pub fn flat_64(cr3: u64, rip: u64, rsp: u64) -> Self {
        Self::from_long_mode(&LongModeState::flat_64(cr3, rip, rsp))
    }

    /// A VMCS whose guest-state area holds `s` (LDTR unusable, PAT at its reset value).
    pub fn from_long_mode(s: &LongModeState) -> Self {
        let data = VmcsSegment::from_segment(&s.data);
        let mut v = Vmcs::default();
        let g = &mut v.guest;
        g.cs = VmcsSegment::from_segment(&s.cs);
        g.ds = data;
        g.es = data;
        g.fs = data;
        g.gs = data;
        g.ss = data;
        g.tr = VmcsSegment::from_segment(&s.tr);
        g.ldtr = VmcsSegment::UNUSABLE;
        g.gdtr = DescriptorTable {
            base: s.gdt_base,
            limit: s.gdt_limit() as u32,
        };
        g.cr0 = s.cr0;
        g.cr3 = s.cr3;
        // CR4.VMXE is fixed to 1 in VMX operation; the guest sees its own value through the
        // read shadow (SDM §25.6.6).
        g.cr4 = s.cr4 | checks::CR4_VMXE;
        v.execution.cr4_guest_host_mask = checks::CR4_VMXE;
        v.execution.cr4_read_shadow = s.cr4;
        v.execution.cr0_guest_host_mask = checks::CR0_NE;
        v.execution.cr0_read_shadow = s.cr0;
        let g = &mut v.guest;
        g.ia32_efer = s.efer;
        g.rflags = s.rflags;
        g.rip = s.rip;
        g.rsp = s.rsp;
        g.dr7 = 0x400;
        g.dr6 = 0xffff_0ff0;
        g.ia32_pat = 0x0007_0406_0007_0406;
        g.xcr0 = 1;
        g.msrs.apic_base = 0xfee0_0900;
        g.vmcs_link_pointer = u64::MAX;
        v.entry.controls = controls::entry::IA32E_MODE_GUEST | controls::entry::LOAD_IA32_EFER;
        v.exit.controls = controls::exit::HOST_ADDRESS_SPACE_SIZE;
        v
    }

    fn check_encoding(field: VmcsField) -> Result<(), VmcsError> {
        if field.has_reserved_bits() {
            return Err(VmcsError::ReservedEncodingBits(field.0));
        }
        if field.is_high() && field.width() != FieldWidth::Bits64 {
            return Err(VmcsError::HighAccessToNon64Bit(field.0));
        }
        Ok(())
    }

    /// Read a field by encoding (like VMREAD). A high access returns bits 63:32 of a 64-bit
    /// field.
    pub fn read(&self, field: VmcsField) -> Result<u64, VmcsError> {
        Self::check_encoding(field)?;
        let full = field.0 & !VMCS_FIELD_ACCESS_HIGH;
        let v = self
            .get_full(full)
            .ok_or(VmcsError::UnknownField(field.0))?;
        Ok(if field.is_high() { v >> 32 } else { v })
    }

    /// Write a field by encoding (like VMWRITE): the value must fit the field's width (32 bits for
    /// a high access, which replaces bits 63:32); exit-information fields are read-only.
    pub fn write(&mut self, field: VmcsField, value: u64) -> Result<(), VmcsError> {
        Self::check_encoding(field)?;
        if field.is_read_only() {
            return Err(VmcsError::ReadOnlyField(field.0));
        }
        self.write_unchecked_access(field, value)
    }

    /// Like [`write`](Self::write) but also allowed on exit-information fields: used by the
    /// backend when it records an exit.
    pub(crate) fn write_unchecked_access(
        &mut self,
        field: VmcsField,
        value: u64,
    ) -> Result<(), VmcsError> {
        Self::check_encoding(field)?;
        let full = field.0 & !VMCS_FIELD_ACCESS_HIGH;
        let old = self
            .get_full(full)
            .ok_or(VmcsError::UnknownField(field.0))?;
        let max = if field.is_high() {
            u32::MAX as u64
        } else {
            field.width().max_value()
        };
        if value > max {
            return Err(VmcsError::ValueTooWide {
                field: field.0,
                value,
                width: field.width(),
            });
        }
        let v = if field.is_high() {
            (old & 0xffff_ffff) | (value << 32)
        } else {
            value
        };
        self.set_full(full, v);
        Ok(())
    }

    /// "IA-32e mode guest" VM-entry control.
    pub fn ia32e_mode_guest(&self) -> bool {
        self.entry.controls & controls::entry::IA32E_MODE_GUEST != 0
    }

    /// "Unrestricted guest" (secondary control, effective only with secondary controls active).
    pub fn unrestricted_guest(&self) -> bool {
        self.execution.primary_processor_based & controls::primary::ACTIVATE_SECONDARY_CONTROLS != 0
            && self.execution.secondary_processor_based & controls::secondary::UNRESTRICTED_GUEST
                != 0
    }

    /// The basic exit reason of the last exit, if it is one the SDM defines.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        ExitReason::from_basic(self.exit_info.exit_reason as u16)
    }

    /// The VM-entry interruption-information field, decoded (None when its valid bit is 0).
    pub fn entry_interruption(&self) -> Option<InterruptionInfo> {
        InterruptionInfo::from_raw(self.entry.interruption_info)
    }

    /// Set up event injection for the next VM entry (SDM §25.8.3): interruption information,
    /// error code and (for software events) instruction length.
    pub fn inject(&mut self, info: InterruptionInfo, error_code: u32, instruction_length: u32) {
        self.entry.interruption_info = info.to_raw();
        self.entry.exception_error_code = error_code;
        self.entry.instruction_length = instruction_length;
    }

    /// Exception-bitmap bit for `vector`.
    pub fn exception_exits(&self, vector: u8) -> bool {
        vector < 32 && self.execution.exception_bitmap & (1 << vector) != 0
    }

    /// CR0 as the guest reads it: bits owned by the host (guest/host mask) come from the read
    /// shadow (SDM §25.6.6).
    pub fn guest_visible_cr0(&self) -> u64 {
        let m = self.execution.cr0_guest_host_mask;
        (self.guest.cr0 & !m) | (self.execution.cr0_read_shadow & m)
    }

    /// CR4 as the guest reads it.
    pub fn guest_visible_cr4(&self) -> u64 {
        let m = self.execution.cr4_guest_host_mask;
        (self.guest.cr4 & !m) | (self.execution.cr4_read_shadow & m)
    }

    /// Current privilege level (SS.DPL, SDM §27.3.1.2).
    pub fn cpl(&self) -> u8 {
        self.guest.ss.dpl()
    }
}

#[cfg(test)]
mod tests;
