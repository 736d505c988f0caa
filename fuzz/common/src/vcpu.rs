//! Fuzz vmkit-vcpu's VMCS model: field reads/writes by raw encoding, the VM-entry guest-state
//! checks, the VMCS → KVM mapping, interruption-information and exit-qualification decoders,
//! MSR-bitmap edits and CPUID templates from JSON.
//!
//! Input: a sequence of [`Op`]s decoded with `arbitrary`. Invariants: nothing panics; a write
//! that succeeds reads back (masked to the field's width, or its high half); whatever passes
//! `check_guest_state` maps to KVM structures (also through the IDT checks, a failing gate
//! turning the event into its #GP/#NP at the current RIP); decoders round-trip what they
//! decode; the software-event IDT checks read a gate only inside the IDT limit and fault only
//! with #GP/#NP and error code `vector·8 + 2` (+ EXT for `INT1`).

use arbitrary::{Arbitrary, Unstructured};
use vmkit_vcpu::cpuid::{CpuidTemplate, Topology};
use vmkit_vcpu::vmcs::checks::check_guest_state;
use vmkit_vcpu::vmcs::delivery::{
    DeliveryContext, ERROR_CODE_EXT, ERROR_CODE_IDT, EXCEPTION_GP, EXCEPTION_NP, EventDelivery,
    GateFaultReason, IdtGate, IdtMode, software_event_delivery,
};
use vmkit_vcpu::vmcs::exit_reason::{
    CrAccessQualification, EptViolationQualification, ExitReason, IoQualification,
};
use vmkit_vcpu::vmcs::{
    DescriptorTable, InterruptionInfo, InterruptionType, MsrBitmap, Vmcs, VmcsField,
};

/// One fuzz operation.
#[derive(Arbitrary, Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// VMREAD of a raw encoding.
    Read(u32),
    /// VMWRITE of a raw encoding.
    Write(u32, u64),
    /// Write a known field (index into the field table) with an arbitrary value.
    WriteKnown(u16, u64),
    /// Run the guest-state checks and, if they pass, the KVM mapping.
    CheckAndMap,
    /// Set up event injection.
    Inject(u32, u32, u32),
    /// Decode exit qualifications and exit reasons.
    Decode(u64, u16),
    /// Edit the MSR bitmap.
    MsrBitmap(u32, bool, bool),
    /// Build a CPUID template from (lossy UTF-8) JSON.
    Cpuid(Vec<u8>),
    /// The software-event IDT checks on their own: interruption information, mode (bits 1:0:
    /// real, protected, long; bit 2: virtual-8086 redirection), CPL, IDT limit and base, the
    /// gate's bytes and whether they can be read.
    Deliver(u32, u8, u8, u32, u64, [u8; 16], bool),
    /// Map the VMCS to KVM through the IDT checks, the injected event's gate being these bytes
    /// (or unreadable).
    MapThroughIdt([u8; 16], bool),
}

/// Number of [`Op`] variants (for encoding seeds).
const OP_VARIANTS: u64 = 10;

/// Run one input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut v = start();
    let fields: Vec<VmcsField> = VmcsField::all().collect();
    for _ in 0..256 {
        let Ok(op) = u.arbitrary::<Op>() else { break };
        step(&mut v, &fields, op);
    }
}

/// The VMCS every input starts from.
pub fn start() -> Vmcs {
    Vmcs::flat_64(0x9000, 0x10_0000, 0x8_0000)
}

