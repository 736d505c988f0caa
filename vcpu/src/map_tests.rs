//! Property tests: VMCS → KVM structures → VMCS is the identity on the mapped fields.

use proptest::prelude::*;

use crate::kvm_map::{MapError, segment_from_kvm, segment_to_kvm};
use crate::vmcs::checks::{CR0_NE, CR4_VMXE};
use crate::vmcs::controls::{primary, secondary};
use crate::vmcs::{
    DescriptorTable, GeneralRegisters, GuestMsrs, InterruptionInfo, InterruptionType, Vmcs,
    VmcsSegment, ar,
};

fn segment() -> impl Strategy<Value = VmcsSegment> {
    (
        any::<u16>(),
        any::<u64>(),
        any::<u32>(),
        0u32..16,
        prop::array::uniform8(any::<bool>()),
        0u32..4,
    )
        .prop_map(|(selector, base, limit, ty, b, dpl)| {
            let bit = |on: bool, v: u32| if on { v } else { 0 };
            VmcsSegment {
                selector,
                base,
                limit,
                access_rights: ty
                    | bit(b[0], ar::S)
                    | (dpl << ar::DPL_SHIFT)
                    | bit(b[1], ar::P)
                    | bit(b[2], ar::AVL)
                    | bit(b[3], ar::L)
                    | bit(b[4], ar::DB)
                    | bit(b[5], ar::G)
                    | bit(b[6], ar::UNUSABLE),
            }
        })
}

fn table() -> impl Strategy<Value = DescriptorTable> {
    (any::<u64>(), 0u32..=0xffff).prop_map(|(base, limit)| DescriptorTable { base, limit })
}

fn injection() -> impl Strategy<Value = Option<(InterruptionInfo, u32)>> {
    prop_oneof![
        Just(None),
        any::<u8>().prop_map(|v| Some((InterruptionInfo::external_interrupt(v), 0))),
        Just(Some((InterruptionInfo::nmi(), 0))),
        (0u8..32, any::<bool>(), any::<u32>()).prop_map(|(v, code, ec)| Some((
            InterruptionInfo::new(v, InterruptionType::HardwareException, code),
            ec
        ))),
    ]
}

