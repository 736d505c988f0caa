//! Vector register moves (SDM vol. 2: MOVDQU/MOVDQA/MOVUPS/MOVAPS and their VEX forms) against
//! the vCPU's XSAVE area: XMM*i* is bytes `160 + 16·i` of the legacy region, the upper half of
//! YMM*i* is bytes `16·i` of the AVX component (CPUID.(EAX=0DH,ECX=2)). A Linux kernel runs
//! these in its FPU-using init code (crypto self-tests, checksums) once it has the FPU.
//!
//! Legacy SSE forms leave bits above 127 alone; VEX forms zero the destination register's
//! bits above the vector length (SDM vol. 1 §14.1.3), up to bit 511 when AVX-512 is on: the
//! ZMM_Hi256 component (CPUID.(EAX=0DH,ECX=6)) holds bits 511:256 of ZMM0–15.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};
use vm_memory::GuestMemory;
use vmkit_memory::walk::AccessKind;

use super::linear::{Fail, Linear};
use super::{CpuState, EmulateError, Exception};

const XMM0: usize = 160;
const XSTATE_BV: usize = 512;
/// XCR0 / XSTATE_BV bits.
const SSE: u64 = 2;
const AVX: u64 = 4;
/// XCR0 bit 6: ZMM_Hi256, bits 511:256 of ZMM0–15.
const ZMM_HI256: u64 = 1 << 6;

fn avx_offset() -> usize {
    std::arch::x86_64::__cpuid_count(0xd, 2).ebx as usize
}

fn zmm_hi256_offset() -> usize {
    std::arch::x86_64::__cpuid_count(0xd, 6).ebx as usize
}

/// A vector register: (index, width in bytes).
fn vreg(r: Register) -> Option<(usize, usize)> {
    if r.is_xmm() {
        Some((r as usize - Register::XMM0 as usize, 16))
    } else if r.is_ymm() {
        Some((r as usize - Register::YMM0 as usize, 32))
    } else {
        None
    }
}

fn refuse() -> Fail {
    Fail::Error(EmulateError::Unsupported {
        disassembly: String::new(),
    })
}

fn read_vreg(cpu: &CpuState, i: usize, width: usize) -> Result<[u8; 32], Fail> {
    let mut v = [0u8; 32];
    let lo = XMM0 + 16 * i;
    v[..16].copy_from_slice(cpu.xsave.get(lo..lo + 16).ok_or_else(refuse)?);
    if width == 32 {
        let hi = avx_offset() + 16 * i;
        v[16..].copy_from_slice(cpu.xsave.get(hi..hi + 16).ok_or_else(refuse)?);
    }
    Ok(v)
}

fn write_vreg(
    cpu: &mut CpuState,
    i: usize,
    width: usize,
    v: &[u8; 32],
    vex: bool,
) -> Result<(), Fail> {
    let lo = XMM0 + 16 * i;
    let hi = avx_offset() + 16 * i;
    if cpu.xsave.len() < hi + 16 || cpu.xsave.len() < lo + 16 {
        return Err(refuse());
    }
    cpu.xsave[lo..lo + 16].copy_from_slice(&v[..16]);
    let mut used = SSE;
    if width == 32 {
        cpu.xsave[hi..hi + 16].copy_from_slice(&v[16..]);
        used |= AVX;
    } else if vex {
        cpu.xsave[hi..hi + 16].fill(0);
    }
    if vex && cpu.xcr0 & ZMM_HI256 != 0 {
        let z = zmm_hi256_offset() + 32 * i;
        cpu.xsave.get_mut(z..z + 32).ok_or_else(refuse)?.fill(0);
    }
    let mut bv = [0u8; 8];
    bv.copy_from_slice(&cpu.xsave[XSTATE_BV..XSTATE_BV + 8]);
    let bv = u64::from_le_bytes(bv) | used;
    cpu.xsave[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    cpu.extended_state_dirty = true;
    Ok(())
}

/// Execute a vector move `instr` whose memory operand (if any) is at linear `va`.
pub(super) fn mov<M: GuestMemory + ?Sized>(
    cpu: &mut CpuState,
    lin: &Linear<'_, M>,
    instr: &Instruction,
    va: Option<u64>,
) -> Result<(), Fail> {
    use Mnemonic as Mn;
    let m = instr.mnemonic();
    let vex = matches!(m, Mn::Vmovdqu | Mn::Vmovdqa | Mn::Vmovups | Mn::Vmovaps);
    let aligned = matches!(m, Mn::Movdqa | Mn::Movaps | Mn::Vmovdqa | Mn::Vmovaps);
    // #UD: SSE needs CR4.OSFXSR and no CR0.EM; VEX needs XCR0 SSE|AVX. #NM: CR0.TS.
    const CR4_OSFXSR: u64 = 1 << 9;
    let ud = if vex {
        cpu.xcr0 & (SSE | AVX) != SSE | AVX
    } else {
        cpu.cr4 & CR4_OSFXSR == 0 || cpu.cr0 & (1 << 2) != 0
    };
    if ud {
        return Err(Fail::Exception(Exception::ud()));
    }
    if cpu.cr0 & (1 << 3) != 0 {
        return Err(Fail::Exception(Exception::fault(super::NM)));
    }
    if cpu.xsave.len() < XSTATE_BV + 8 {
        return Err(refuse());
    }
    let width = match (instr.op_kind(0), instr.op_kind(1)) {
        (OpKind::Register, _) => vreg(instr.op0_register()).ok_or_else(refuse)?.1,
        (_, OpKind::Register) => vreg(instr.op1_register()).ok_or_else(refuse)?.1,
        _ => return Err(refuse()),
    };
    if let Some(va) = va
        && aligned
        && !va.is_multiple_of(width as u64)
    {
        return Err(Fail::Exception(Exception::gp(0)));
    }
    // Source value.
    let value = match instr.op_kind(1) {
        OpKind::Register => {
            let (i, _) = vreg(instr.op1_register()).ok_or_else(refuse)?;
            read_vreg(cpu, i, width)?
        }
        OpKind::Memory => {
            let mut v = [0u8; 32];
            lin.read(va.ok_or_else(refuse)?, &mut v[..width], AccessKind::Read)?;
            v
        }
        _ => return Err(refuse()),
    };
    match instr.op_kind(0) {
        OpKind::Register => {
            let (i, _) = vreg(instr.op0_register()).ok_or_else(refuse)?;
            write_vreg(cpu, i, width, &value, vex)
        }
        OpKind::Memory => lin.write(va.ok_or_else(refuse)?, &value[..width]),
        _ => Err(refuse()),
    }
}
