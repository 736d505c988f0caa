//! Guest-state checks performed on VM entry (Intel SDM vol. 3C §27.3.1), the meaningful subset,
//! plus the event-injection checks of §27.2.1.3 that involve guest state.
//!
//! [`check_guest_state`] returns the first violated rule as its own [`GuestStateError`] variant.
//! The KVM backend runs it before handing a [`Vmcs`] to KVM.
//!
//! Fixed bits follow the values every VMX processor reports: IA32_VMX_CR0_FIXED0 = PE | NE | PG
//! (PE and PG relaxed by "unrestricted guest"), IA32_VMX_CR4_FIXED0 = VMXE. A guest that must
//! see other values gets them through the CR0/CR4 guest/host masks and read shadows, which is
//! how [`crate::kvm_map`] represents KVM state.

use thiserror::Error;

use super::interruption::{InterruptionType, exception_has_error_code};
use super::{Vmcs, VmcsSegment, ar};

/// CR0.PE.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.NE.
pub const CR0_NE: u64 = 1 << 5;
/// CR0.NW.
pub const CR0_NW: u64 = 1 << 29;
/// CR0.CD.
pub const CR0_CD: u64 = 1 << 30;
/// CR0.PG.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.VMXE.
pub const CR4_VMXE: u64 = 1 << 13;
/// CR4.PCIDE.
pub const CR4_PCIDE: u64 = 1 << 17;
/// CR0 bits every VMX processor requires to be 1 (IA32_VMX_CR0_FIXED0).
pub const VMX_CR0_FIXED0: u64 = CR0_PE | CR0_NE | CR0_PG;
/// CR4 bits every VMX processor requires to be 1 (IA32_VMX_CR4_FIXED0).
pub const VMX_CR4_FIXED0: u64 = CR4_VMXE;
/// CR4 bits a processor may support (VME … PKS, UINTR, LAM_SUP); the rest are reserved.
pub const CR4_DEFINED: u64 = 0x3ff_ffff & !(1 << 15) | (1 << 28);
/// EFER.LME.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER bits defined on Intel 64 (SCE, LME, LMA, NXE); the rest must be 0.
pub const EFER_DEFINED: u64 = 1 | EFER_LME | EFER_LMA | (1 << 11);
/// Bits above MAXPHYADDR (52) in CR3.
pub const CR3_RESERVED: u64 = !((1u64 << 52) - 1);
/// RFLAGS.IF.
pub const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS.VM.
pub const RFLAGS_VM: u64 = 1 << 17;
/// RFLAGS bit 1, always 1.
pub const RFLAGS_FIXED1: u64 = 1 << 1;
/// RFLAGS reserved-zero bits: 63:22, 15, 5, 3.
pub const RFLAGS_RESERVED: u64 = !((1u64 << 22) - 1) | (1 << 15) | (1 << 5) | (1 << 3);
/// Interruptibility state: blocking by STI.
pub const INTR_BLOCKING_STI: u32 = 1 << 0;
/// Interruptibility state: blocking by MOV SS.
pub const INTR_BLOCKING_MOV_SS: u32 = 1 << 1;
/// Interruptibility state: blocking by SMI.
pub const INTR_BLOCKING_SMI: u32 = 1 << 2;
/// Interruptibility state: blocking by NMI.
pub const INTR_BLOCKING_NMI: u32 = 1 << 3;
/// Interruptibility-state bits defined (0–4, bit 4 = enclave interruption).
pub const INTR_DEFINED: u32 = 0x1f;
/// Activity state: active.
pub const ACTIVITY_ACTIVE: u32 = 0;
/// Activity state: HLT.
pub const ACTIVITY_HLT: u32 = 1;
/// Activity state: shutdown.
pub const ACTIVITY_SHUTDOWN: u32 = 2;
/// Activity state: wait-for-SIPI.
pub const ACTIVITY_WAIT_SIPI: u32 = 3;

