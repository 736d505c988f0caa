//! The emulator's arithmetic against the host CPU executing the same instruction (an oracle
//! no one here wrote): every result bit and every arithmetic flag — the SDM's undefined ones
//! included — for tables of operands and incoming flags. A test whose instruction the host
//! lacks says so by name and skips (never silently).

use std::arch::asm;

use super::*;

/// Incoming flag states: all arithmetic flags clear, all set, and a mixture.
const FLAGS_IN: [u64; 3] = [0, ARITH, CF | ZF | OF];

/// Operands that reach every edge: 0, 1, all ones, sign bits, single bits, patterns.
const VALUES: [u64; 14] = [
    0,
    1,
    2,
    3,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x8000_0000_0000_0000,
    u64::MAX,
    0x0123_4567_89ab_cdef,
    0xf0f0_0000_0000_0f00,
    0x0000_ffff_0000_0001,
    0x5555_5555_aaaa_aaaa,
    0x0000_0000_0000_1010,
];

/// Whether the host has `feature`; prints a named skip line when it does not.
fn host_has(feature: bool, test: &str, name: &str) -> bool {
    if !feature {
        eprintln!("SKIPPED {test}: the host CPU lacks {name}, so there is no oracle");
    }
    feature
}

/// Run `$insn` on the host with `$fl` as the incoming RFLAGS: (result, outgoing flags).
macro_rules! host_unary {
    ($name:ident, $insn:literal, $m:literal) => {
        pub(crate) fn $name(src: u64, fl: u64) -> (u64, u64) {
            let (out, f): (u64, u64);
            // SAFETY: pushes and pops balance; only arithmetic flags (and the reserved bit 1)
            // are loaded, so TF/DF/AC stay as the Rust ABI needs them.
            unsafe {
                asm!(
                    "push {fi}", "popfq",
                    concat!($insn, " {o", $m, "}, {s", $m, "}"),
                    "pushfq", "pop {fo}",
                    fi = in(reg) (fl & ARITH) | 2, s = in(reg) src,
                    o = out(reg) out, fo = out(reg) f,
                );
            }
            (out, f & ARITH)
        }
    };
}

macro_rules! host_binary {
    ($name:ident, $insn:literal, $m:literal) => {
        pub(crate) fn $name(a: u64, b: u64, fl: u64) -> (u64, u64) {
            let (out, f): (u64, u64);
            // SAFETY: as in `host_unary`.
            unsafe {
                asm!(
                    "push {fi}", "popfq",
                    concat!($insn, " {o", $m, "}, {a", $m, "}, {b", $m, "}"),
                    "pushfq", "pop {fo}",
                    fi = in(reg) (fl & ARITH) | 2, a = in(reg) a, b = in(reg) b,
                    o = out(reg) out, fo = out(reg) f,
                );
            }
            (out, f & ARITH)
        }
    };
}

host_unary!(h_popcnt64, "popcnt", "");
host_unary!(h_popcnt32, "popcnt", ":e");
host_unary!(h_lzcnt64, "lzcnt", "");
host_unary!(h_lzcnt32, "lzcnt", ":e");
host_unary!(h_tzcnt64, "tzcnt", "");
host_unary!(h_tzcnt32, "tzcnt", ":e");
host_unary!(h_blsi64, "blsi", "");
host_unary!(h_blsi32, "blsi", ":e");
host_unary!(h_blsr64, "blsr", "");
host_unary!(h_blsr32, "blsr", ":e");
host_unary!(h_blsmsk64, "blsmsk", "");
host_unary!(h_blsmsk32, "blsmsk", ":e");
// Intel syntax: ANDN dst, src1, src2 = !src1 & src2; BEXTR dst, src, control;
// SHLX dst, src, count; PDEP dst, src, mask; PEXT dst, src, mask.
host_binary!(h_andn64, "andn", "");
host_binary!(h_andn32, "andn", ":e");
host_binary!(h_bextr64, "bextr", "");
host_binary!(h_bextr32, "bextr", ":e");
host_binary!(h_shlx64, "shlx", "");
host_binary!(h_shlx32, "shlx", ":e");
host_binary!(h_shrx64, "shrx", "");
host_binary!(h_shrx32, "shrx", ":e");
host_binary!(h_sarx64, "sarx", "");
host_binary!(h_sarx32, "sarx", ":e");
host_binary!(h_pdep64, "pdep", "");
host_binary!(h_pdep32, "pdep", ":e");
host_binary!(h_pext64, "pext", "");
host_binary!(h_pext32, "pext", ":e");

