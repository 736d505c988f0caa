//! XGETBV, XSETBV, XSAVE/XSAVEOPT and XRSTOR (standard format) against the vCPU's XSAVE area
//! (Intel SDM vol. 1 ch. 13, vol. 2 for each instruction).
//!
//! The area is the one `KVM_GET_XSAVE` returns: the host's standard (non-compacted) layout —
//! the 512-byte legacy region (x87 in bytes 0..24 and 32..160, MXCSR at 24, XMM at 160..416),
//! the 64-byte header (XSTATE_BV at 512, XCOMP_BV at 520), and component `i >= 2` at the
//! offset CPUID.(EAX=0DH,ECX=i).EBX with the size in EAX.

use vm_memory::GuestMemory;
use vmkit_memory::walk::AccessKind;

use super::linear::{Fail, Linear};
use super::{CpuState, EmulateError, Exception};

const XSTATE_BV: usize = 512;
const XCOMP_BV: usize = 520;
const HEADER_END: usize = 576;
const MXCSR: usize = 24;
const MXCSR_MASK: usize = 28;
/// XCR0 bits: x87, SSE, AVX; AVX-512's opmask, ZMM_Hi256, Hi16_ZMM.
const X87: u64 = 1;
const SSE: u64 = 2;
const AVX: u64 = 4;
const AVX512: u64 = 0xe0;

/// Offset and size of component `i` in the standard layout.
fn component(i: u32) -> (usize, usize) {
    match i {
        0 => (0, 160),
        1 => (160, 256),
        _ => {
            // CPUID is available on every x86-64 CPU and has no side effects.
            let r = std::arch::x86_64::__cpuid_count(0xd, i);
            (r.ebx as usize, r.eax as usize)
        }
    }
}

/// Whether component `i` is 64-byte aligned in the compacted format
/// (CPUID.(EAX=0DH,ECX=i):ECX[1]).
fn aligned64(i: u32) -> bool {
    i >= 2 && std::arch::x86_64::__cpuid_count(0xd, i).ecx & 2 != 0
}

/// Offsets of the components `i >= 2` in `comp` in the compacted format (SDM vol. 1
/// §13.4.3): packed from byte 576 in component order, each 64-byte aligned if it asks to be.
fn compacted(comp: u64) -> Vec<(u32, usize, usize)> {
    let mut out = Vec::new();
    let mut at = HEADER_END;
    for i in 2..63u32 {
        if comp & (1 << i) == 0 {
            continue;
        }
        if aligned64(i) {
            at = at.next_multiple_of(64);
        }
        let (_, size) = component(i);
        out.push((i, at, size));
        at += size;
    }
    out
}

/// XCOMP_BV bit 63: the area is in the compacted format.
const COMPACTED: u64 = 1 << 63;

fn edx_eax(cpu: &CpuState) -> u64 {
    (cpu.gpr[0] & 0xffff_ffff) | (cpu.gpr[2] << 32)
}

fn gp() -> Fail {
    Fail::Exception(Exception::gp(0))
}

fn area(cpu: &CpuState) -> Result<(), Fail> {
    if cpu.xsave.len() < HEADER_END {
        return Err(Fail::Error(EmulateError::BadState {
            what: "the vCPU's XSAVE area was not loaded",
            value: cpu.xsave.len() as u64,
        }));
    }
    Ok(())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// XGETBV: ECX = 0 reads XCR0; ECX = 1 reads XCR0 AND XINUSE (the components not in their
/// initial state); anything else is #GP(0).
pub(super) fn xgetbv(cpu: &mut CpuState) -> Result<(), Fail> {
    let v = match cpu.gpr[1] & 0xffff_ffff {
        0 => cpu.xcr0,
        1 => {
            let inuse = if cpu.xsave.len() >= HEADER_END {
                u64_at(&cpu.xsave, XSTATE_BV)
            } else {
                cpu.xcr0
            };
            cpu.xcr0 & inuse
        }
        _ => return Err(gp()),
    };
    cpu.gpr[0] = v & 0xffff_ffff;
    cpu.gpr[2] = v >> 32;
    Ok(())
}

/// XSETBV: XCR0 = EDX:EAX at CPL 0 with ECX = 0; #GP(0) for anything the SDM forbids (bit 0
/// clear, AVX without SSE, AVX-512 bits not all alike or without AVX, unsupported bits).
pub(super) fn xsetbv(cpu: &mut CpuState) -> Result<(), Fail> {
    let v = edx_eax(cpu);
    let bad = cpu.cpl != 0
        || cpu.gpr[1] & 0xffff_ffff != 0
        || v & !cpu.xcr0_supported != 0
        || v & X87 == 0
        || (v & AVX != 0 && v & SSE == 0)
        || (v & AVX512 != 0 && (v & AVX512 != AVX512 || v & AVX == 0));
    if bad {
        return Err(gp());
    }
    cpu.xcr0 = v;
    cpu.extended_state_dirty = true;
    Ok(())
}

/// The byte ranges of the area components in `rfbm` occupy (legacy parts, MXCSR, header
/// excluded), checked to lie inside the loaded area.
fn ranges(cpu: &CpuState, rfbm: u64) -> Result<Vec<(u32, usize, usize)>, Fail> {
    let mut out = Vec::new();
    for i in 0..63u32 {
        if rfbm & (1 << i) == 0 {
            continue;
        }
        let (off, size) = component(i);
        if i >= 2 && (off < HEADER_END || off + size > cpu.xsave.len() || size == 0) {
            return Err(Fail::Error(EmulateError::BadState {
                what: "XSAVE component outside the loaded area",
                value: u64::from(i),
            }));
        }
        out.push((i, off, size));
    }
    Ok(out)
}

/// The end of the memory image XSAVE/XRSTOR touch for `rfbm`.
fn image_len(parts: &[(u32, usize, usize)]) -> usize {
    parts
        .iter()
        .map(|&(_, o, s)| o + s)
        .max()
        .unwrap_or(0)
        .max(HEADER_END)
}

/// Which instruction of the save/restore family runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Form {
    /// XSAVE, XSAVEOPT, XRSTOR: standard format (XRSTOR also takes a compacted area).
    Standard,
    /// XSAVEC: compacted format.
    Compacted,
    /// XSAVES, XRSTORS: compacted, CPL 0 only (supervisor components: IA32_XSS is taken as 0).
    Supervisor,
}