/// A segment register, to name it in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum SegmentRegister {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
    Ldtr,
    Tr,
}

/// GDTR or IDTR, to name it in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum DescriptorTableRegister {
    Gdtr,
    Idtr,
}

/// A violated guest-state rule. Each variant names one rule of SDM §27.3.1 (or §27.2.1.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum GuestStateError {
    /// CR0 lacks bits fixed to 1 (PE, NE, PG; PE/PG not with unrestricted guest).
    #[error("CR0 fixed-1 bits {missing:#x} clear (27.3.1.1)")]
    Cr0FixedOne {
        /// The missing bits.
        missing: u64,
    },
    /// CR0 bits 63:32 set.
    #[error("CR0 reserved bits {bits:#x} set (27.3.1.1)")]
    Cr0Reserved {
        /// The offending bits.
        bits: u64,
    },
    /// CR0.PG = 1 with CR0.PE = 0.
    #[error("CR0.PG set without CR0.PE (27.3.1.1)")]
    Cr0PgWithoutPe,
    /// CR0.NW = 1 with CR0.CD = 0.
    #[error("CR0.NW set without CR0.CD")]
    Cr0NwWithoutCd,
    /// CR4 lacks VMXE.
    #[error("CR4 fixed-1 bits {missing:#x} clear (27.3.1.1)")]
    Cr4FixedOne {
        /// The missing bits.
        missing: u64,
    },
    /// CR4 reserved bits set.
    #[error("CR4 reserved bits {bits:#x} set (27.3.1.1)")]
    Cr4Reserved {
        /// The offending bits.
        bits: u64,
    },
    /// CR3 bits beyond MAXPHYADDR set.
    #[error("CR3 bits beyond MAXPHYADDR set (27.3.1.1)")]
    Cr3Reserved,
    /// DR7 bits 63:32 set (with "load debug controls").
    #[error("DR7 bits 63:32 set (27.3.1.1)")]
    Dr7Reserved,
    /// IA32_SYSENTER_ESP/EIP not canonical.
    #[error("IA32_SYSENTER_ESP/EIP not canonical (27.3.1.1)")]
    SysenterNotCanonical,
    /// An IA32_PAT entry holds a reserved memory type.
    #[error("IA32_PAT entry {entry} has reserved type (27.3.1.1)")]
    PatReserved {
        /// Entry index 0–7.
        entry: u8,
    },
    /// IA32_EFER reserved bits set.
    #[error("IA32_EFER reserved bits {bits:#x} set (27.3.1.1)")]
    EferReserved {
        /// The offending bits.
        bits: u64,
    },
    /// EFER.LMA differs from the "IA-32e mode guest" entry control.
    #[error("EFER.LMA differs from IA-32e mode guest control (27.3.1.1)")]
    EferLmaMismatch,
    /// CR0.PG = 1 and EFER.LME differs from EFER.LMA.
    #[error("EFER.LME differs from EFER.LMA with paging on (27.3.1.1)")]
    EferLmeMismatch,
    /// IA-32e mode guest with CR0.PG = 0.
    #[error("IA-32e mode guest without CR0.PG (27.3.1.1)")]
    Ia32eModeWithoutPaging,
    /// IA-32e mode guest with CR4.PAE = 0.
    #[error("IA-32e mode guest without CR4.PAE (27.3.1.1)")]
    Ia32eModeWithoutPae,
    /// CR4.PCIDE = 1 outside IA-32e mode.
    #[error("CR4.PCIDE set outside IA-32e mode (27.3.1.1)")]
    PcideOutsideIa32eMode,
    /// RFLAGS.VM = 1 (virtual-8086 segment rules are not modelled) or in IA-32e mode.
    #[error("RFLAGS.VM set (27.3.1.4)")]
    RflagsVm,
    /// TR or LDTR selector has TI = 1.
    #[error("{0:?} selector TI flag set (27.3.1.2)")]
    SelectorTi(SegmentRegister),
    /// SS.RPL differs from CS.RPL (without unrestricted guest).
    #[error("SS.RPL differs from CS.RPL (27.3.1.2)")]
    SsRplMismatch,
    /// FS/GS/LDTR/TR base not canonical.
    #[error("{0:?} base not canonical (27.3.1.2)")]
    BaseNotCanonical(SegmentRegister),
    /// CS/SS/DS/ES base bits 63:32 set.
    #[error("{0:?} base bits 63:32 set (27.3.1.2)")]
    BaseUpperBits(SegmentRegister),
    /// Access-rights reserved bits set.
    #[error("{0:?} access-rights reserved bits set (27.3.1.2)")]
    AccessRightsReserved(SegmentRegister),
    /// CS type not 9, 11, 13, 15 (or 3 with unrestricted guest).
    #[error("CS type {0} invalid (27.3.1.2)")]
    CsType(u8),
    /// SS usable with a type other than 3 or 7.
    #[error("SS type {0} invalid (27.3.1.2)")]
    SsType(u8),
    /// A usable data segment (DS, ES, FS, GS) without the accessed bit.
    #[error("{0:?} not accessed (27.3.1.2)")]
    NotAccessed(SegmentRegister),
    /// A code segment loaded in DS/ES/FS/GS that is not readable.
    #[error("{0:?} is an unreadable code segment (27.3.1.2)")]
    CodeNotReadable(SegmentRegister),
    /// S = 0 for CS, SS, DS, ES, FS or GS.
    #[error("{0:?} is a system segment (27.3.1.2)")]
    NotCodeOrData(SegmentRegister),
    /// P = 0 for a usable segment.
    #[error("{0:?} not present (27.3.1.2)")]
    NotPresent(SegmentRegister),
    /// CS.DPL vs SS.DPL rule broken (non-conforming: equal; conforming: CS.DPL ≤ SS.DPL;
    /// type 3: DPL 0).
    #[error("CS.DPL {cs} inconsistent with SS.DPL {ss} (27.3.1.2)")]
    CsDpl {
        /// CS.DPL.
        cs: u8,
        /// SS.DPL.
        ss: u8,
    },
    /// SS.DPL differs from SS.RPL (without unrestricted guest).
    #[error("SS.DPL differs from SS.RPL (27.3.1.2)")]
    SsDplRpl,
    /// SS.DPL not 0 with CR0.PE = 0.
    #[error("SS.DPL nonzero in real mode (27.3.1.2)")]
    SsDplRealMode,
    /// A non-conforming data segment with DPL < RPL (without unrestricted guest).
    #[error("{0:?} DPL below RPL (27.3.1.2)")]
    DplBelowRpl(SegmentRegister),
    /// CS.L and CS.D/B both set in IA-32e mode.
    #[error("CS.L and CS.D/B both set (27.3.1.2)")]
    CsLongAndDefaultBig,
    /// G inconsistent with the limit: bits 11:0 not all 1 with G = 1, or bits 31:20 not all 0
    /// with G = 0.
    #[error("{0:?} limit inconsistent with G (27.3.1.2)")]
    LimitGranularity(SegmentRegister),
    /// TR unusable.
    #[error("TR unusable (27.3.1.2)")]
    TrUnusable,
    /// TR type not 11 (or 3 outside IA-32e mode).
    #[error("TR type {0} invalid (27.3.1.2)")]
    TrType(u8),
    /// TR or LDTR with S = 1.
    #[error("{0:?} is not a system segment (27.3.1.2)")]
    NotSystem(SegmentRegister),
    /// LDTR usable with type other than 2.
    #[error("LDTR type {0} invalid (27.3.1.2)")]
    LdtrType(u8),
    /// GDTR/IDTR base not canonical.
    #[error("{0:?} base not canonical (27.3.1.3)")]
    TableBaseNotCanonical(DescriptorTableRegister),
    /// GDTR/IDTR limit bits 31:16 set.
    #[error("{0:?} limit above 0xffff (27.3.1.3)")]
    TableLimit(DescriptorTableRegister),
    /// RIP bits 63:32 set outside 64-bit mode.
    #[error("RIP bits 63:32 set outside 64-bit mode (27.3.1.4)")]
    RipUpperBits,
    /// RIP not canonical in 64-bit mode.
    #[error("RIP not canonical (27.3.1.4)")]
    RipNotCanonical,
    /// RFLAGS reserved bits wrong (bit 1 must be 1; 63:22, 15, 5, 3 must be 0).
    #[error("RFLAGS reserved bits wrong (27.3.1.4)")]
    RflagsReserved,
    /// Injecting an external interrupt with RFLAGS.IF = 0.
    #[error("external interrupt injected with RFLAGS.IF clear (27.3.1.4)")]
    RflagsIfClearForInterrupt,
    /// Activity state not 0–3.
    #[error("activity state {0} invalid (27.3.1.5)")]
    ActivityState(u32),
    /// HLT activity state with SS.DPL ≠ 0.
    #[error("HLT activity state with CPL {0} (27.3.1.5)")]
    HltWithCpl(u8),
    /// Injecting an event the activity state cannot take (HLT allows only external interrupts,
    /// NMIs and #DB/#MC; shutdown allows only NMI/#MC; wait-for-SIPI none).
    #[error("event injection not allowed in activity state {0} (27.3.1.5)")]
    ActivityBlocksInjection(u32),
    /// Interruptibility-state reserved bits set.
    #[error("interruptibility reserved bits {0:#x} set (27.3.1.5)")]
    InterruptibilityReserved(u32),
    /// Blocking by STI and by MOV SS both set.
    #[error("blocking by STI and by MOV SS both set (27.3.1.5)")]
    StiAndMovSsBlocking,
    /// Blocking by STI with RFLAGS.IF = 0.
    #[error("blocking by STI with RFLAGS.IF clear (27.3.1.5)")]
    StiBlockingWithIfClear,
    /// Blocking by SMI set on a VM entry from outside SMM (the only VM entries modelled).
    #[error("blocking by SMI set on VM entry outside SMM (27.3.1.5)")]
    SmiBlockingOutsideSmm,
    /// Injecting an external interrupt while blocked by STI or MOV SS.
    #[error("external interrupt injected in STI/MOV SS shadow (27.3.1.5)")]
    InterruptInShadow,
    /// Injecting an NMI while blocked by MOV SS (or by NMI, without virtual NMIs).
    #[error("NMI injected while NMIs are blocked (27.3.1.5)")]
    NmiBlocked,
    /// VMCS link pointer not all ones (VMCS shadowing is not modelled).
    #[error("VMCS link pointer not 0xffffffff_ffffffff (27.3.1.5)")]
    VmcsLinkPointer,
    /// Entry interruption-information type 1 (reserved) or 7 (other event) with vector ≠ 0.
    #[error("injected event type {0} reserved (27.2.1.3)")]
    EntryEventType(u8),
    /// Injected NMI with vector ≠ 2.
    #[error("injected NMI has vector {0} (27.2.1.3)")]
    EntryNmiVector(u8),
    /// Injected hardware exception with vector > 31.
    #[error("injected exception vector {0} above 31 (27.2.1.3)")]
    EntryExceptionVector(u8),
    /// "Deliver error code" does not match the vector / type / CR0.PE.
    #[error("deliver-error-code bit wrong for vector {0} (27.2.1.3)")]
    EntryErrorCode(u8),
    /// Injected error code bits 31:16 set.
    #[error("injected error code bits 31:16 set (27.2.1.3)")]
    EntryErrorCodeReserved,
    /// Interruption-information bits 30:12 set.
    #[error("interruption-information reserved bits set (27.2.1.3)")]
    EntryInfoReserved,
    /// Software event with instruction length outside 1–15.
    #[error("software event instruction length {0} outside 1..=15 (27.2.1.3)")]
    EntryInstructionLength(u32),
}