fn h_rorx64_13(src: u64) -> u64 {
    let out: u64;
    // SAFETY: a register-only instruction.
    unsafe { asm!("rorx {o}, {s}, 13", s = in(reg) src, o = out(reg) out) };
    out
}

fn h_rorx32_45(src: u64) -> u64 {
    let out: u64;
    // SAFETY: a register-only instruction; the count is masked to 5 bits (45 & 31 = 13).
    unsafe { asm!("rorx {o:e}, {s:e}, 45", s = in(reg) src, o = out(reg) out) };
    out
}

pub(crate) fn h_mulx64(a: u64, b: u64) -> (u64, u64) {
    let (hi, lo): (u64, u64);
    // SAFETY: MULX reads RDX implicitly; registers only.
    unsafe {
        asm!("mulx {hi}, {lo}, {b}", in("rdx") a, b = in(reg) b, hi = out(reg) hi, lo = out(reg) lo)
    };
    (hi, lo)
}

fn h_mulx32(a: u64, b: u64) -> (u64, u64) {
    let (hi, lo): (u64, u64);
    // SAFETY: as `h_mulx64`.
    unsafe {
        asm!("mulx {hi:e}, {lo:e}, {b:e}", in("rdx") a, b = in(reg) b, hi = out(reg) hi, lo = out(reg) lo)
    };
    (hi, lo)
}

type Unary = fn(u64, Width, u64) -> (u64, u64);
type HostUnary = fn(u64, u64) -> (u64, u64);

fn check_unary(name: &str, ours: Unary, host64: HostUnary, host32: HostUnary) {
    for &v in &VALUES {
        for &fl in &FLAGS_IN {
            for (w, host) in [(Width::W64, host64), (Width::W32, host32)] {
                let (r, f) = ours(v, w, fl);
                let (hr, hf) = host(v, fl);
                assert_eq!(
                    (r, f & ARITH),
                    (hr, hf),
                    "{name} {w:?} src={v:#x} flags_in={fl:#x}"
                );
            }
        }
    }
}

#[test]
fn popcnt_lzcnt_tzcnt_match_the_host() {
    let f = std::is_x86_feature_detected!("popcnt");
    if host_has(f, "popcnt_lzcnt_tzcnt_match_the_host", "POPCNT") {
        check_unary("popcnt", popcnt, h_popcnt64, h_popcnt32);
    }
    let f = std::is_x86_feature_detected!("lzcnt");
    if host_has(f, "popcnt_lzcnt_tzcnt_match_the_host", "LZCNT (ABM)") {
        check_unary("lzcnt", lzcnt, h_lzcnt64, h_lzcnt32);
    }
    let f = std::is_x86_feature_detected!("bmi1");
    if host_has(f, "popcnt_lzcnt_tzcnt_match_the_host", "TZCNT (BMI1)") {
        check_unary("tzcnt", tzcnt, h_tzcnt64, h_tzcnt32);
    }
}