/// Apply one op to `v`, checking its invariants.
pub fn step(v: &mut Vmcs, fields: &[VmcsField], op: Op) {
    {
        match op {
            Op::Read(enc) => {
                let _ = v.read(VmcsField(enc));
            }
            Op::Write(enc, val) => write(v, VmcsField(enc), val),
            Op::WriteKnown(i, val) => {
                if let Some(&f) = fields.get(i as usize % fields.len().max(1)) {
                    write(v, f, val & f.width().max_value());
                }
            }
            Op::CheckAndMap => {
                if check_guest_state(v).is_ok() {
                    v.to_kvm().expect("checked state must map");
                }
                let _ = v.to_kvm_unchecked();
            }
            Op::Inject(info, code, len) => {
                if let Some(i) = InterruptionInfo::from_raw(info) {
                    assert_eq!(i.to_raw(), info);
                    v.inject(i, code, len);
                }
            }
            Op::Decode(q, reason) => {
                assert_eq!(IoQualification::decode(q).encode(), q & 0xffff_007f);
                assert_eq!(CrAccessQualification::decode(q).encode(), q & 0xffff_0f7f);
                let e = EptViolationQualification::decode(q);
                assert_eq!(EptViolationQualification::decode(e.encode()), e);
                if let Some(r) = ExitReason::from_basic(reason) {
                    assert_eq!(r.number(), reason);
                }
            }
            Op::MsrBitmap(msr, read, on) => {
                let b = &mut v.execution.msr_bitmap;
                let r = if read {
                    b.set_read_exiting(msr, on)
                } else {
                    b.set_write_exiting(msr, on)
                };
                if r.is_ok() {
                    assert_eq!(
                        if read {
                            b.read_exits(msr)
                        } else {
                            b.write_exits(msr)
                        },
                        on
                    );
                }
                let _ = MsrBitmap::from_bytes(&msr.to_le_bytes());
            }
            Op::Deliver(info, mode, cpl, limit, base, gate, readable) => {
                deliver(info, mode, cpl, limit, base, &gate, readable)
            }
            Op::MapThroughIdt(gate, readable) => map_through_idt(v, &gate, readable),
            Op::Cpuid(json) => {
                if let Ok(t) = CpuidTemplate::from_json(&String::from_utf8_lossy(&json)) {
                    let host = kvm_bindings::CpuId::new(0).expect("empty CPUID");
                    let _ = t.build(
                        &host,
                        Topology {
                            vcpu_id: 1,
                            nr_vcpus: 2,
                        },
                    );
                }
            }
        }
    }
}

fn deliver(info: u32, mode: u8, cpl: u8, limit: u32, base: u64, gate: &[u8; 16], readable: bool) {
    let Some(info) = InterruptionInfo::from_raw(info) else {
        return;
    };
    let idt_mode = match mode & 3 {
        0 => IdtMode::Real,
        1 => IdtMode::Protected,
        _ => IdtMode::Long,
    };
    let mut ctx = DeliveryContext::new(idt_mode, cpl & 3, DescriptorTable { base, limit });
    ctx.vme_redirection = mode & 4 != 0;
    let size = idt_mode.gate_size();
    let mut reads = 0;
    let d = software_event_delivery(info, &ctx, |addr, buf| {
        reads += 1;
        assert_eq!(buf.len() as u64, size);
        assert!(
            info.vector as u64 * size + size - 1 <= limit as u64,
            "read beyond the limit"
        );
        let mut want = base.wrapping_add(info.vector as u64 * size);
        if idt_mode == IdtMode::Protected {
            want &= 0xffff_ffff;
        }
        assert_eq!(addr, want);
        buf.copy_from_slice(&gate[..buf.len()]);
        readable
    });
    let ext = match info.kind {
        InterruptionType::SoftwareInterrupt | InterruptionType::SoftwareException => 0,
        InterruptionType::PrivilegedSoftwareException => ERROR_CODE_EXT,
        _ => {
            assert_eq!(d, EventDelivery::NotChecked);
            return;
        }
    };
    match d {
        EventDelivery::NotChecked => assert!(
            idt_mode == IdtMode::Real
                || (ctx.vme_redirection && info.kind == InterruptionType::SoftwareInterrupt)
        ),
        EventDelivery::Delivered(g) => {
            assert!(readable && reads == 1);
            assert_eq!(IdtGate::decode(idt_mode, &gate[..size as usize]), Some(g));
            assert!(g.present && g.is_idt_gate(idt_mode));
            assert!(ext != 0 || g.dpl >= ctx.cpl);
        }
        EventDelivery::GateUnreadable { .. } => assert!(!readable && reads == 1),
        EventDelivery::Fault(f) => {
            let code = (info.vector as u32) << 3 | ERROR_CODE_IDT;
            match f.reason {
                GateFaultReason::Privilege => {
                    assert_eq!((f.vector, f.error_code, ext), (EXCEPTION_GP, code, 0))
                }
                GateFaultReason::NotPresent => {
                    assert_eq!((f.vector, f.error_code), (EXCEPTION_NP, code | ext))
                }
                GateFaultReason::BeyondLimit | GateFaultReason::NotAGate => {
                    assert_eq!((f.vector, f.error_code), (EXCEPTION_GP, code | ext))
                }
            }
            assert_eq!(reads, (f.reason != GateFaultReason::BeyondLimit) as u32);
        }
    }
}