type R = Result<(), GuestStateError>;

fn canonical(v: u64) -> bool {
    ((v as i64) << 16 >> 16) as u64 == v
}

fn ensure(ok: bool, e: GuestStateError) -> R {
    if ok { Ok(()) } else { Err(e) }
}

/// Check `vmcs`'s guest-state area (and event injection) against SDM §27.3.1 / §27.2.1.3.
pub fn check_guest_state(vmcs: &Vmcs) -> R {
    check_control_registers(vmcs)?;
    check_segments(vmcs)?;
    check_descriptor_tables(vmcs)?;
    check_rip_rflags(vmcs)?;
    check_non_register_state(vmcs)?;
    check_event_injection(vmcs)
}

fn check_control_registers(v: &Vmcs) -> R {
    use GuestStateError::*;
    let g = &v.guest;
    let ia32e = v.ia32e_mode_guest();
    let fixed0 = if v.unrestricted_guest() {
        CR0_NE
    } else {
        VMX_CR0_FIXED0
    };
    ensure(
        g.cr0 & fixed0 == fixed0,
        Cr0FixedOne {
            missing: fixed0 & !g.cr0,
        },
    )?;
    ensure(
        g.cr0 >> 32 == 0,
        Cr0Reserved {
            bits: g.cr0 & !0xffff_ffff,
        },
    )?;
    ensure(g.cr0 & CR0_PG == 0 || g.cr0 & CR0_PE != 0, Cr0PgWithoutPe)?;
    ensure(g.cr0 & CR0_NW == 0 || g.cr0 & CR0_CD != 0, Cr0NwWithoutCd)?;
    ensure(
        g.cr4 & VMX_CR4_FIXED0 == VMX_CR4_FIXED0,
        Cr4FixedOne {
            missing: VMX_CR4_FIXED0 & !g.cr4,
        },
    )?;
    ensure(
        g.cr4 & !CR4_DEFINED == 0,
        Cr4Reserved {
            bits: g.cr4 & !CR4_DEFINED,
        },
    )?;
    ensure(g.cr3 & CR3_RESERVED == 0, Cr3Reserved)?;
    ensure(g.dr7 >> 32 == 0, Dr7Reserved)?;
    ensure(
        canonical(g.ia32_sysenter_esp) && canonical(g.ia32_sysenter_eip),
        SysenterNotCanonical,
    )?;
    for entry in 0..8u8 {
        let t = (g.ia32_pat >> (entry * 8)) & 0xff;
        ensure(matches!(t, 0 | 1 | 4 | 5 | 6 | 7), PatReserved { entry })?;
    }
    ensure(
        g.ia32_efer & !EFER_DEFINED == 0,
        EferReserved {
            bits: g.ia32_efer & !EFER_DEFINED,
        },
    )?;
    let lma = g.ia32_efer & EFER_LMA != 0;
    ensure(lma == ia32e, EferLmaMismatch)?;
    ensure(
        g.cr0 & CR0_PG == 0 || lma == (g.ia32_efer & EFER_LME != 0),
        EferLmeMismatch,
    )?;
    if ia32e {
        ensure(g.cr0 & CR0_PG != 0, Ia32eModeWithoutPaging)?;
        ensure(g.cr4 & CR4_PAE != 0, Ia32eModeWithoutPae)?;
    } else {
        ensure(g.cr4 & CR4_PCIDE == 0, PcideOutsideIa32eMode)?;
    }
    ensure(g.rflags & RFLAGS_VM == 0, RflagsVm)
}