#[test]
fn bmi1_matches_the_host() {
    if !host_has(
        std::is_x86_feature_detected!("bmi1"),
        "bmi1_matches_the_host",
        "BMI1",
    ) {
        return;
    }
    check_unary("blsi", blsi, h_blsi64, h_blsi32);
    check_unary("blsr", blsr, h_blsr64, h_blsr32);
    check_unary("blsmsk", blsmsk, h_blsmsk64, h_blsmsk32);
    for &a in &VALUES {
        for &b in &VALUES {
            for &fl in &FLAGS_IN {
                assert_eq!(
                    andn(a, b, Width::W64, fl),
                    h_andn64(a, b, fl),
                    "andn64 {a:#x} {b:#x}"
                );
                assert_eq!(
                    andn(a, b, Width::W32, fl),
                    h_andn32(a, b, fl),
                    "andn32 {a:#x} {b:#x}"
                );
            }
        }
        // BEXTR controls: start and length at, inside and beyond the width.
        for start in [0u64, 1, 7, 31, 32, 63, 64, 200] {
            for len in [0u64, 1, 8, 31, 32, 33, 64, 255] {
                let c = start | len << 8 | 0xdead_0000;
                for &fl in &FLAGS_IN {
                    assert_eq!(
                        bextr(a, c, Width::W64, fl),
                        h_bextr64(a, c, fl),
                        "bextr64 {a:#x} {c:#x}"
                    );
                    assert_eq!(
                        bextr(a, c, Width::W32, fl),
                        h_bextr32(a, c, fl),
                        "bextr32 {a:#x} {c:#x}"
                    );
                }
            }
        }
    }
}

#[test]
fn bmi2_matches_the_host() {
    if !host_has(
        std::is_x86_feature_detected!("bmi2"),
        "bmi2_matches_the_host",
        "BMI2",
    ) {
        return;
    }
    let counts = [0u64, 1, 5, 31, 32, 33, 63, 64, 65, 0xff];
    for &a in &VALUES {
        for &c in &counts {
            // The flags are unaffected: the host's outgoing flags equal the incoming ones.
            for (kind, h64, h32) in [
                (
                    ShiftKind::Shl,
                    h_shlx64 as fn(u64, u64, u64) -> (u64, u64),
                    h_shlx32 as fn(u64, u64, u64) -> (u64, u64),
                ),
                (ShiftKind::Shr, h_shrx64, h_shrx32),
                (ShiftKind::Sar, h_sarx64, h_sarx32),
            ] {
                assert_eq!(
                    (shift_x(kind, a, c, Width::W64), ARITH),
                    h64(a, c, ARITH),
                    "{kind:?}64 {a:#x} {c}"
                );
                assert_eq!(
                    (shift_x(kind, a, c, Width::W32), ARITH),
                    h32(a, c, ARITH),
                    "{kind:?}32 {a:#x} {c}"
                );
            }
        }
        assert_eq!(rorx(a, 13, Width::W64), h_rorx64_13(a), "rorx64 {a:#x}");
        assert_eq!(rorx(a, 45, Width::W32), h_rorx32_45(a), "rorx32 {a:#x}");
        for &b in &VALUES {
            assert_eq!(
                (pdep(a, b, Width::W64), 0),
                h_pdep64(a, b, 0),
                "pdep64 {a:#x} {b:#x}"
            );
            assert_eq!(
                (pdep(a, b, Width::W32), 0),
                h_pdep32(a, b, 0),
                "pdep32 {a:#x} {b:#x}"
            );
            assert_eq!(
                (pext(a, b, Width::W64), 0),
                h_pext64(a, b, 0),
                "pext64 {a:#x} {b:#x}"
            );
            assert_eq!(
                (pext(a, b, Width::W32), 0),
                h_pext32(a, b, 0),
                "pext32 {a:#x} {b:#x}"
            );
            assert_eq!(
                mulx(a, b, Width::W64),
                h_mulx64(a, b),
                "mulx64 {a:#x} {b:#x}"
            );
            assert_eq!(
                mulx(a, b, Width::W32),
                h_mulx32(a, b),
                "mulx32 {a:#x} {b:#x}"
            );
        }
    }
}
