//! Table tests and a model-based property test of the software-event IDT checks.

use proptest::prelude::*;

use super::*;
use crate::vmcs::InterruptionType as T;

const IDT_BASE: u64 = 0x1000;

/// Encode a gate: type, S, DPL, P in the attribute byte; selector 0x08; offset 0x1234_5678_9abc.
fn gate_bytes(mode: IdtMode, type_: u8, s: bool, dpl: u8, present: bool) -> Vec<u8> {
    let offset: u64 = 0x1234_5678_9abc;
    let attr = type_ as u64 | (s as u64) << 4 | (dpl as u64 & 3) << 5 | (present as u64) << 7;
    let lo = (offset & 0xffff) | 0x08 << 16 | attr << 40 | ((offset >> 16) & 0xffff) << 48;
    let mut b = lo.to_le_bytes().to_vec();
    if mode == IdtMode::Long {
        b.extend((offset >> 32).to_le_bytes());
    }
    b
}

struct Row {
    kind: T,
    vector: u8,
    mode: IdtMode,
    cpl: u8,
    limit: u32,
    type_: u8,
    dpl: u8,
    present: bool,
    /// None: delivered as injected; Some((exception, error code, reason)).
    expect: Option<(u8, u32, GateFaultReason)>,
}

fn run(r: &Row) -> (EventDelivery, u32) {
    let ctx = DeliveryContext::new(
        r.mode,
        r.cpl,
        DescriptorTable {
            base: IDT_BASE,
            limit: r.limit,
        },
    );
    let bytes = gate_bytes(r.mode, r.type_, false, r.dpl, r.present);
    let mut reads = 0;
    let d = software_event_delivery(
        InterruptionInfo::new(r.vector, r.kind, false),
        &ctx,
        |a, buf| {
            reads += 1;
            assert_eq!(a, IDT_BASE + r.vector as u64 * r.mode.gate_size());
            buf.copy_from_slice(&bytes);
            true
        },
    );
    (d, reads)
}

