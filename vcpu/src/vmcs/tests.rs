use super::checks::{self, GuestStateError as E, SegmentRegister as S, check_guest_state};
use super::exit_reason::*;
use super::*;

fn valid() -> Vmcs {
    Vmcs::flat_64(0x9000, 0x10_0000, 0x8_0000)
}

#[test]
fn encodings_decode_per_sdm_appendix_b() {
    // (field, width, type) from SDM appendix B tables B-1 … B-12.
    let table = [
        (
            VmcsField::VIRTUAL_PROCESSOR_ID,
            FieldWidth::Bits16,
            FieldType::Control,
        ),
        (
            VmcsField::GUEST_ES_SELECTOR,
            FieldWidth::Bits16,
            FieldType::GuestState,
        ),
        (
            VmcsField::HOST_TR_SELECTOR,
            FieldWidth::Bits16,
            FieldType::HostState,
        ),
        (
            VmcsField::MSR_BITMAP,
            FieldWidth::Bits64,
            FieldType::Control,
        ),
        (
            VmcsField::GUEST_PHYSICAL_ADDRESS,
            FieldWidth::Bits64,
            FieldType::ExitInformation,
        ),
        (
            VmcsField::GUEST_IA32_EFER,
            FieldWidth::Bits64,
            FieldType::GuestState,
        ),
        (
            VmcsField::HOST_IA32_EFER,
            FieldWidth::Bits64,
            FieldType::HostState,
        ),
        (
            VmcsField::EXCEPTION_BITMAP,
            FieldWidth::Bits32,
            FieldType::Control,
        ),
        (
            VmcsField::VM_EXIT_REASON,
            FieldWidth::Bits32,
            FieldType::ExitInformation,
        ),
        (
            VmcsField::GUEST_CS_AR_BYTES,
            FieldWidth::Bits32,
            FieldType::GuestState,
        ),
        (
            VmcsField::HOST_IA32_SYSENTER_CS,
            FieldWidth::Bits32,
            FieldType::HostState,
        ),
        (
            VmcsField::CR0_GUEST_HOST_MASK,
            FieldWidth::Natural,
            FieldType::Control,
        ),
        (
            VmcsField::EXIT_QUALIFICATION,
            FieldWidth::Natural,
            FieldType::ExitInformation,
        ),
        (
            VmcsField::GUEST_RIP,
            FieldWidth::Natural,
            FieldType::GuestState,
        ),
        (
            VmcsField::HOST_RIP,
            FieldWidth::Natural,
            FieldType::HostState,
        ),
    ];
    for (f, w, t) in table {
        assert_eq!((f.width(), f.field_type()), (w, t), "{f:?}");
    }
    assert_eq!(VmcsField::GUEST_RIP.0, 0x681e);
    assert_eq!(VmcsField::VM_ENTRY_INTR_INFO_FIELD.0, 0x4016);
    assert_eq!(VmcsField::GUEST_INTERRUPTIBILITY_INFO.index(), 0x12);
}

#[test]
fn every_known_field_holds_its_full_width_and_is_sorted() {
    let mut prev = None;
    for f in VmcsField::all() {
        assert!(!f.has_reserved_bits() && !f.is_high(), "{f:?}");
        assert!(prev < Some(f), "table not sorted at {f:?}");
        prev = Some(f);
        let mut v = Vmcs::default();
        let max = f.width().max_value();
        v.write_unchecked_access(f, max).unwrap();
        assert_eq!(
            v.read(f).unwrap(),
            max,
            "{f:?} storage narrower than its width"
        );
        assert!(f.name().is_some());
    }
    assert!(VmcsField::all().count() > 120);
}