fn limit_ok(s: &VmcsSegment) -> bool {
    let g = s.has(ar::G);
    (s.limit & 0xfff == 0xfff || !g) && (s.limit >> 20 == 0 || g)
}

fn check_data_segment(v: &Vmcs, s: &VmcsSegment, reg: SegmentRegister) -> R {
    use GuestStateError::*;
    if s.unusable() {
        return Ok(());
    }
    let t = s.type_();
    ensure(
        s.access_rights & ar::RESERVED == 0,
        AccessRightsReserved(reg),
    )?;
    ensure(t & 1 != 0, NotAccessed(reg))?;
    ensure(t & 8 == 0 || t & 2 != 0, CodeNotReadable(reg))?;
    ensure(s.has(ar::S), NotCodeOrData(reg))?;
    ensure(s.has(ar::P), NotPresent(reg))?;
    if !v.unrestricted_guest() && t <= 11 {
        ensure(s.dpl() >= s.rpl(), DplBelowRpl(reg))?;
    }
    ensure(limit_ok(s), LimitGranularity(reg))
}

fn check_segments(v: &Vmcs) -> R {
    use GuestStateError::*;
    use SegmentRegister::*;
    let g = &v.guest;
    let ia32e = v.ia32e_mode_guest();
    let unrestricted = v.unrestricted_guest();
    // Selectors.
    ensure(!g.tr.ti(), SelectorTi(Tr))?;
    ensure(g.ldtr.unusable() || !g.ldtr.ti(), SelectorTi(Ldtr))?;
    ensure(unrestricted || g.ss.rpl() == g.cs.rpl(), SsRplMismatch)?;
    // Bases.
    for (s, r) in [(&g.fs, Fs), (&g.gs, Gs), (&g.tr, Tr)] {
        ensure(canonical(s.base), BaseNotCanonical(r))?;
    }
    ensure(
        g.ldtr.unusable() || canonical(g.ldtr.base),
        BaseNotCanonical(Ldtr),
    )?;
    ensure(g.cs.base >> 32 == 0, BaseUpperBits(Cs))?;
    for (s, r) in [(&g.ss, Ss), (&g.ds, Ds), (&g.es, Es)] {
        ensure(s.unusable() || s.base >> 32 == 0, BaseUpperBits(r))?;
    }
    // CS.
    let cs = &g.cs;
    ensure(
        cs.access_rights & ar::RESERVED == 0,
        AccessRightsReserved(Cs),
    )?;
    let t = cs.type_();
    ensure(
        matches!(t, 9 | 11 | 13 | 15) || (unrestricted && t == 3),
        CsType(t),
    )?;
    ensure(cs.has(ar::S), NotCodeOrData(Cs))?;
    ensure(cs.has(ar::P), NotPresent(Cs))?;
    let (csd, ssd) = (cs.dpl(), g.ss.dpl());
    let dpl_ok = match t {
        3 => csd == 0,
        9 | 11 => csd == ssd,
        _ => csd <= ssd,
    };
    ensure(dpl_ok, CsDpl { cs: csd, ss: ssd })?;
    ensure(
        !(ia32e && cs.has(ar::L) && cs.has(ar::DB)),
        CsLongAndDefaultBig,
    )?;
    ensure(limit_ok(cs), LimitGranularity(Cs))?;
    // SS.
    let ss = &g.ss;
    if !ss.unusable() {
        ensure(
            ss.access_rights & ar::RESERVED == 0,
            AccessRightsReserved(Ss),
        )?;
        ensure(matches!(ss.type_(), 3 | 7), SsType(ss.type_()))?;
        ensure(ss.has(ar::S), NotCodeOrData(Ss))?;
        ensure(ss.has(ar::P), NotPresent(Ss))?;
        ensure(limit_ok(ss), LimitGranularity(Ss))?;
    }
    ensure(unrestricted || ss.dpl() == ss.rpl(), SsDplRpl)?;
    ensure(g.cr0 & CR0_PE != 0 || ss.dpl() == 0, SsDplRealMode)?;
    // DS, ES, FS, GS.
    for (s, r) in [(&g.ds, Ds), (&g.es, Es), (&g.fs, Fs), (&g.gs, Gs)] {
        check_data_segment(v, s, r)?;
    }
    // TR.
    let tr = &g.tr;
    ensure(!tr.unusable(), TrUnusable)?;
    ensure(
        tr.access_rights & ar::RESERVED == 0,
        AccessRightsReserved(Tr),
    )?;
    ensure(
        tr.type_() == 11 || (!ia32e && tr.type_() == 3),
        TrType(tr.type_()),
    )?;
    ensure(!tr.has(ar::S), NotSystem(Tr))?;
    ensure(tr.has(ar::P), NotPresent(Tr))?;
    ensure(limit_ok(tr), LimitGranularity(Tr))?;
    // LDTR.
    let ldtr = &g.ldtr;
    if !ldtr.unusable() {
        ensure(
            ldtr.access_rights & ar::RESERVED == 0,
            AccessRightsReserved(Ldtr),
        )?;
        ensure(ldtr.type_() == 2, LdtrType(ldtr.type_()))?;
        ensure(!ldtr.has(ar::S), NotSystem(Ldtr))?;
        ensure(ldtr.has(ar::P), NotPresent(Ldtr))?;
        ensure(limit_ok(ldtr), LimitGranularity(Ldtr))?;
    }
    Ok(())
}