#[test]
fn table_of_gate_checks() {
    use GateFaultReason::*;
    use IdtMode::*;
    let long = 256 * 16 - 1;
    let prot = 256 * 8 - 1;
    let i = GATE_TYPE_INTERRUPT;
    #[rustfmt::skip]
    let rows = [
        // INT n (type 4): the DPL check, EXT clear.
        Row { kind: T::SoftwareInterrupt, vector: 0x80, mode: Long, cpl: 3, limit: long, type_: i, dpl: 0, present: true, expect: Some((13, 0x402, Privilege)) },
        Row { kind: T::SoftwareInterrupt, vector: 0x80, mode: Long, cpl: 3, limit: long, type_: i, dpl: 3, present: true, expect: None },
        Row { kind: T::SoftwareInterrupt, vector: 0x80, mode: Long, cpl: 0, limit: long, type_: i, dpl: 0, present: true, expect: None },
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Long, cpl: 2, limit: long, type_: i, dpl: 1, present: true, expect: Some((13, 0x182, Privilege)) },
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Long, cpl: 1, limit: long, type_: i, dpl: 2, present: true, expect: None },
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Protected, cpl: 3, limit: prot, type_: i, dpl: 0, present: true, expect: Some((13, 0x182, Privilege)) },
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Protected, cpl: 3, limit: prot, type_: GATE_TYPE_TRAP_16, dpl: 3, present: true, expect: None },
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Protected, cpl: 3, limit: prot, type_: GATE_TYPE_TASK, dpl: 3, present: true, expect: None },
        // Not present: #NP after the DPL check, EXT clear.
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Long, cpl: 0, limit: long, type_: i, dpl: 0, present: false, expect: Some((11, 0x182, NotPresent)) },
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Long, cpl: 3, limit: long, type_: i, dpl: 0, present: false, expect: Some((13, 0x182, Privilege)) },
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Protected, cpl: 3, limit: prot, type_: i, dpl: 3, present: false, expect: Some((11, 0x182, NotPresent)) },
        // Beyond the limit: the last byte of the gate counts.
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Long, cpl: 0, limit: 0x30 * 16 + 14, type_: i, dpl: 3, present: true, expect: Some((13, 0x182, BeyondLimit)) },
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Long, cpl: 0, limit: 0x30 * 16 + 15, type_: i, dpl: 3, present: true, expect: None },
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Protected, cpl: 0, limit: 0x30 * 8 + 6, type_: i, dpl: 3, present: true, expect: Some((13, 0x182, BeyondLimit)) },
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Protected, cpl: 0, limit: 0x30 * 8 + 7, type_: i, dpl: 3, present: true, expect: None },
        Row { kind: T::SoftwareInterrupt, vector: 0xff, mode: Long, cpl: 3, limit: 0, type_: i, dpl: 3, present: true, expect: Some((13, 0x7fa, BeyondLimit)) },
        // Not a gate for the mode: #GP before the DPL and present checks.
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Long, cpl: 3, limit: long, type_: GATE_TYPE_TASK, dpl: 0, present: false, expect: Some((13, 0x182, NotAGate)) },
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Long, cpl: 0, limit: long, type_: GATE_TYPE_INTERRUPT_16, dpl: 0, present: true, expect: Some((13, 0x182, NotAGate)) },
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Protected, cpl: 0, limit: prot, type_: 0xc, dpl: 0, present: true, expect: Some((13, 0x182, NotAGate)) },
        Row { kind: T::SoftwareInterrupt, vector: 0x30, mode: Protected, cpl: 0, limit: prot, type_: 0, dpl: 3, present: true, expect: Some((13, 0x182, NotAGate)) },
        // INT3 / INTO (type 6): like INT n.
        Row { kind: T::SoftwareException, vector: 3, mode: Long, cpl: 3, limit: long, type_: i, dpl: 0, present: true, expect: Some((13, 0x1a, Privilege)) },
        Row { kind: T::SoftwareException, vector: 3, mode: Long, cpl: 3, limit: long, type_: GATE_TYPE_TRAP, dpl: 3, present: true, expect: None },
        Row { kind: T::SoftwareException, vector: 4, mode: Protected, cpl: 3, limit: prot, type_: i, dpl: 2, present: true, expect: Some((13, 0x22, Privilege)) },
        Row { kind: T::SoftwareException, vector: 3, mode: Long, cpl: 0, limit: long, type_: i, dpl: 0, present: false, expect: Some((11, 0x1a, NotPresent)) },
        // INT1 (type 5): no DPL check; EXT set in the error code.
        Row { kind: T::PrivilegedSoftwareException, vector: 1, mode: Long, cpl: 3, limit: long, type_: i, dpl: 0, present: true, expect: None },
        Row { kind: T::PrivilegedSoftwareException, vector: 1, mode: Protected, cpl: 3, limit: prot, type_: i, dpl: 0, present: true, expect: None },
        Row { kind: T::PrivilegedSoftwareException, vector: 1, mode: Long, cpl: 3, limit: long, type_: i, dpl: 0, present: false, expect: Some((11, 0xb, NotPresent)) },
        Row { kind: T::PrivilegedSoftwareException, vector: 1, mode: Long, cpl: 0, limit: 0xf, type_: i, dpl: 0, present: true, expect: Some((13, 0xb, BeyondLimit)) },
        Row { kind: T::PrivilegedSoftwareException, vector: 1, mode: Protected, cpl: 0, limit: prot, type_: 0x2, dpl: 0, present: true, expect: Some((13, 0xb, NotAGate)) },
    ];
    for (n, r) in rows.iter().enumerate() {
        let (d, reads) = run(r);
        match r.expect {
            None => {
                assert!(matches!(d, EventDelivery::Delivered(_)), "row {n}: {d:?}");
                assert_eq!(reads, 1, "row {n}");
            }
            Some((vector, error_code, reason)) => {
                assert_eq!(
                    d,
                    EventDelivery::Fault(GateFault {
                        vector,
                        error_code,
                        reason
                    }),
                    "row {n}"
                );
                let expect_reads = if reason == BeyondLimit { 0 } else { 1 };
                assert_eq!(
                    reads, expect_reads,
                    "row {n}: gate read only inside the limit"
                );
            }
        }
    }
}