#[test]
fn read_write_errors() {
    let mut v = valid();
    assert_eq!(
        v.read(VmcsField(0x6830)),
        Err(VmcsError::UnknownField(0x6830))
    );
    assert_eq!(
        v.read(VmcsField(0x1_681e)),
        Err(VmcsError::ReservedEncodingBits(0x1_681e))
    );
    assert_eq!(
        v.read(VmcsField(0x181e)),
        Err(VmcsError::ReservedEncodingBits(0x181e))
    );
    assert_eq!(
        v.read(VmcsField(0x681f)),
        Err(VmcsError::HighAccessToNon64Bit(0x681f))
    );
    assert_eq!(
        v.write(VmcsField::GUEST_CS_LIMIT, 1 << 32),
        Err(VmcsError::ValueTooWide {
            field: 0x4802,
            value: 1 << 32,
            width: FieldWidth::Bits32
        })
    );
    assert_eq!(
        v.write(VmcsField::EXIT_QUALIFICATION, 1),
        Err(VmcsError::ReadOnlyField(0x6400))
    );
    let high = VmcsField(VmcsField::TSC_OFFSET.0 | 1);
    v.write(VmcsField::TSC_OFFSET, 0x1111_2222_3333_4444)
        .unwrap();
    v.write(high, 0xaaaa_bbbb).unwrap();
    assert_eq!(v.execution.tsc_offset, 0xaaaa_bbbb_3333_4444);
    assert_eq!(v.read(high).unwrap(), 0xaaaa_bbbb);
    assert!(matches!(
        v.write(high, 1 << 32),
        Err(VmcsError::ValueTooWide { .. })
    ));
}

#[test]
fn typed_fields_alias_encoded_fields() {
    let mut v = valid();
    v.write(VmcsField::GUEST_SS_AR_BYTES, 0xc093).unwrap();
    assert_eq!(v.guest.ss.access_rights, 0xc093);
    assert_eq!(v.read(VmcsField::GUEST_CS_SELECTOR).unwrap(), 0x08);
    assert_eq!(v.read(VmcsField::GUEST_CS_AR_BYTES).unwrap(), 0xa09b);
    assert_eq!(v.read(VmcsField::GUEST_TR_AR_BYTES).unwrap(), 0x8b);
    v.inject(InterruptionInfo::hardware_exception(14), 2, 0);
    assert_eq!(
        v.read(VmcsField::VM_ENTRY_INTR_INFO_FIELD).unwrap(),
        0x8000_0b0e
    );
    assert_eq!(v.guest_visible_cr4(), 0x20);
}

#[test]
fn exit_reasons_have_architectural_numbers() {
    assert_eq!(ExitReason::ExceptionOrNmi.number(), 0);
    assert_eq!(ExitReason::TripleFault.number(), 2);
    assert_eq!(ExitReason::InterruptWindow.number(), 7);
    assert_eq!(ExitReason::Cpuid.number(), 10);
    assert_eq!(ExitReason::Hlt.number(), 12);
    assert_eq!(ExitReason::Vmcall.number(), 18);
    assert_eq!(ExitReason::CrAccess.number(), 28);
    assert_eq!(ExitReason::IoInstruction.number(), 30);
    assert_eq!(ExitReason::Rdmsr.number(), 31);
    assert_eq!(ExitReason::Wrmsr.number(), 32);
    assert_eq!(ExitReason::EntryFailureGuestState.number(), 33);
    assert_eq!(ExitReason::EptViolation.number(), 48);
    assert_eq!(ExitReason::EptMisconfiguration.number(), 49);
    assert_eq!(ExitReason::Xsetbv.number(), 55);
    for n in [35, 38, 42, 71, 78, 0xffff] {
        assert_eq!(ExitReason::from_basic(n), None, "{n}");
    }
    for r in ExitReason::ALL {
        assert_eq!(ExitReason::from_basic(r.number()), Some(*r));
    }
}