prop_compose! {
    fn vmcs()(
        gprs in prop::array::uniform15(any::<u64>()),
        rip_rsp_rflags in prop::array::uniform3(any::<u64>()),
        segs in prop::array::uniform8(segment()),
        gdtr in table(),
        idtr in table(),
        crs in prop::array::uniform6(any::<u64>()),
        drs in prop::array::uniform6(any::<u64>()),
        msrs in prop::array::uniform12(any::<u64>()),
        sysenter_cs in any::<u32>(),
        intr in prop::sample::select(vec![0u32, 1, 2, 8, 9, 10]),
        activity in prop::sample::select(vec![0u32, 1, 3]),
        inj in injection(),
    ) -> Vmcs {
        let mut v = Vmcs::default();
        v.execution.primary_processor_based = primary::ACTIVATE_SECONDARY_CONTROLS;
        v.execution.secondary_processor_based = secondary::UNRESTRICTED_GUEST;
        v.execution.cr0_guest_host_mask = CR0_NE;
        v.execution.cr4_guest_host_mask = CR4_VMXE;
        let [rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15] = gprs;
        let g = &mut v.guest;
        g.regs = GeneralRegisters { rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15 };
        [g.rip, g.rsp, g.rflags] = rip_rsp_rflags;
        [g.es, g.cs, g.ss, g.ds, g.fs, g.gs, g.ldtr, g.tr] = segs;
        g.gdtr = gdtr;
        g.idtr = idtr;
        let [cr0, cr2, cr3, cr4, cr8, efer] = crs;
        (g.cr0, g.cr2, g.cr3, g.cr4, g.cr8, g.ia32_efer) = (cr0, cr2, cr3, cr4, cr8, efer);
        let [d0, d1, d2, d3, dr6, dr7] = drs;
        g.dr0_3 = [d0, d1, d2, d3];
        (g.dr6, g.dr7) = (dr6, dr7);
        let [esp, eip, pat, star, lstar, cstar, fmask, kgs, tsc, apic, xcr0, _] = msrs;
        (g.ia32_sysenter_esp, g.ia32_sysenter_eip, g.ia32_pat) = (esp, eip, pat);
        g.msrs = GuestMsrs { star, lstar, cstar, fmask, kernel_gs_base: kgs, tsc, apic_base: apic };
        g.xcr0 = xcr0;
        g.ia32_sysenter_cs = sysenter_cs;
        g.interruptibility_state = intr;
        g.activity_state = activity;
        if let Some((info, code)) = inj {
            v.inject(info, code, 0);
        }
        v
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn vmcs_to_kvm_to_vmcs_is_identity_on_mapped_fields(v in vmcs()) {
        let back = Vmcs::from_kvm(&v.to_kvm_unchecked().unwrap());
        let (a, b) = (&v.guest, &back.guest);
        prop_assert_eq!(a.regs, b.regs);
        prop_assert_eq!((a.rip, a.rsp, a.rflags), (b.rip, b.rsp, b.rflags));
        for (x, y) in [(a.es, b.es), (a.cs, b.cs), (a.ss, b.ss), (a.ds, b.ds), (a.fs, b.fs),
                       (a.gs, b.gs), (a.ldtr, b.ldtr), (a.tr, b.tr)] {
            prop_assert_eq!(x, y);
        }
        prop_assert_eq!((a.gdtr, a.idtr), (b.gdtr, b.idtr));
        prop_assert_eq!(v.guest_visible_cr0(), back.guest_visible_cr0());
        prop_assert_eq!(v.guest_visible_cr4(), back.guest_visible_cr4());
        prop_assert_eq!((a.cr2, a.cr3, a.cr8, a.ia32_efer), (b.cr2, b.cr3, b.cr8, b.ia32_efer));
        prop_assert_eq!((a.dr0_3, a.dr6, a.dr7), (b.dr0_3, b.dr6, b.dr7));
        prop_assert_eq!(
            (a.ia32_sysenter_cs, a.ia32_sysenter_esp, a.ia32_sysenter_eip, a.ia32_pat),
            (b.ia32_sysenter_cs, b.ia32_sysenter_esp, b.ia32_sysenter_eip, b.ia32_pat)
        );
        prop_assert_eq!(a.msrs, b.msrs);
        prop_assert_eq!(a.xcr0, b.xcr0);
        prop_assert_eq!(a.interruptibility_state, b.interruptibility_state);
        prop_assert_eq!(a.activity_state, b.activity_state);
        prop_assert_eq!(v.entry.interruption_info, back.entry.interruption_info);
        if v.entry_interruption().is_some_and(|i| i.deliver_error_code) {
            prop_assert_eq!(v.entry.exception_error_code, back.entry.exception_error_code);
        }
    }

    #[test]
    fn segment_access_rights_round_trip(s in segment()) {
        prop_assert_eq!(segment_from_kvm(&segment_to_kvm(&s)), s);
    }
}

/// The shutdown activity state: this KVM-backed model reports it unsupported, so the checks
/// refuse it (SDM §27.3.1.5) and whatever passes them maps (CI fuzz finding).
#[test]
fn shutdown_activity_is_refused_by_the_checks_not_the_mapping() {
    let mut v = Vmcs::flat_64(0x9000, 0x10_0000, 0x8_0000);
    v.guest.activity_state = 2;
    assert_eq!(
        crate::vmcs::checks::check_guest_state(&v),
        Err(crate::vmcs::checks::GuestStateError::ActivityState(2))
    );
}

#[test]
fn unrepresentable_state_is_a_typed_error() {
    let mut v = Vmcs::flat_64(0x9000, 0x10_0000, 0x8_0000);
    v.guest.activity_state = 2; // shutdown
    assert_eq!(
        v.to_kvm_unchecked().unwrap_err(),
        MapError::ActivityState(2)
    );
    v.guest.activity_state = 0;
    v.guest.gdtr.limit = 0x1_0000;
    assert_eq!(
        v.to_kvm_unchecked().unwrap_err(),
        MapError::TableLimit(0x1_0000)
    );
    v.guest.gdtr.limit = 0x27;
    v.guest.interruptibility_state = 4; // blocking by SMI
    assert_eq!(v.to_kvm_unchecked().unwrap_err(), MapError::SmiBlocking);
    // The checked path rejects before mapping.
    v.guest.interruptibility_state = 0;
    v.guest.rflags = 0;
    assert!(matches!(v.to_kvm(), Err(MapError::GuestState(_))));
}

#[test]
fn flat_64_maps_to_the_long_mode_state() {
    let s = crate::LongModeState::flat_64(0x9000, 0x10_0000, 0x8_0000);
    let k = Vmcs::from_long_mode(&s).to_kvm().unwrap();
    let mut sregs = kvm_bindings::kvm_sregs::default();
    s.fill_sregs(&mut sregs);
    assert_eq!(k.sregs.cs, sregs.cs);
    assert_eq!(k.sregs.ss, sregs.ss);
    assert_eq!(k.sregs.tr, sregs.tr);
    assert_eq!(
        (k.sregs.cr0, k.sregs.cr4, k.sregs.efer),
        (s.cr0, s.cr4, s.efer)
    );
    assert_eq!((k.regs.rip, k.regs.rsp), (s.rip, s.rsp));
}
