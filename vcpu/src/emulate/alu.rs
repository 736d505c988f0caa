//! The arithmetic of the emulated instructions: pure functions of operand values and the
//! incoming RFLAGS, returning the result and the outgoing RFLAGS (Intel SDM vol. 2, each
//! instruction's "Operation" and "Flags Affected"). Flags the SDM leaves undefined are set as
//! the CPUs these tests ran on set them (the host-CPU oracle tests below check every
//! arithmetic flag, defined or not, against the host executing the same instruction).

/// RFLAGS.CF.
pub const CF: u64 = 1 << 0;
/// RFLAGS.PF.
pub const PF: u64 = 1 << 2;
/// RFLAGS.AF.
pub const AF: u64 = 1 << 4;
/// RFLAGS.ZF.
pub const ZF: u64 = 1 << 6;
/// RFLAGS.SF.
pub const SF: u64 = 1 << 7;
/// RFLAGS.OF.
pub const OF: u64 = 1 << 11;
/// RFLAGS.AC.
pub const AC: u64 = 1 << 18;
/// The six arithmetic flags.
pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;

/// Operand width of a bit-manipulation instruction: 32 or 64 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// 32-bit operands (results zero-extended to 64 bits in a register).
    W32,
    /// 64-bit operands.
    W64,
}

impl Width {
    /// Bits in the operand.
    pub const fn bits(self) -> u32 {
        match self {
            Width::W32 => 32,
            Width::W64 => 64,
        }
    }
    /// All ones in the operand.
    pub const fn mask(self) -> u64 {
        match self {
            Width::W32 => u32::MAX as u64,
            Width::W64 => u64::MAX,
        }
    }
    /// The sign bit.
    const fn sign(self) -> u64 {
        1 << (self.bits() - 1)
    }
}

/// `flags` with the arithmetic flags in `clear` cleared and those in `set` set.
fn with(flags: u64, clear: u64, set: u64) -> u64 {
    (flags & !clear) | set
}

fn bit(cond: bool, f: u64) -> u64 {
    if cond { f } else { 0 }
}

/// A result with SF and ZF from its value.
fn sz(v: u64, w: Width) -> u64 {
    bit(v & w.sign() != 0, SF) | bit(v & w.mask() == 0, ZF)
}

/// POPCNT: the number of ones; ZF = source was 0; OF, SF, AF, CF, PF cleared.
pub fn popcnt(src: u64, w: Width, flags: u64) -> (u64, u64) {
    let v = src & w.mask();
    (
        u64::from(v.count_ones()),
        with(flags, ARITH, bit(v == 0, ZF)),
    )
}

/// LZCNT: leading zero bits (the width for 0); CF = source was 0, ZF = result is 0.
pub fn lzcnt(src: u64, w: Width, flags: u64) -> (u64, u64) {
    let v = src & w.mask();
    let n = u64::from(v.leading_zeros() - (64 - w.bits()));
    (n, count_flags(flags, v == 0, n == 0))
}

/// TZCNT: trailing zero bits (the width for 0); CF = source was 0, ZF = result is 0.
pub fn tzcnt(src: u64, w: Width, flags: u64) -> (u64, u64) {
    let v = src & w.mask();
    let n = if v == 0 {
        u64::from(w.bits())
    } else {
        u64::from(v.trailing_zeros())
    };
    (n, count_flags(flags, v == 0, n == 0))
}

/// LZCNT's and TZCNT's flags: CF = source was 0, ZF = result is 0; OF, SF, AF and PF, which
/// the SDM leaves undefined, cleared as the host CPUs clear them.
fn count_flags(flags: u64, zero_source: bool, zero_result: bool) -> u64 {
    with(flags, ARITH, bit(zero_source, CF) | bit(zero_result, ZF))
}

/// ANDN: `!a & b`; SF, ZF from the result; OF, CF cleared.
pub fn andn(a: u64, b: u64, w: Width, flags: u64) -> (u64, u64) {
    let v = !a & b & w.mask();
    (v, with(flags, ARITH, sz(v, w)))
}