#[test]
fn io_qualification_sdm_table_28_5() {
    // out 0x80, al: size 1, OUT, immediate operand.
    let q = IoQualification::decode(0x0080_0040);
    assert_eq!(q.size, 1);
    assert_eq!(q.direction, IoDirection::Out);
    assert!(q.immediate && !q.string && !q.rep);
    assert_eq!(q.port, 0x80);
    // rep insw with DX = 0x1f0: size 2 (1), IN, string, REP.
    let q = IoQualification::decode(0x01f0_0039);
    assert_eq!(
        (q.size, q.direction, q.string, q.rep),
        (2, IoDirection::In, true, true)
    );
    assert_eq!(q.encode(), 0x01f0_0039);
    // out dx, eax: size 4 (3).
    assert_eq!(IoQualification::decode(3).size, 4);
}

#[test]
fn cr_access_qualification_sdm_table_28_3() {
    // clts
    assert_eq!(
        CrAccessQualification::decode(0x20).access,
        CrAccessType::Clts
    );
    // lmsw from memory with source 0x0001.
    let q = CrAccessQualification::decode(0x0001_0070);
    assert_eq!(q.access, CrAccessType::Lmsw);
    assert!(q.lmsw_memory);
    assert_eq!(q.lmsw_source, 1);
    // mov cr8, r15
    let q = CrAccessQualification::decode(0xf08);
    assert_eq!((q.cr, q.gpr, q.access), (8, 15, CrAccessType::MovToCr));
    assert_eq!(q.encode(), 0xf08);
}

#[test]
fn ept_violation_qualification_sdm_table_28_7() {
    // Instruction fetch from a non-executable but readable page.
    let q = EptViolationQualification::decode(0x18c);
    assert!(q.fetch && q.readable && !q.executable && q.linear_address_valid);
    assert!(q.translated_access);
    // A paging-structure access during translation (bit 8 clear) of a read.
    let q = EptViolationQualification::decode(0x81);
    assert!(q.read && q.linear_address_valid && !q.translated_access);
    assert_eq!(q.encode(), 0x81);
    assert!(EptViolationQualification::decode(1 << 12).nmi_unblocking);
}

#[test]
fn interruption_info_round_trips() {
    for raw in [
        0x8000_0020u32,
        0x8000_0202,
        0x8000_0b0d,
        0x8000_0480,
        0x8000_0603,
    ] {
        assert_eq!(InterruptionInfo::from_raw(raw).unwrap().to_raw(), raw);
    }
    assert_eq!(InterruptionInfo::nmi().to_raw(), 0x8000_0202);
    assert_eq!(
        InterruptionInfo::hardware_exception(6).to_raw(),
        0x8000_0306
    );
    assert_eq!(
        InterruptionInfo::software_interrupt(0x80).to_raw(),
        0x8000_0480
    );
}

#[test]
fn msr_bitmap_layout_sdm_25_6_9() {
    let mut b = MsrBitmap::default();
    b.set_write_exiting(0x1ff9, true).unwrap();
    assert_eq!(b.as_bytes()[2048 + 0x1ff9 / 8], 1 << 1);
    b.set_read_exiting(0xc000_1fff, true).unwrap();
    assert_eq!(b.as_bytes()[2047], 0x80);
    assert_eq!(
        b.set_read_exiting(0x2000, true),
        Err(MsrBitmapError::OutOfRange(0x2000))
    );
    assert_eq!(
        MsrBitmap::from_bytes(&[0; 10]),
        Err(MsrBitmapError::WrongSize(10))
    );
    let json = serde_json::to_string(&b).unwrap();
    assert_eq!(serde_json::from_str::<MsrBitmap>(&json).unwrap(), b);
    assert!(serde_json::from_str::<MsrBitmap>("[1,2,3]").is_err());
}

