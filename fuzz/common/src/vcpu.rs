//! Fuzz vmkit-vcpu's VMCS model: field reads/writes by raw encoding, the VM-entry guest-state
//! checks, the VMCS → KVM mapping, interruption-information and exit-qualification decoders,
//! MSR-bitmap edits and CPUID templates from JSON.
//!
//! Input: a sequence of [`Op`]s decoded with `arbitrary`. Invariants: nothing panics; a write
//! that succeeds reads back (masked to the field's width, or its high half); whatever passes
//! `check_guest_state` maps to KVM structures; decoders round-trip what they decode.

use arbitrary::{Arbitrary, Unstructured};
use vmkit_vcpu::cpuid::{CpuidTemplate, Topology};
use vmkit_vcpu::vmcs::checks::check_guest_state;
use vmkit_vcpu::vmcs::exit_reason::{
    CrAccessQualification, EptViolationQualification, ExitReason, IoQualification,
};
use vmkit_vcpu::vmcs::{InterruptionInfo, MsrBitmap, Vmcs, VmcsField};

/// One fuzz operation.
#[derive(Arbitrary, Debug)]
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
}

/// Run one input.
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let mut v = Vmcs::flat_64(0x9000, 0x10_0000, 0x8_0000);
    let fields: Vec<VmcsField> = VmcsField::all().collect();
    for _ in 0..256 {
        let Ok(op) = u.arbitrary::<Op>() else { break };
        match op {
            Op::Read(enc) => {
                let _ = v.read(VmcsField(enc));
            }
            Op::Write(enc, val) => write(&mut v, VmcsField(enc), val),
            Op::WriteKnown(i, val) => {
                if let Some(&f) = fields.get(i as usize % fields.len().max(1)) {
                    write(&mut v, f, val & f.width().max_value());
                }
            }
            Op::CheckAndMap => {
                if check_guest_state(&v).is_ok() {
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

/// Deterministic seed inputs (written to `corpus/vmcs/` by [`tests::seed_corpus_is_current`]
/// when `VMKIT_WRITE_CORPUS=1`).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    fn enc(ops: &[u8]) -> Vec<u8> {
        ops.to_vec()
    }
    let mut out = vec![("empty".to_string(), Vec::new())];
    // Op tags are the first byte (arbitrary picks the variant from a u32 read modulo 8).
    let mut d = Vec::new();
    for (tag, body) in [
        (0u32, 0x681eu32.to_le_bytes().to_vec()),
        (
            1,
            [
                0x6820u32.to_le_bytes().to_vec(),
                0u64.to_le_bytes().to_vec(),
            ]
            .concat(),
        ),
        (3, Vec::new()),
        (
            4,
            [
                0x8000_0b0du32.to_le_bytes(),
                0x18u32.to_le_bytes(),
                0u32.to_le_bytes(),
            ]
            .concat(),
        ),
        (3, Vec::new()),
        (
            5,
            [
                0x03f8_0008u64.to_le_bytes().to_vec(),
                30u16.to_le_bytes().to_vec(),
            ]
            .concat(),
        ),
    ] {
        d.extend(tag.to_le_bytes());
        d.extend(body);
    }
    out.push(("ops".into(), enc(&d)));
    let mut j = 7u32.to_le_bytes().to_vec();
    j.extend((br#"{"name":"x","hide":["avx2"]}"#.len() as u32).to_le_bytes());
    j.extend(br#"{"name":"x","hide":["avx2"]}"#);
    out.push(("cpuid_json".into(), j));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_corpus_is_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus/vmcs");
        for (name, data) in seeds() {
            let path = dir.join(&name);
            if std::env::var_os("VMKIT_WRITE_CORPUS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &data).unwrap();
            }
            assert_eq!(
                std::fs::read(&path).ok(),
                Some(data),
                "{name}: run with VMKIT_WRITE_CORPUS=1"
            );
        }
    }

    #[test]
    fn replay_corpus_vmcs() {
        let seeds = crate::corpus("vmcs");
        assert!(seeds.len() >= 3, "seed corpus missing");
        for s in seeds {
            run(&s);
        }
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