/// BEXTR: bits `start..start+len` of `src` (start = control[7:0], len = control[15:8]); ZF
/// from the result; CF, OF cleared.
pub fn bextr(src: u64, control: u64, w: Width, flags: u64) -> (u64, u64) {
    let start = (control & 0xff) as u32;
    let len = ((control >> 8) & 0xff) as u32;
    let s = src & w.mask();
    let shifted = if start >= w.bits() { 0 } else { s >> start };
    let v = if len >= 64 {
        shifted
    } else {
        shifted & ((1u64 << len) - 1)
    } & w.mask();
    (v, with(flags, ARITH, bit(v == 0, ZF)))
}

/// BLSI: the lowest set bit; ZF, SF from the result; CF = source was not 0; OF cleared.
pub fn blsi(src: u64, w: Width, flags: u64) -> (u64, u64) {
    let s = src & w.mask();
    let v = s & s.wrapping_neg() & w.mask();
    (v, with(flags, ARITH, sz(v, w) | bit(s != 0, CF)))
}

/// BLSMSK: mask up to and including the lowest set bit; SF from the result; ZF cleared; CF =
/// source was 0; OF cleared.
pub fn blsmsk(src: u64, w: Width, flags: u64) -> (u64, u64) {
    let s = src & w.mask();
    let v = (s ^ s.wrapping_sub(1)) & w.mask();
    (v, with(flags, ARITH, (sz(v, w) & SF) | bit(s == 0, CF)))
}

/// BLSR: the source with its lowest set bit cleared; ZF, SF from the result; CF = source was
/// 0; OF cleared.
pub fn blsr(src: u64, w: Width, flags: u64) -> (u64, u64) {
    let s = src & w.mask();
    let v = s & s.wrapping_sub(1) & w.mask();
    (v, with(flags, ARITH, sz(v, w) | bit(s == 0, CF)))
}

/// SHLX/SHRX/SARX: shift by `count` masked to 5 or 6 bits; flags unaffected.
pub fn shift_x(kind: ShiftKind, src: u64, count: u64, w: Width) -> u64 {
    let n = (count & u64::from(w.bits() - 1)) as u32;
    let s = src & w.mask();
    match kind {
        ShiftKind::Shl => (s << n) & w.mask(),
        ShiftKind::Shr => s >> n,
        ShiftKind::Sar => match w {
            Width::W32 => ((s as u32 as i32) >> n) as u32 as u64,
            Width::W64 => ((s as i64) >> n) as u64,
        },
    }
}

/// Which shift of [`shift_x`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShiftKind {
    /// SHLX.
    Shl,
    /// SHRX.
    Shr,
    /// SARX.
    Sar,
}

/// RORX: rotate right by an immediate masked to 5 or 6 bits; flags unaffected.
pub fn rorx(src: u64, imm: u8, w: Width) -> u64 {
    let n = u32::from(imm) & (w.bits() - 1);
    match w {
        Width::W32 => u64::from((src as u32).rotate_right(n)),
        Width::W64 => src.rotate_right(n),
    }
}

/// PDEP: deposit the low bits of `src` at the set bits of `mask`; flags unaffected.
pub fn pdep(src: u64, mask: u64, w: Width) -> u64 {
    let (mut m, mut out, mut k) = (mask & w.mask(), 0u64, 0);
    while m != 0 {
        let low = m & m.wrapping_neg();
        if src >> k & 1 != 0 {
            out |= low;
        }
        k += 1;
        m &= m - 1;
    }
    out
}

/// PEXT: gather the bits of `src` at the set bits of `mask` into the low bits; flags
/// unaffected.
pub fn pext(src: u64, mask: u64, w: Width) -> u64 {
    let (mut m, mut out, mut k) = (mask & w.mask(), 0u64, 0);
    while m != 0 {
        let low = m & m.wrapping_neg();
        if src & low != 0 {
            out |= 1 << k;
        }
        k += 1;
        m &= m - 1;
    }
    out
}

/// MULX: unsigned `a * b` as (high, low) halves of the double-width product; flags unaffected.
pub fn mulx(a: u64, b: u64, w: Width) -> (u64, u64) {
    match w {
        Width::W32 => {
            let p = (a & w.mask()) * (b & w.mask());
            (p >> 32, p & w.mask())
        }
        Width::W64 => {
            let p = u128::from(a) * u128::from(b);
            ((p >> 64) as u64, p as u64)
        }
    }
}

#[cfg(test)]
#[path = "alu_oracle_tests.rs"]
pub(crate) mod oracle_tests;