#[test]
fn valid_state_passes() {
    check_guest_state(&valid()).unwrap();
    // Real mode with unrestricted guest.
    let mut v = valid();
    v.execution.primary_processor_based |= controls::primary::ACTIVATE_SECONDARY_CONTROLS;
    v.execution.secondary_processor_based |= controls::secondary::UNRESTRICTED_GUEST;
    v.entry.controls &= !controls::entry::IA32E_MODE_GUEST;
    v.guest.ia32_efer = 0;
    v.guest.cr0 = 0x60 | checks::CR0_NE | 0x1000_0000;
    v.guest.cr0 = checks::CR0_NE | (1 << 4);
    v.guest.cr4 = checks::CR4_VMXE;
    v.guest.cs = VmcsSegment {
        selector: 0xf000,
        base: 0xf_0000,
        limit: 0xffff,
        access_rights: 0x9b,
    };
    for s in [
        &mut v.guest.ds,
        &mut v.guest.es,
        &mut v.guest.fs,
        &mut v.guest.gs,
        &mut v.guest.ss,
    ] {
        *s = VmcsSegment {
            selector: 0,
            base: 0,
            limit: 0xffff,
            access_rights: 0x93,
        };
    }
    v.guest.rip = 0xfff0;
    check_guest_state(&v).unwrap();
}

/// The fuzz finding of issue 23 (`fuzz/corpus/vmcs/regress-smi-blocking`): a state with
/// blocking by SMI passed the checks and then failed to map. Whatever the checks pass must map.
#[test]
fn smi_blocking_is_refused_by_the_checks_not_the_mapping() {
    let mut v = valid();
    v.guest.interruptibility_state = checks::INTR_BLOCKING_SMI;
    assert!(
        check_guest_state(&v).is_err() || v.to_kvm().is_ok(),
        "checked state fails to map: {:?}",
        v.to_kvm()
    );
}

/// One test per rule: mutate the valid state, expect exactly that rule.
macro_rules! rule {
    ($name:ident, |$v:ident| $mutate:expr, $expected:pat) => {
        #[test]
        fn $name() {
            let mut $v = valid();
            $mutate;
            let r = check_guest_state(&$v);
            assert!(
                matches!(r, Err($expected)),
                "{}: got {r:?}",
                stringify!($name)
            );
        }
    };
}