#[test]
fn real_mode_and_hardware_events_are_not_checked() {
    let idtr = DescriptorTable {
        base: IDT_BASE,
        limit: 0,
    };
    let never = |_: u64, _: &mut [u8]| -> bool { panic!("no gate read expected") };
    // Real-address mode: no DPL; limit handled by KVM's delivery.
    for kind in [
        T::SoftwareInterrupt,
        T::SoftwareException,
        T::PrivilegedSoftwareException,
    ] {
        let ctx = DeliveryContext::new(IdtMode::Real, 0, idtr);
        let d = software_event_delivery(InterruptionInfo::new(0x30, kind, false), &ctx, never);
        assert_eq!(d, EventDelivery::NotChecked);
    }
    // Hardware events in any mode: KVM's delivery is right for them.
    for kind in [
        T::ExternalInterrupt,
        T::Nmi,
        T::HardwareException,
        T::Reserved,
        T::OtherEvent,
    ] {
        let ctx = DeliveryContext::new(IdtMode::Long, 3, idtr);
        let d = software_event_delivery(InterruptionInfo::new(2, kind, false), &ctx, never);
        assert_eq!(d, EventDelivery::NotChecked);
    }
}

#[test]
fn virtual_8086_redirection_skips_only_int_n() {
    let mut ctx = DeliveryContext::new(
        IdtMode::Protected,
        3,
        DescriptorTable {
            base: IDT_BASE,
            limit: 0x7ff,
        },
    );
    ctx.vme_redirection = true;
    let d = software_event_delivery(InterruptionInfo::software_interrupt(0x21), &ctx, |_, _| {
        panic!("redirected INT n is not checked")
    });
    assert_eq!(d, EventDelivery::NotChecked);
    // INT3 is not redirected: DPL 0 gate at CPL 3 → #GP(3·8 + 2).
    let bytes = gate_bytes(IdtMode::Protected, GATE_TYPE_INTERRUPT, false, 0, true);
    let d = software_event_delivery(
        InterruptionInfo::new(3, T::SoftwareException, false),
        &ctx,
        |_, b| {
            b.copy_from_slice(&bytes);
            true
        },
    );
    assert!(
        matches!(d, EventDelivery::Fault(f) if f.error_code == 0x1a),
        "{d:?}"
    );
}

#[test]
fn unreadable_gate_and_code_data_descriptor() {
    let ctx = DeliveryContext::new(
        IdtMode::Long,
        3,
        DescriptorTable {
            base: 0xffff_ffff_ffff_f000,
            limit: 0xfff,
        },
    );
    let info = InterruptionInfo::software_interrupt(0x80);
    let d = software_event_delivery(info, &ctx, |_, _| false);
    assert_eq!(
        d,
        EventDelivery::GateUnreadable {
            address: 0xffff_ffff_ffff_f800
        }
    );
    // S = 1 (a code/data descriptor with a gate-like type) is not a gate.
    let bytes = gate_bytes(IdtMode::Long, GATE_TYPE_INTERRUPT, true, 3, true);
    let d = software_event_delivery(info, &ctx, |_, b| {
        b.copy_from_slice(&bytes);
        true
    });
    assert!(
        matches!(d, EventDelivery::Fault(f) if f.reason == GateFaultReason::NotAGate),
        "{d:?}"
    );
    // Protected mode: the gate address wraps at 4 GiB.
    let ctx = DeliveryContext::new(
        IdtMode::Protected,
        0,
        DescriptorTable {
            base: 0xffff_fff8,
            limit: 0x7ff,
        },
    );
    let d = software_event_delivery(info, &ctx, |_, _| false);
    assert_eq!(d, EventDelivery::GateUnreadable { address: 0x3f8 });
}

#[test]
fn gate_decode_reads_offset_selector_and_attributes() {
    let b = gate_bytes(IdtMode::Long, GATE_TYPE_TRAP, false, 2, true);
    let g = IdtGate::decode(IdtMode::Long, &b).unwrap();
    assert_eq!(
        g,
        IdtGate {
            type_: GATE_TYPE_TRAP,
            s: false,
            dpl: 2,
            present: true,
            selector: 0x08,
            offset: 0x1234_5678_9abc,
        }
    );
    let g = IdtGate::decode(IdtMode::Protected, &b[..8]).unwrap();
    assert_eq!(g.offset, 0x5678_9abc);
    assert_eq!(IdtGate::decode(IdtMode::Long, &b[..8]), None);
    assert_eq!(IdtGate::decode(IdtMode::Real, &b), None);
}