fn map_through_idt(v: &Vmcs, gate: &[u8; 16], readable: bool) {
    let read = |_: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&gate[..buf.len()]);
        readable
    };
    let _ = v.to_kvm_unchecked_through_idt(read);
    if check_guest_state(v).is_err() {
        return;
    }
    let (k, d) = v.to_kvm_through_idt(read).expect("checked state must map");
    if let EventDelivery::Fault(f) = d {
        let e = &k.events.exception;
        assert_eq!((e.injected, e.nr, e.has_error_code), (1, f.vector, 1));
        assert_eq!(e.error_code, f.error_code);
        assert_eq!(
            k.regs.rip, v.guest.rip,
            "a fault of the INT pushes its own RIP"
        );
    } else {
        assert_eq!(Some(k), v.to_kvm().ok());
    }
}

fn write(v: &mut Vmcs, f: VmcsField, val: u64) {
    if v.write(f, val).is_ok() {
        let expect = if f.is_high() {
            val
        } else {
            val & f.width().max_value()
        };
        assert_eq!(v.read(f), Ok(expect), "{f:?}");
    }
}

/// Encode `ops` as `arbitrary` decodes them: integers little-endian, a `bool` as a byte, an
/// enum variant `i` of `n` as a `u32` `v` with `v * n >> 32 == i`, a `Vec` as a continue-byte
/// before each element and a 0 after the last.
pub fn encode(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        let (i, body): (u64, Vec<u8>) = match op {
            Op::Read(e) => (0, e.to_le_bytes().to_vec()),
            Op::Write(e, v) => (1, [&e.to_le_bytes()[..], &v.to_le_bytes()].concat()),
            Op::WriteKnown(i, v) => (2, [&i.to_le_bytes()[..], &v.to_le_bytes()].concat()),
            Op::CheckAndMap => (3, Vec::new()),
            Op::Inject(a, b, c) => (
                4,
                [a.to_le_bytes(), b.to_le_bytes(), c.to_le_bytes()].concat(),
            ),
            Op::Decode(q, r) => (5, [&q.to_le_bytes()[..], &r.to_le_bytes()].concat()),
            Op::MsrBitmap(m, r, on) => (6, [&m.to_le_bytes()[..], &[*r as u8, *on as u8]].concat()),
            Op::Cpuid(json) => {
                let mut b: Vec<u8> = json.iter().flat_map(|&c| [1, c]).collect();
                b.push(0);
                (7, b)
            }
            Op::Deliver(info, mode, cpl, limit, base, gate, readable) => (
                8,
                [
                    &info.to_le_bytes()[..],
                    &[*mode, *cpl],
                    &limit.to_le_bytes(),
                    &base.to_le_bytes(),
                    gate,
                    &[*readable as u8],
                ]
                .concat(),
            ),
            Op::MapThroughIdt(gate, readable) => (9, [&gate[..], &[*readable as u8]].concat()),
        };
        out.extend((((i << 32).div_ceil(OP_VARIANTS)) as u32).to_le_bytes());
        out.extend(body);
    }
    out
}

/// A 16-byte 64-bit interrupt gate to handler 0x30_0000 (CS 0x08) with attribute byte `attr`.
fn gate(attr: u8) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[2] = 0x08;
    g[5] = attr;
    g[6..8].copy_from_slice(&0x30u16.to_le_bytes());
    g
}

