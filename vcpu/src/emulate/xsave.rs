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

/// XSAVE (and XSAVEOPT, which may save more than it must): the components in RFBM = XCR0 AND
/// EDX:EAX to the 64-byte aligned area at `va`, and their XSTATE_BV bits.
pub(super) fn xsave<M: GuestMemory + ?Sized>(
    cpu: &mut CpuState,
    lin: &Linear<'_, M>,
    va: u64,
) -> Result<(), Fail> {
    area(cpu)?;
    if !va.is_multiple_of(64) {
        return Err(gp());
    }
    let rfbm = cpu.xcr0 & edx_eax(cpu);
    let parts = ranges(cpu, rfbm)?;
    let mut img = vec![0u8; image_len(&parts)];
    lin.read(va, &mut img, AccessKind::Read)?;
    for &(i, off, size) in &parts {
        if i == 0 {
            img[0..24].copy_from_slice(&cpu.xsave[0..24]);
            img[32..160].copy_from_slice(&cpu.xsave[32..160]);
        } else {
            img[off..off + size].copy_from_slice(&cpu.xsave[off..off + size]);
        }
    }
    if rfbm & (SSE | AVX) != 0 {
        img[MXCSR..MXCSR_MASK + 4].copy_from_slice(&cpu.xsave[MXCSR..MXCSR_MASK + 4]);
    }
    let inuse = u64_at(&cpu.xsave, XSTATE_BV);
    let bv = (u64_at(&img, XSTATE_BV) & !rfbm) | (inuse & rfbm);
    img[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    lin.write(va, &img)
}

/// XRSTOR (standard format): the components in RFBM from the area at `va` where its
/// XSTATE_BV says so, initialised otherwise. #GP(0) for a misaligned area, a compacted or
/// non-zero XCOMP_BV, a reserved header word set, XSTATE_BV bits outside XCR0, or MXCSR
/// reserved bits; all checked before anything changes.
pub(super) fn xrstor<M: GuestMemory + ?Sized>(
    cpu: &mut CpuState,
    lin: &Linear<'_, M>,
    va: u64,
) -> Result<(), Fail> {
    area(cpu)?;
    if !va.is_multiple_of(64) {
        return Err(gp());
    }
    let rfbm = cpu.xcr0 & edx_eax(cpu);
    let parts = ranges(cpu, rfbm)?;
    let mut img = vec![0u8; image_len(&parts)];
    lin.read(va, &mut img, AccessKind::Read)?;
    let bv = u64_at(&img, XSTATE_BV);
    if u64_at(&img, XCOMP_BV) != 0 || u64_at(&img, XCOMP_BV + 8) != 0 || bv & !cpu.xcr0 != 0 {
        return Err(gp());
    }
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
    for &(i, off, size) in &parts {
        let from_memory = bv & (1 << i) != 0;
        match (i, from_memory) {
            (0, true) => {
                a[0..24].copy_from_slice(&img[0..24]);
                a[32..160].copy_from_slice(&img[32..160]);
            }
            (0, false) => {
                // x87 initial state: FCW 0x037F, everything else 0 (SDM vol. 1 §13.6).
                a[0..24].fill(0);
                a[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
                a[32..160].fill(0);
            }
            (_, true) => a[off..off + size].copy_from_slice(&img[off..off + size]),
            (_, false) => a[off..off + size].fill(0),
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