fn check_descriptor_tables(v: &Vmcs) -> R {
    use DescriptorTableRegister::*;
    use GuestStateError::*;
    for (t, r) in [(&v.guest.gdtr, Gdtr), (&v.guest.idtr, Idtr)] {
        ensure(canonical(t.base), TableBaseNotCanonical(r))?;
        ensure(t.limit >> 16 == 0, TableLimit(r))?;
    }
    Ok(())
}

fn check_rip_rflags(v: &Vmcs) -> R {
    use GuestStateError::*;
    let g = &v.guest;
    if v.ia32e_mode_guest() && g.cs.has(ar::L) {
        ensure(canonical(g.rip), RipNotCanonical)?;
    } else {
        ensure(g.rip >> 32 == 0, RipUpperBits)?;
    }
    ensure(
        g.rflags & RFLAGS_RESERVED == 0 && g.rflags & RFLAGS_FIXED1 != 0,
        RflagsReserved,
    )?;
    if let Some(i) = v.entry_interruption()
        && i.kind == InterruptionType::ExternalInterrupt
    {
        ensure(g.rflags & RFLAGS_IF != 0, RflagsIfClearForInterrupt)?;
    }
    Ok(())
}

fn check_non_register_state(v: &Vmcs) -> R {
    use GuestStateError::*;
    let g = &v.guest;
    let act = g.activity_state;
    // SDM §27.3.1.5: the activity state must be one the processor supports (IA32_VMX_MISC
    // bits 8:6 for HLT, shutdown, wait-for-SIPI). This model is mapped onto KVM, which has no
    // MP state for shutdown (a shut-down vCPU is an exit, KVM_EXIT_SHUTDOWN, not a state to
    // enter), so it reports shutdown unsupported and the checks refuse it, as hardware
    // without that support does; before, such a state passed the checks and `Vmcs::to_kvm`
    // refused it (`vmcs` fuzz finding in CI's timed run).
    ensure(
        matches!(act, ACTIVITY_ACTIVE | ACTIVITY_HLT | ACTIVITY_WAIT_SIPI),
        ActivityState(act),
    )?;
    ensure(
        act != ACTIVITY_HLT || g.ss.dpl() == 0,
        HltWithCpl(g.ss.dpl()),
    )?;
    let intr = g.interruptibility_state;
    ensure(
        intr & !INTR_DEFINED == 0,
        InterruptibilityReserved(intr & !INTR_DEFINED),
    )?;
    let shadow = INTR_BLOCKING_STI | INTR_BLOCKING_MOV_SS;
    ensure(intr & shadow != shadow, StiAndMovSsBlocking)?;
    ensure(
        intr & INTR_BLOCKING_STI == 0 || g.rflags & RFLAGS_IF != 0,
        StiBlockingWithIfClear,
    )?;
    // SDM §27.3.1.5: "Bit 2 (blocking by SMI) must be 0 if the processor is not in SMM."
    //
    // The checks refuse it, rather than the KVM mapping carrying it into KVM's SMM state
    // (`kvm_vcpu_events.smi.smm`), because this model is a VMCS entered by a VMM outside SMM:
    // there is no SMM-transfer monitor ("entry to SMM" and dual-monitor treatment are not
    // modelled, SMBASE is not mapped). Such a VM entry fails on hardware, so the guest never
    // runs. Mapping the bit to `smi.smm = 1` instead would run a guest the processor refuses,
    // and in a different machine state: KVM would switch it to the SMRAM address space, accept
    // RSM and restore a state-save area at SMBASE + 0xfe00 that this VMCS never described. Inside
    // SMM, blocking by SMI is implied by being in SMM, so a KVM vCPU in SMM needs no separate bit;
    // outside it there is nothing KVM could hold it in. `MapError::SmiBlocking` stays as the
    // representability error of the unchecked mapping.
    ensure(intr & INTR_BLOCKING_SMI == 0, SmiBlockingOutsideSmm)?;
    if let Some(i) = v.entry_interruption() {
        let allowed = match act {
            ACTIVITY_ACTIVE => true,
            ACTIVITY_HLT => match i.kind {
                InterruptionType::ExternalInterrupt | InterruptionType::Nmi => true,
                InterruptionType::HardwareException => matches!(i.vector, 1 | 18),
                InterruptionType::OtherEvent => i.vector == 0,
                _ => false,
            },
            ACTIVITY_SHUTDOWN => {
                i.kind == InterruptionType::Nmi
                    || (i.kind == InterruptionType::HardwareException && i.vector == 18)
            }
            _ => false,
        };
        ensure(allowed, ActivityBlocksInjection(act))?;
        match i.kind {
            InterruptionType::ExternalInterrupt => {
                ensure(intr & shadow == 0, InterruptInShadow)?;
            }
            InterruptionType::Nmi => {
                let virtual_nmis = v.execution.pin_based & super::controls::pin::VIRTUAL_NMIS != 0;
                ensure(
                    intr & INTR_BLOCKING_MOV_SS == 0
                        && (virtual_nmis || intr & INTR_BLOCKING_NMI == 0),
                    NmiBlocked,
                )?;
            }
            _ => {}
        }
    }
    ensure(g.vmcs_link_pointer == u64::MAX, VmcsLinkPointer)
}

fn check_event_injection(v: &Vmcs) -> R {
    use GuestStateError::*;
    use InterruptionType as T;
    let Some(i) = v.entry_interruption() else {
        return Ok(());
    };
    ensure(i.reserved == 0, EntryInfoReserved)?;
    match i.kind {
        T::Reserved => return Err(EntryEventType(1)),
        T::OtherEvent if i.vector != 0 => return Err(EntryEventType(7)),
        T::Nmi => ensure(i.vector == 2, EntryNmiVector(i.vector))?,
        T::HardwareException => ensure(i.vector <= 31, EntryExceptionVector(i.vector))?,
        _ => {}
    }
    let pe = !v.unrestricted_guest() || v.guest.cr0 & CR0_PE != 0;
    let needs_code = pe && i.kind == T::HardwareException && exception_has_error_code(i.vector);
    ensure(i.deliver_error_code == needs_code, EntryErrorCode(i.vector))?;
    if i.deliver_error_code {
        ensure(
            v.entry.exception_error_code >> 16 == 0,
            EntryErrorCodeReserved,
        )?;
    }
    if i.kind.is_software() {
        let len = v.entry.instruction_length;
        ensure((1..=15).contains(&len), EntryInstructionLength(len))?;
    }
    Ok(())
}