rule!(
    rule_cr0_fixed_one,
    |v| v.guest.cr0 &= !checks::CR0_NE,
    E::Cr0FixedOne { missing: 0x20 }
);
rule!(
    rule_cr0_pe_fixed_without_unrestricted,
    |v| v.guest.cr0 &= !checks::CR0_PE,
    E::Cr0FixedOne { missing: 1 }
);
rule!(
    rule_cr0_reserved,
    |v| v.guest.cr0 |= 1 << 40,
    E::Cr0Reserved { .. }
);
rule!(
    rule_cr0_pg_without_pe,
    |v| {
        v.execution.primary_processor_based |= controls::primary::ACTIVATE_SECONDARY_CONTROLS;
        v.execution.secondary_processor_based |= controls::secondary::UNRESTRICTED_GUEST;
        v.guest.cr0 &= !checks::CR0_PE
    },
    E::Cr0PgWithoutPe
);
rule!(
    rule_cr0_nw_without_cd,
    |v| v.guest.cr0 |= checks::CR0_NW,
    E::Cr0NwWithoutCd
);
rule!(
    rule_cr4_fixed_one,
    |v| v.guest.cr4 &= !checks::CR4_VMXE,
    E::Cr4FixedOne { .. }
);
rule!(
    rule_cr4_reserved,
    |v| v.guest.cr4 |= 1 << 40,
    E::Cr4Reserved { .. }
);
rule!(
    rule_cr3_reserved,
    |v| v.guest.cr3 |= 1 << 60,
    E::Cr3Reserved
);
rule!(
    rule_dr7_reserved,
    |v| v.guest.dr7 |= 1 << 33,
    E::Dr7Reserved
);
rule!(
    rule_sysenter_canonical,
    |v| v.guest.ia32_sysenter_eip = 1 << 50,
    E::SysenterNotCanonical
);
rule!(
    rule_pat_reserved,
    |v| v.guest.ia32_pat = (v.guest.ia32_pat & !(0xff << 16)) | (2 << 16),
    E::PatReserved { entry: 2 }
);
rule!(
    rule_efer_reserved,
    |v| v.guest.ia32_efer |= 1 << 20,
    E::EferReserved { .. }
);
rule!(
    rule_efer_lma_vs_ia32e,
    |v| v.guest.ia32_efer &= !checks::EFER_LMA,
    E::EferLmaMismatch
);
rule!(
    rule_efer_lme_vs_lma,
    |v| v.guest.ia32_efer &= !checks::EFER_LME,
    E::EferLmeMismatch
);
rule!(
    rule_ia32e_without_paging,
    |v| {
        v.execution.primary_processor_based |= controls::primary::ACTIVATE_SECONDARY_CONTROLS;
        v.execution.secondary_processor_based |= controls::secondary::UNRESTRICTED_GUEST;
        v.guest.cr0 &= !checks::CR0_PG
    },
    E::Ia32eModeWithoutPaging
);
rule!(
    rule_ia32e_without_pae,
    |v| v.guest.cr4 &= !checks::CR4_PAE,
    E::Ia32eModeWithoutPae
);
rule!(
    rule_pcide_outside_ia32e,
    |v| {
        v.entry.controls &= !controls::entry::IA32E_MODE_GUEST;
        v.guest.ia32_efer = 0;
        v.guest.cs.access_rights &= !ar::L;
        v.guest.cr4 |= checks::CR4_PCIDE
    },
    E::PcideOutsideIa32eMode
);
rule!(
    rule_rflags_vm,
    |v| v.guest.rflags |= checks::RFLAGS_VM,
    E::RflagsVm
);
rule!(
    rule_tr_selector_ti,
    |v| v.guest.tr.selector |= 4,
    E::SelectorTi(S::Tr)
);
rule!(
    rule_ldtr_selector_ti,
    |v| v.guest.ldtr = VmcsSegment {
        selector: 0x2c,
        base: 0,
        limit: 0xff,
        access_rights: 0x82
    },
    E::SelectorTi(S::Ldtr)
);
rule!(
    rule_ss_rpl_vs_cs_rpl,
    |v| v.guest.ss.selector |= 3,
    E::SsRplMismatch
);
rule!(
    rule_fs_base_canonical,
    |v| v.guest.fs.base = 1 << 47,
    E::BaseNotCanonical(S::Fs)
);
rule!(
    rule_cs_base_upper,
    |v| v.guest.cs.base = 1 << 32,
    E::BaseUpperBits(S::Cs)
);
rule!(
    rule_ds_base_upper,
    |v| v.guest.ds.base = 1 << 32,
    E::BaseUpperBits(S::Ds)
);
rule!(
    rule_cs_ar_reserved,
    |v| v.guest.cs.access_rights |= 1 << 8,
    E::AccessRightsReserved(S::Cs)
);
rule!(
    rule_cs_type,
    |v| v.guest.cs.access_rights = (v.guest.cs.access_rights & !0xf) | 0xa,
    E::CsType(10)
);
rule!(
    rule_cs_not_code_data,
    |v| v.guest.cs.access_rights &= !ar::S,
    E::NotCodeOrData(S::Cs)
);
rule!(
    rule_cs_not_present,
    |v| v.guest.cs.access_rights &= !ar::P,
    E::NotPresent(S::Cs)
);
rule!(
    rule_cs_dpl,
    |v| v.guest.cs.access_rights |= 3 << ar::DPL_SHIFT,
    E::CsDpl { cs: 3, ss: 0 }
);
rule!(
    rule_cs_l_and_db,
    |v| v.guest.cs.access_rights |= ar::DB,
    E::CsLongAndDefaultBig
);
rule!(
    rule_cs_limit_granularity,
    |v| v.guest.cs.limit = 0xffff_f000,
    E::LimitGranularity(S::Cs)
);
rule!(
    rule_ss_type,
    |v| v.guest.ss.access_rights = (v.guest.ss.access_rights & !0xf) | 1,
    E::SsType(1)
);
rule!(
    rule_ss_dpl_vs_rpl,
    |v| {
        v.guest.cs.access_rights |= 0xf; // conforming: CS.DPL 0 <= SS.DPL 3
        v.guest.ss.access_rights |= 3 << ar::DPL_SHIFT
    },
    E::SsDplRpl
);
rule!(
    rule_ss_dpl_real_mode,
    |v| {
        v.execution.primary_processor_based |= controls::primary::ACTIVATE_SECONDARY_CONTROLS;
        v.execution.secondary_processor_based |= controls::secondary::UNRESTRICTED_GUEST;
        v.entry.controls &= !controls::entry::IA32E_MODE_GUEST;
        v.guest.ia32_efer = 0;
        v.guest.cr0 = checks::CR0_NE;
        v.guest.cs.access_rights |= 1 << ar::DPL_SHIFT;
        v.guest.ss.access_rights |= 1 << ar::DPL_SHIFT
    },
    E::SsDplRealMode
);
rule!(
    rule_ds_not_accessed,
    |v| v.guest.ds.access_rights &= !1,
    E::NotAccessed(S::Ds)
);
rule!(
    rule_es_code_not_readable,
    |v| v.guest.es.access_rights = (v.guest.es.access_rights & !0xf) | 9,
    E::CodeNotReadable(S::Es)
);
rule!(
    rule_fs_system,
    |v| v.guest.fs.access_rights &= !ar::S,
    E::NotCodeOrData(S::Fs)
);
rule!(
    rule_gs_not_present,
    |v| v.guest.gs.access_rights &= !ar::P,
    E::NotPresent(S::Gs)
);
rule!(
    rule_ds_dpl_below_rpl,
    |v| v.guest.ds.selector |= 2,
    E::DplBelowRpl(S::Ds)
);
rule!(
    rule_ds_limit_granularity,
    |v| v.guest.ds.access_rights &= !ar::G,
    E::LimitGranularity(S::Ds)
);
rule!(
    rule_tr_unusable,
    |v| v.guest.tr.access_rights |= ar::UNUSABLE,
    E::TrUnusable
);
rule!(
    rule_tr_type,
    |v| v.guest.tr.access_rights = (v.guest.tr.access_rights & !0xf) | 9,
    E::TrType(9)
);
rule!(
    rule_tr_not_system,
    |v| v.guest.tr.access_rights |= ar::S,
    E::NotSystem(S::Tr)
);
rule!(
    rule_ldtr_type,
    |v| v.guest.ldtr = VmcsSegment {
        selector: 0x28,
        base: 0,
        limit: 0xff,
        access_rights: 0x83
    },
    E::LdtrType(3)
);
rule!(
    rule_gdtr_base,
    |v| v.guest.gdtr.base = 1 << 48,
    E::TableBaseNotCanonical(checks::DescriptorTableRegister::Gdtr)
);
rule!(
    rule_idtr_limit,
    |v| v.guest.idtr.limit = 0x1_0000,
    E::TableLimit(checks::DescriptorTableRegister::Idtr)
);
rule!(
    rule_rip_canonical,
    |v| v.guest.rip = 0x0000_8000_0000_0000,
    E::RipNotCanonical
);
rule!(
    rule_rip_upper_outside_64bit,
    |v| {
        v.guest.cs.access_rights = (v.guest.cs.access_rights & !ar::L) | ar::DB;
        v.guest.rip = 1 << 32
    },
    E::RipUpperBits
);
rule!(
    rule_rflags_reserved,
    |v| v.guest.rflags = 0,
    E::RflagsReserved
);
rule!(
    rule_if_clear_for_external_interrupt,
    |v| v.inject(InterruptionInfo::external_interrupt(0x20), 0, 0),
    E::RflagsIfClearForInterrupt
);
rule!(
    rule_activity_state,
    |v| v.guest.activity_state = 4,
    E::ActivityState(4)
);
rule!(
    rule_hlt_with_cpl3,
    |v| {
        for s in [
            &mut v.guest.ss,
            &mut v.guest.ds,
            &mut v.guest.es,
            &mut v.guest.fs,
            &mut v.guest.gs,
        ] {
            s.access_rights |= 3 << ar::DPL_SHIFT;
            s.selector |= 3;
        }
        v.guest.cs.access_rights |= 3 << ar::DPL_SHIFT;
        v.guest.cs.selector |= 3;
        v.guest.activity_state = checks::ACTIVITY_HLT
    },
    E::HltWithCpl(3)
);
rule!(
    rule_activity_blocks_injection,
    |v| {
        v.guest.activity_state = checks::ACTIVITY_WAIT_SIPI;
        v.inject(InterruptionInfo::nmi(), 0, 0)
    },
    E::ActivityBlocksInjection(3)
);
rule!(
    rule_interruptibility_reserved,
    |v| v.guest.interruptibility_state = 1 << 5,
    E::InterruptibilityReserved(0x20)
);
rule!(
    rule_sti_and_mov_ss,
    |v| {
        v.guest.rflags |= checks::RFLAGS_IF;
        v.guest.interruptibility_state = 3
    },
    E::StiAndMovSsBlocking
);
rule!(
    rule_sti_with_if_clear,
    |v| v.guest.interruptibility_state = checks::INTR_BLOCKING_STI,
    E::StiBlockingWithIfClear
);
rule!(
    rule_smi_blocking_outside_smm,
    |v| v.guest.interruptibility_state = checks::INTR_BLOCKING_SMI,
    E::SmiBlockingOutsideSmm
);
rule!(
    rule_interrupt_in_shadow,
    |v| {
        v.guest.rflags |= checks::RFLAGS_IF;
        v.guest.interruptibility_state = checks::INTR_BLOCKING_STI;
        v.inject(InterruptionInfo::external_interrupt(0x20), 0, 0)
    },
    E::InterruptInShadow
);
rule!(
    rule_nmi_blocked,
    |v| {
        v.guest.interruptibility_state = checks::INTR_BLOCKING_NMI;
        v.inject(InterruptionInfo::nmi(), 0, 0)
    },
    E::NmiBlocked
);
rule!(
    rule_vmcs_link_pointer,
    |v| v.guest.vmcs_link_pointer = 0,
    E::VmcsLinkPointer
);
rule!(
    rule_entry_reserved_type,
    |v| v.entry.interruption_info = 0x8000_0120,
    E::EntryEventType(1)
);
rule!(
    rule_entry_nmi_vector,
    |v| v.inject(InterruptionInfo::new(3, InterruptionType::Nmi, false), 0, 0),
    E::EntryNmiVector(3)
);
rule!(
    rule_entry_exception_vector,
    |v| v.inject(
        InterruptionInfo::new(40, InterruptionType::HardwareException, false),
        0,
        0
    ),
    E::EntryExceptionVector(40)
);
rule!(
    rule_entry_error_code_mismatch,
    |v| v.inject(
        InterruptionInfo::new(6, InterruptionType::HardwareException, true),
        0,
        0
    ),
    E::EntryErrorCode(6)
);
rule!(
    rule_entry_error_code_reserved,
    |v| v.inject(InterruptionInfo::hardware_exception(13), 0x1_0000, 0),
    E::EntryErrorCodeReserved
);
rule!(
    rule_entry_info_reserved,
    |v| v.entry.interruption_info = 0x8000_1000 | 0x30d,
    E::EntryInfoReserved
);
rule!(
    rule_entry_instruction_length,
    |v| v.inject(InterruptionInfo::software_interrupt(0x80), 0, 0),
    E::EntryInstructionLength(0)
);