/// The seed inputs as ops.
pub fn seed_ops() -> Vec<(String, Vec<Op>)> {
    vec![
        ("empty".into(), vec![]),
        (
            "ops".into(),
            vec![
                Op::Read(0x681e),
                Op::Write(0x6820, 0),
                Op::CheckAndMap,
                Op::Inject(0x8000_0b0d, 0x18, 0),
                Op::CheckAndMap,
                Op::Decode(0x03f8_0008, 30),
            ],
        ),
        (
            "cpuid_json".into(),
            vec![Op::Cpuid(br#"{"name":"x","hide":["avx2"]}"#.to_vec())],
        ),
        (
            // INT 0x80 / INT3 / INT1 at CPL 0 and CPL 3 through present, not-present and
            // out-of-limit gates.
            "deliver".into(),
            vec![
                Op::Deliver(0x8000_0480, 2, 3, 0xfff, 0x1000, gate(0x8e), true),
                Op::Deliver(0x8000_0480, 2, 3, 0xfff, 0x1000, gate(0xee), true),
                Op::Deliver(0x8000_0603, 1, 3, 0x7ff, 0x1000, gate(0x8e), true),
                Op::Deliver(0x8000_0501, 2, 3, 0xfff, 0x1000, gate(0x0e), true),
                Op::Deliver(0x8000_0430, 2, 0, 0x30 * 16 + 14, 0x1000, gate(0x8e), true),
                Op::Deliver(0x8000_0421, 5, 3, 0x7ff, 0, gate(0x8e), true),
                Op::Deliver(0x8000_0480, 2, 0, 0xfff, 0x1000, gate(0x8e), false),
            ],
        ),
        (
            // A ring-3 guest (CS/SS DPL 3) injecting INT 0x30 through a DPL-0 gate, then a
            // DPL-3 one, then one that is not present.
            "map_through_idt".into(),
            vec![
                Op::Write(VmcsField::GUEST_IDTR_LIMIT.0, 0xfff),
                Op::Write(VmcsField::GUEST_CS_SELECTOR.0, 0x2b),
                Op::Write(VmcsField::GUEST_CS_AR_BYTES.0, 0xa0fb),
                Op::Write(VmcsField::GUEST_SS_SELECTOR.0, 0x33),
                Op::Write(VmcsField::GUEST_SS_AR_BYTES.0, 0xc0f3),
                Op::Inject(0x8000_0430, 0, 2),
                Op::MapThroughIdt(gate(0x8e), true),
                Op::MapThroughIdt(gate(0xee), true),
                Op::MapThroughIdt(gate(0x6e), true),
                Op::MapThroughIdt(gate(0xee), false),
            ],
        ),
    ]
}

/// Deterministic seed inputs (written to `corpus/vmcs/` by [`tests::seed_corpus_is_current`]
/// when `VMKIT_WRITE_CORPUS=1`).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    seed_ops()
        .into_iter()
        .map(|(name, ops)| (name, encode(&ops)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_corpus_is_current() {
        crate::check_seed_files("vmcs", seeds());
    }

    #[test]
    fn seeds_decode_to_their_ops() {
        for (name, ops) in seed_ops() {
            let data = encode(&ops);
            let mut u = Unstructured::new(&data);
            let mut got = Vec::new();
            while !u.is_empty() {
                got.push(u.arbitrary::<Op>().unwrap());
            }
            assert_eq!(got, ops, "{name}");
        }
    }

    #[test]
    fn map_through_idt_seed_reaches_a_privilege_fault() {
        let (_, ops) = seed_ops()
            .into_iter()
            .find(|(n, _)| n == "map_through_idt")
            .unwrap();
        let fields: Vec<VmcsField> = VmcsField::all().collect();
        let mut v = start();
        for op in ops
            .into_iter()
            .take_while(|o| !matches!(o, Op::MapThroughIdt(..)))
        {
            step(&mut v, &fields, op);
        }
        check_guest_state(&v).unwrap();
        let d = v.software_event_delivery(|_, b| {
            b.copy_from_slice(&gate(0x8e));
            true
        });
        assert!(
            matches!(d, EventDelivery::Fault(f) if f.reason == GateFaultReason::Privilege),
            "{d:?}"
        );
    }

    #[test]
    fn replay_corpus_vmcs() {
        let seeds = crate::corpus("vmcs");
        assert!(seeds.len() >= 3, "seed corpus missing");
        for s in seeds {
            run(&s);
        }
    }

    /// Issue 23's libFuzzer finding (`corpus/vmcs/regress-smi-blocking`): blocking by SMI
    /// passed `check_guest_state` and was then refused by `Vmcs::to_kvm`.
    #[test]
    fn regress_smi_blocking_checked_state_maps() {
        let data = [
            0x5b, 0x5b, 0x5b, 0x41, 0x5b, 0x01, 0x04, 0x00, 0x00, 0x00, 0x00, 0x01, 0xff, 0xff,
            0xff, 0xff, 0xff, 0xff,
        ];
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../corpus/vmcs/regress-smi-blocking");
        assert_eq!(std::fs::read(path).ok().as_deref(), Some(&data[..]));
        run(&data);
    }

    #[test]
    fn random_inputs_do_not_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..300 {
            let data: Vec<u8> = (0..len * 4)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            run(&data);
        }
    }
}