/// The legacy region's and extended components' bytes for component `i` of the area,
/// copied from `from` (at `src`) to `to` (at `dst`).
fn copy_component(i: u32, from: &[u8], src: usize, to: &mut [u8], dst: usize, size: usize) {
    if i == 0 {
        to[0..24].copy_from_slice(&from[0..24]);
        to[32..160].copy_from_slice(&from[32..160]);
    } else {
        to[dst..dst + size].copy_from_slice(&from[src..src + size]);
    }
}

/// A component: its number, offset and size.
type Part = (u32, usize, usize);

/// What every save and restore checks first: the area loaded, a 64-byte aligned operand, CPL 0
/// for the supervisor forms (#GP(0)); returns RFBM = XCR0 AND EDX:EAX and its components.
fn prelude(cpu: &CpuState, va: u64, form: Form) -> Result<(u64, Vec<Part>), Fail> {
    area(cpu)?;
    if !va.is_multiple_of(64) || (form == Form::Supervisor && cpu.cpl != 0) {
        return Err(gp());
    }
    let rfbm = cpu.xcr0 & edx_eax(cpu);
    Ok((rfbm, ranges(cpu, rfbm)?))
}

/// XSAVE (XSAVEOPT may save more than it must, so it is XSAVE here), XSAVEC and XSAVES: the
/// components in RFBM = XCR0 AND EDX:EAX to the 64-byte aligned area at `va`, and the header.
/// The compacted forms write only the components in use, at their compacted offsets, and set
/// XCOMP_BV = RFBM | bit 63.
pub(super) fn xsave<M: GuestMemory + ?Sized>(
    cpu: &mut CpuState,
    lin: &Linear<'_, M>,
    va: u64,
    form: Form,
) -> Result<(), Fail> {
    let (rfbm, parts) = prelude(cpu, va, form)?;
    let inuse = u64_at(&cpu.xsave, XSTATE_BV);
    let (layout, len) = if form == Form::Standard {
        (parts.clone(), image_len(&parts))
    } else {
        let c = compacted(rfbm);
        let len = c.iter().map(|&(_, o, s)| o + s).max().unwrap_or(HEADER_END);
        let legacy = parts.iter().filter(|p| p.0 < 2).copied();
        (legacy.chain(c).collect(), len)
    };
    let mut img = vec![0u8; len];
    lin.read(va, &mut img, AccessKind::Read)?;
    for (&(i, std_off, size), &(_, off, _)) in parts.iter().zip(&layout) {
        if form != Form::Standard && inuse & (1 << i) == 0 {
            continue; // the compacted forms skip components in their initial state
        }
        copy_component(i, &cpu.xsave, std_off, &mut img, off, size);
    }
    if rfbm & (SSE | AVX) != 0 {
        img[MXCSR..MXCSR_MASK + 4].copy_from_slice(&cpu.xsave[MXCSR..MXCSR_MASK + 4]);
    }
    if form == Form::Standard {
        let bv = (u64_at(&img, XSTATE_BV) & !rfbm) | (inuse & rfbm);
        img[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    } else {
        img[XSTATE_BV..HEADER_END].fill(0);
        img[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&(inuse & rfbm).to_le_bytes());
        img[XCOMP_BV..XCOMP_BV + 8].copy_from_slice(&(rfbm | COMPACTED).to_le_bytes());
    }
    lin.write(va, &img)
}

/// XRSTOR and XRSTORS: the components in RFBM from the area at `va` where its XSTATE_BV says
/// so, initialised otherwise; the area in the standard format (XCOMP_BV 0) or, with XCOMP_BV
/// bit 63, the compacted one (XRSTORS requires it). #GP(0) for a misaligned area, a reserved
/// header word set, XSTATE_BV bits outside XCR0 (or, compacted, outside XCOMP_BV), XCOMP_BV
/// bits outside XCR0, or MXCSR reserved bits — all checked before anything changes.
pub(super) fn xrstor<M: GuestMemory + ?Sized>(
    cpu: &mut CpuState,
    lin: &Linear<'_, M>,
    va: u64,
    form: Form,
) -> Result<(), Fail> {
    let (rfbm, parts) = prelude(cpu, va, form)?;
    let mut header = [0u8; 64];
    // The header's linear address wraps as the CPU's does (an aligned area near the top of
    // the address space: fuzz finding).
    lin.read(
        va.wrapping_add(XSTATE_BV as u64),
        &mut header,
        AccessKind::Read,
    )?;
    let bv = u64_at(&header, 0);
    let xcomp = u64_at(&header, 8);
    let compact = xcomp & COMPACTED != 0;
    let reserved = if compact {
        header[16..64].iter().any(|&b| b != 0)
    } else {
        xcomp != 0 || u64_at(&header, 16) != 0
    };
    let comp = xcomp & !COMPACTED;
    if reserved
        || bv & !cpu.xcr0 != 0
        || (form == Form::Supervisor && !compact)
        || (compact && (comp & !cpu.xcr0 != 0 || bv & !comp != 0))
    {
        return Err(gp());
    }
    let layout: Vec<(u32, usize, usize)> = if compact {
        let c = compacted(comp);
        parts
            .iter()
            .map(|&(i, off, size)| {
                let at = if i < 2 {
                    off
                } else {
                    c.iter().find(|p| p.0 == i).map_or(usize::MAX, |p| p.1)
                };
                (i, at, size)
            })
            .collect()
    } else {
        parts.clone()
    };
    let len = layout
        .iter()
        .filter(|p| p.1 != usize::MAX)
        .map(|&(_, o, s)| o + s)
        .max()
        .unwrap_or(0)
        .max(HEADER_END);
    let mut img = vec![0u8; len];
    lin.read(va, &mut img, AccessKind::Read)?;
    let mxcsr_mask = u32::from_le_bytes(
        cpu.xsave[MXCSR_MASK..MXCSR_MASK + 4]
            .try_into()
            .unwrap_or([0; 4]),
    );
    let mxcsr_mask = if mxcsr_mask == 0 { 0xffbf } else { mxcsr_mask };
    let mxcsr = u32::from_le_bytes(img[MXCSR..MXCSR + 4].try_into().unwrap_or([0; 4]));
    let load_mxcsr = rfbm & (SSE | AVX) != 0;
    if load_mxcsr && mxcsr & !mxcsr_mask != 0 {
        return Err(gp());
    }
    let a = &mut cpu.xsave;
    for (&(i, std_off, size), &(_, off, _)) in parts.iter().zip(&layout) {
        let from_memory = bv & (1 << i) != 0 && off != usize::MAX;
        match (i, from_memory) {
            (0, false) => {
                // x87 initial state: FCW 0x037F, everything else 0 (SDM vol. 1 §13.6).
                a[0..24].fill(0);
                a[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
                a[32..160].fill(0);
            }
            (_, true) => copy_component(i, &img, off, a, std_off, size),
            (_, false) => a[std_off..std_off + size].fill(0),
        }
    }
    if load_mxcsr {
        a[MXCSR..MXCSR + 4].copy_from_slice(&mxcsr.to_le_bytes());
    }
    let inuse = (u64_at(a, XSTATE_BV) & !rfbm) | (bv & rfbm);
    a[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&inuse.to_le_bytes());
    cpu.extended_state_dirty = true;
    Ok(())
}

/// LDMXCSR / VLDMXCSR: MXCSR from memory; #GP(0) when it sets bits MXCSR_MASK leaves clear.
pub(super) fn ldmxcsr(cpu: &mut CpuState, value: u32) -> Result<(), Fail> {
    area(cpu)?;
    let mask = u32::from_le_bytes(
        cpu.xsave[MXCSR_MASK..MXCSR_MASK + 4]
            .try_into()
            .unwrap_or([0; 4]),
    );
    let mask = if mask == 0 { 0xffbf } else { mask };
    if value & !mask != 0 {
        return Err(gp());
    }
    cpu.xsave[MXCSR..MXCSR + 4].copy_from_slice(&value.to_le_bytes());
    // A non-default MXCSR puts the SSE component in use (SDM vol. 1 §13.6).
    if value != 0x1f80 {
        let bv = u64_at(&cpu.xsave, XSTATE_BV) | SSE;
        cpu.xsave[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    }
    cpu.extended_state_dirty = true;
    Ok(())
}

/// STMXCSR / VSTMXCSR: the current MXCSR.
pub(super) fn stmxcsr(cpu: &CpuState) -> Result<u32, Fail> {
    area(cpu)?;
    Ok(u32::from_le_bytes(
        cpu.xsave[MXCSR..MXCSR + 4].try_into().unwrap_or([0; 4]),
    ))
}