#[test]
fn vmcs_context_follows_mode_cpl_and_vme() {
    use crate::vmcs::checks::{CR0_PE, RFLAGS_VM};
    use crate::vmcs::controls::entry;
    let mut v = Vmcs::flat_64(0x9000, 0x10_0000, 0x8_0000);
    v.guest.idtr = DescriptorTable {
        base: IDT_BASE,
        limit: 0xfff,
    };
    let c = v.delivery_context();
    assert_eq!(
        (c.mode, c.cpl, c.idtr, c.vme_redirection),
        (IdtMode::Long, 0, v.guest.idtr, false)
    );
    v.guest.ss.access_rights |= 3 << crate::vmcs::ar::DPL_SHIFT;
    assert_eq!(v.delivery_context().cpl, 3);
    v.entry.controls &= !entry::IA32E_MODE_GUEST;
    assert_eq!(v.delivery_context().mode, IdtMode::Protected);
    v.execution.primary_processor_based |=
        crate::vmcs::controls::primary::ACTIVATE_SECONDARY_CONTROLS;
    v.execution.secondary_processor_based |= crate::vmcs::controls::secondary::UNRESTRICTED_GUEST;
    v.guest.cr0 &= !CR0_PE;
    assert_eq!(v.delivery_context().mode, IdtMode::Real);
    v.guest.cr0 |= CR0_PE;
    v.guest.rflags |= RFLAGS_VM;
    v.guest.cr4 |= CR4_VME;
    assert!(v.delivery_context().vme_redirection);
    // Nothing injected: nothing checked.
    assert_eq!(
        v.software_event_delivery(|_, _| panic!("no read")),
        EventDelivery::NotChecked
    );
}

/// An independent statement of the SDM rule (vol. 2, `INT n` protected/IA-32e mode), written
/// over the gate's fields rather than its bytes: the first failing condition wins.
fn model(
    kind: T,
    vector: u8,
    mode: IdtMode,
    cpl: u8,
    limit: u32,
    (type_, s, dpl, present): (u8, bool, u8, bool),
) -> Option<Option<(u8, u32)>> {
    let software = match kind {
        T::SoftwareInterrupt | T::SoftwareException => true,
        T::PrivilegedSoftwareException => false,
        _ => return None,
    };
    if mode == IdtMode::Real {
        return None;
    }
    let ext = if software { 0 } else { 1 };
    let code = |ext| vector as u32 * 8 + 2 + ext;
    let entry = if mode == IdtMode::Long { 16 } else { 8 };
    let valid_types: &[u8] = if mode == IdtMode::Long {
        &[14, 15]
    } else {
        &[5, 6, 7, 14, 15]
    };
    let conditions = [
        (vector as u32 * entry + entry - 1 > limit, 13, code(ext)),
        (s || !valid_types.contains(&type_), 13, code(ext)),
        (software && dpl < cpl, 13, code(0)),
        (!present, 11, code(ext)),
    ];
    Some(
        conditions
            .iter()
            .find(|c| c.0)
            .map(|&(_, exception, error_code)| (exception, error_code)),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn matches_the_sdm_model(
        kind in (0u32..8).prop_map(T::from_bits),
        vector in any::<u8>(),
        mode in prop::sample::select(vec![IdtMode::Real, IdtMode::Protected, IdtMode::Long]),
        cpl in 0u8..4,
        limit in prop_oneof![0u32..0x1000, Just(0x7ff), Just(0xfff), Just(0xffff)],
        type_ in 0u8..16,
        s in any::<bool>(),
        dpl in 0u8..4,
        present in any::<bool>(),
    ) {
        let ctx = DeliveryContext::new(mode, cpl, DescriptorTable { base: IDT_BASE, limit });
        let bytes = gate_bytes(mode, type_, s, dpl, present);
        let got = software_event_delivery(InterruptionInfo::new(vector, kind, false), &ctx, |_, b| {
            b.copy_from_slice(&bytes[..b.len()]);
            true
        });
        let want = model(kind, vector, mode, cpl, limit, (type_, s, dpl, present));
        match (got, want) {
            (EventDelivery::NotChecked, None) => {}
            (EventDelivery::Delivered(g), Some(None)) => {
                prop_assert_eq!((g.type_, g.s, g.dpl, g.present), (type_, s, dpl, present));
            }
            (EventDelivery::Fault(f), Some(Some((exception, code)))) => {
                prop_assert_eq!((f.vector, f.error_code), (exception, code));
                prop_assert_eq!(f.interruption_info().to_raw(), 0x8000_0b00 | exception as u32);
            }
            (got, want) => prop_assert!(false, "got {:?}, model {:?}", got, want),
        }
    }
}
