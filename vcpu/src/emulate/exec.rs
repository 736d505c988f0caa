//! Decode one instruction and carry it out against a [`CpuState`] and guest memory.

use iced_x86::{
    Decoder, DecoderError, DecoderOptions, Formatter, GasFormatter, Instruction, Mnemonic, OpKind,
    Register,
};
use vm_memory::GuestMemory;
use vmkit_memory::walk::AccessKind;

use super::alu::{self, ShiftKind, Width};
use super::linear::{self, Fail, Linear};
use super::{
    BP, CR4_OSXSAVE, CR4_SMAP, CR4_TSD, CpuState, DB, EmulateError, EventKind, Exception,
    OF_VECTOR, Outcome,
};

/// Register numbers (the hardware's).
const RAX: usize = 0;
const RCX: usize = 1;
const RDX: usize = 2;
const RBX: usize = 3;

/// The result of executing: the mnemonic (on success), or a failure.
type Done = Result<&'static str, Fail>;

pub(super) fn step<M: GuestMemory + ?Sized>(
    cpu: &mut CpuState,
    mem: &M,
    bytes: &[u8],
) -> Result<Outcome, EmulateError> {
    let lin = Linear::new(cpu, mem);
    let bitness = if cpu.long_mode { 64 } else { 32 };
    let cs_base = if cpu.long_mode { 0 } else { cpu.seg_base[1] };
    // KVM's bytes first (what it saw at RIP), then what the guest's paging lets us fetch.
    let mut buf = [0u8; 15];
    let given = bytes.len().min(15);
    buf[..given].copy_from_slice(&bytes[..given]);
    let mut fetched = [0u8; 15];
    let (got, fetch_fault) = if given < 15 {
        lin.fetch(
            cs_base.wrapping_add(cpu.rip).wrapping_add(given as u64),
            &mut fetched,
        )
    } else {
        (0, None)
    };
    let extra = got.min(15 - given);
    buf[given..given + extra].copy_from_slice(&fetched[..extra]);
    let avail = given + extra;
    let mut decoder = Decoder::with_ip(bitness, &buf[..avail], cpu.rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        return match (decoder.last_error(), fetch_fault) {
            // The instruction runs into bytes the guest cannot fetch: that fault.
            (DecoderError::NoMoreBytes, Some(fail)) => into_outcome(Err(fail)),
            (DecoderError::NoMoreBytes, None) => Err(EmulateError::Decode {
                bytes: buf[..avail].to_vec(),
            }),
            // Not an instruction in this mode (e.g. INTO in 64-bit mode): the CPU's answer.
            _ => Ok(Outcome::Exception(Exception::ud())),
        };
    }
    let r = execute(cpu, &lin, &instr);
    // An emulated instruction advances RIP itself; a software event leaves it at the
    // instruction and carries the instruction's length, with which its injection puts the
    // return address after it; a fault leaves RIP at the instruction, to restart it.
    if r.is_ok() {
        cpu.rip = if cpu.long_mode {
            instr.next_ip()
        } else {
            instr.next_ip() & 0xffff_ffff
        };
        cpu.rflags &= !(1 << 16); // RF: cleared after an instruction completes
    }
    match r {
        Err(Fail::Error(EmulateError::Unsupported { .. })) => Err(unsupported(&instr)),
        other => into_outcome(other),
    }
}

fn into_outcome(r: Done) -> Result<Outcome, EmulateError> {
    match r {
        Ok(mnemonic) => Ok(Outcome::Emulated { mnemonic }),
        Err(Fail::Exception(e)) => Ok(Outcome::Exception(e)),
        Err(Fail::Error(e)) => Err(e),
    }
}

/// The typed refusal of `instr`, with its disassembly.
fn unsupported(instr: &Instruction) -> EmulateError {
    let mut text = String::new();
    GasFormatter::new().format(instr, &mut text);
    EmulateError::Unsupported { disassembly: text }
}

fn refuse() -> Fail {
    Fail::Error(EmulateError::Unsupported {
        disassembly: String::new(),
    })
}

fn exception(e: Exception) -> Fail {
    Fail::Exception(e)
}

/// A software event raised by `instr`.
fn software(vector: u8, kind: EventKind, instr: &Instruction) -> Fail {
    Fail::Exception(Exception {
        vector,
        error_code: None,
        cr2: None,
        kind,
        instruction_len: instr.len() as u8,
    })
}

/// The 64-bit register number and width of a general register operand.
fn gpr(r: Register) -> Result<(usize, Width), Fail> {
    // iced numbers RAX…R15 and EAX…R15D consecutively, in the hardware's order.
    if r.is_gpr64() {
        Ok((r as usize - Register::RAX as usize, Width::W64))
    } else if r.is_gpr32() {
        Ok((r as usize - Register::EAX as usize, Width::W32))
    } else {
        Err(refuse())
    }
}

fn read_reg(cpu: &CpuState, r: Register) -> Result<(u64, Width), Fail> {
    let (n, w) = gpr(r)?;
    Ok((cpu.gpr[n] & w.mask(), w))
}

/// Write a general register: a 32-bit write zero-extends (SDM vol. 1 §3.4.1.1).
fn write_reg(cpu: &mut CpuState, r: Register, v: u64) -> Result<(), Fail> {
    let (n, w) = gpr(r)?;
    cpu.gpr[n] = v & w.mask();
    Ok(())
}

/// The linear address of memory operand `op`.
fn address(cpu: &CpuState, instr: &Instruction, op: u32) -> Result<u64, Fail> {
    instr
        .virtual_address(op, 0, |reg, _, _| {
            if reg.is_segment_register() {
                let i = match reg {
                    Register::ES => 0,
                    Register::CS => 1,
                    Register::SS => 2,
                    Register::DS => 3,
                    Register::FS => 4,
                    _ => 5,
                };
                // 64-bit mode: only FS and GS have bases (SDM vol. 3A §3.2.4).
                Some(if cpu.long_mode && i < 4 {
                    0
                } else {
                    cpu.seg_base[i]
                })
            } else if reg.is_gpr() {
                let (v, _) = read_reg(cpu, reg).ok()?;
                Some(v)
            } else if reg == Register::RIP || reg == Register::EIP {
                Some(instr.next_ip())
            } else {
                None
            }
        })
        .ok_or_else(refuse)
}

/// Read operand `op` (register or memory) of width `w`.
fn read_rm<M: GuestMemory + ?Sized>(
    cpu: &CpuState,
    lin: &Linear<'_, M>,
    instr: &Instruction,
    op: u32,
    w: Width,
) -> Result<u64, Fail> {
    match instr.op_kind(op) {
        OpKind::Register => Ok(read_reg(cpu, instr.op_register(op))?.0 & w.mask()),
        OpKind::Memory => {
            let va = address(cpu, instr, op)?;
            let mut b = [0u8; 8];
            let n = (w.bits() / 8) as usize;
            lin.read(va, &mut b[..n], AccessKind::Read)?;
            Ok(u64::from_le_bytes(b))
        }
        _ => Err(refuse()),
    }
}

fn execute<M: GuestMemory + ?Sized>(
    cpu: &mut CpuState,
    lin: &Linear<'_, M>,
    instr: &Instruction,
) -> Done {
    use Mnemonic as Mn;
    let m = instr.mnemonic();
    match m {
        Mn::Popcnt | Mn::Lzcnt | Mn::Tzcnt | Mn::Blsi | Mn::Blsr | Mn::Blsmsk => {
            let (_, w) = gpr(instr.op0_register())?;
            let src = read_rm(cpu, lin, instr, 1, w)?;
            let f = match m {
                Mn::Popcnt => alu::popcnt,
                Mn::Lzcnt => alu::lzcnt,
                Mn::Tzcnt => alu::tzcnt,
                Mn::Blsi => alu::blsi,
                Mn::Blsr => alu::blsr,
                _ => alu::blsmsk,
            };
            let (v, flags) = f(src, w, cpu.rflags);
            write_reg(cpu, instr.op0_register(), v)?;
            cpu.rflags = flags;
        }
        Mn::Andn | Mn::Pdep | Mn::Pext => {
            // dst, src1 (VEX.vvvv register), src2 (r/m).
            let (_, w) = gpr(instr.op0_register())?;
            let (a, _) = read_reg(cpu, instr.op1_register())?;
            let b = read_rm(cpu, lin, instr, 2, w)?;
            let v = match m {
                Mn::Andn => {
                    let (v, flags) = alu::andn(a, b, w, cpu.rflags);
                    cpu.rflags = flags;
                    v
                }
                Mn::Pdep => alu::pdep(a, b, w),
                _ => alu::pext(a, b, w),
            };
            write_reg(cpu, instr.op0_register(), v)?;
        }
        Mn::Bextr | Mn::Shlx | Mn::Shrx | Mn::Sarx => {
            // dst, src (r/m), control/count (VEX.vvvv register).
            let (_, w) = gpr(instr.op0_register())?;
            let src = read_rm(cpu, lin, instr, 1, w)?;
            if instr.op_kind(2) != OpKind::Register {
                return Err(refuse()); // the TBM/XOP BEXTR with an immediate
            }
            let (c, _) = read_reg(cpu, instr.op2_register())?;
            let v = match m {
                Mn::Bextr => {
                    let (v, flags) = alu::bextr(src, c, w, cpu.rflags);
                    cpu.rflags = flags;
                    v
                }
                Mn::Shlx => alu::shift_x(ShiftKind::Shl, src, c, w),
                Mn::Shrx => alu::shift_x(ShiftKind::Shr, src, c, w),
                _ => alu::shift_x(ShiftKind::Sar, src, c, w),
            };
            write_reg(cpu, instr.op0_register(), v)?;
        }
        Mn::Rorx => {
            let (_, w) = gpr(instr.op0_register())?;
            let src = read_rm(cpu, lin, instr, 1, w)?;
            write_reg(
                cpu,
                instr.op0_register(),
                alu::rorx(src, instr.immediate8(), w),
            )?;
        }
        Mn::Mulx => {
            // hi, lo, src (r/m); the other factor is EDX/RDX. With hi == lo, hi wins.
            let (_, w) = gpr(instr.op0_register())?;
            let src = read_rm(cpu, lin, instr, 2, w)?;
            let (hi, lo) = alu::mulx(cpu.gpr[RDX] & w.mask(), src, w);
            write_reg(cpu, instr.op1_register(), lo)?;
            write_reg(cpu, instr.op0_register(), hi)?;
        }
        Mn::Cmpxchg8b | Mn::Cmpxchg16b => cmpxchg_wide(cpu, lin, instr, m == Mn::Cmpxchg16b)?,
        Mn::Clac | Mn::Stac => {
            // #UD at CPL > 0 or without CR4.SMAP (SDM: CLAC/STAC).
            if cpu.cpl != 0 || cpu.cr4 & CR4_SMAP == 0 {
                return Err(exception(Exception::ud()));
            }
            if m == Mn::Clac {
                cpu.rflags &= !alu::AC;
            } else {
                cpu.rflags |= alu::AC;
            }
        }
        Mn::Int3 => return Err(software(BP, EventKind::SoftwareException, instr)),
        Mn::Int1 => return Err(software(DB, EventKind::PrivilegedSoftwareException, instr)),
        Mn::Int => {
            return Err(software(
                instr.immediate8(),
                EventKind::SoftwareInterrupt,
                instr,
            ));
        }
        Mn::Into => {
            // Invalid in 64-bit mode; otherwise #OF when OF is set, else nothing.
            if cpu.long_mode {
                return Err(exception(Exception::ud()));
            }
            if cpu.rflags & alu::OF != 0 {
                return Err(software(OF_VECTOR, EventKind::SoftwareException, instr));
            }
        }
        Mn::Rdtscp => {
            if cpu.cr4 & CR4_TSD != 0 && cpu.cpl != 0 {
                return Err(exception(Exception::gp(0)));
            }
            cpu.gpr[RAX] = cpu.tsc & 0xffff_ffff;
            cpu.gpr[RDX] = cpu.tsc >> 32;
            cpu.gpr[RCX] = cpu.tsc_aux & 0xffff_ffff;
        }
        Mn::Rdpid => {
            let r = instr.op0_register();
            let (_, w) = gpr(r)?;
            write_reg(cpu, r, cpu.tsc_aux & w.mask())?;
        }
        Mn::Xgetbv
        | Mn::Xsetbv
        | Mn::Xsave
        | Mn::Xsave64
        | Mn::Xsaveopt
        | Mn::Xsaveopt64
        | Mn::Xsavec
        | Mn::Xsavec64
        | Mn::Xsaves
        | Mn::Xsaves64
        | Mn::Xrstor
        | Mn::Xrstor64
        | Mn::Xrstors
        | Mn::Xrstors64 => {
            use super::xsave::{self, Form};
            if cpu.cr4 & CR4_OSXSAVE == 0 {
                return Err(exception(Exception::ud()));
            }
            let form = match m {
                Mn::Xsavec | Mn::Xsavec64 => Form::Compacted,
                Mn::Xsaves | Mn::Xsaves64 | Mn::Xrstors | Mn::Xrstors64 => Form::Supervisor,
                _ => Form::Standard,
            };
            match m {
                Mn::Xgetbv => xsave::xgetbv(cpu)?,
                Mn::Xsetbv => xsave::xsetbv(cpu)?,
                Mn::Xrstor | Mn::Xrstor64 | Mn::Xrstors | Mn::Xrstors64 => {
                    let va = address(cpu, instr, 0)?;
                    xsave::xrstor(cpu, lin, va, form)?
                }
                _ => {
                    let va = address(cpu, instr, 0)?;
                    xsave::xsave(cpu, lin, va, form)?
                }
            }
        }
        Mn::Ldmxcsr | Mn::Vldmxcsr | Mn::Stmxcsr | Mn::Vstmxcsr => {
            // #UD without CR4.OSFXSR or with CR0.EM; #NM with CR0.TS (SDM: LDMXCSR).
            const CR4_OSFXSR: u64 = 1 << 9;
            if cpu.cr4 & CR4_OSFXSR == 0 || cpu.cr0 & (1 << 2) != 0 {
                return Err(exception(Exception::ud()));
            }
            if cpu.cr0 & (1 << 3) != 0 {
                return Err(exception(Exception::fault(super::NM)));
            }
            let va = address(cpu, instr, 0)?;
            if matches!(m, Mn::Ldmxcsr | Mn::Vldmxcsr) {
                let mut b = [0u8; 4];
                lin.read(va, &mut b, AccessKind::Read)?;
                super::xsave::ldmxcsr(cpu, u32::from_le_bytes(b))?;
            } else {
                let v = super::xsave::stmxcsr(cpu)?;
                lin.write(va, &v.to_le_bytes())?;
            }
        }
        Mn::Movdqu
        | Mn::Movdqa
        | Mn::Movups
        | Mn::Movaps
        | Mn::Vmovdqu
        | Mn::Vmovdqa
        | Mn::Vmovups
        | Mn::Vmovaps => {
            let mem_op = (0..2).find(|&o| instr.op_kind(o) == OpKind::Memory);
            let va = mem_op.map(|o| address(cpu, instr, o)).transpose()?;
            super::vector::mov(cpu, lin, instr, va)?;
        }
        Mn::Wait => {
            // FWAIT (SDM vol. 2): #NM when CR0.MP and CR0.TS are set; #MF when an unmasked x87
            // exception is pending (FSW.ES, byte 2 bit 7 of the XSAVE area) and CR0.NE is set;
            // otherwise nothing.
            const CR0_MP: u64 = 1 << 1;
            const CR0_TS: u64 = 1 << 3;
            const CR0_NE: u64 = 1 << 5;
            if cpu.cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS {
                return Err(exception(Exception::fault(super::NM)));
            }
            let es = cpu.xsave.get(2).is_some_and(|fsw| fsw & 0x80 != 0);
            if es && cpu.cr0 & CR0_NE != 0 {
                return Err(exception(Exception::fault(super::MF)));
            }
        }
        _ => return Err(refuse()),
    }
    Ok(mnemonic_name(m))
}

/// CMPXCHG8B m64 / CMPXCHG16B m128 (SDM): compare EDX:EAX (RDX:RAX) with the operand; equal:
/// ZF = 1 and ECX:EBX (RCX:RBX) stored; else ZF = 0 and the operand loaded into EDX:EAX
/// (RDX:RAX). The destination is always written (checked for write access); CMPXCHG16B
/// needs a 16-byte aligned operand (#GP(0)). Atomic against other vCPUs: a host `lock
/// cmpxchg` on the guest page.
fn cmpxchg_wide<M: GuestMemory + ?Sized>(
    cpu: &mut CpuState,
    lin: &Linear<'_, M>,
    instr: &Instruction,
    wide: bool,
) -> Result<(), Fail> {
    if instr.op0_kind() != OpKind::Memory {
        return Err(exception(Exception::ud()));
    }
    let va = address(cpu, instr, 0)?;
    let equal = if wide {
        if !va.is_multiple_of(16) {
            return Err(exception(Exception::gp(0)));
        }
        let old = u128::from(cpu.gpr[RAX]) | u128::from(cpu.gpr[RDX]) << 64;
        let new = u128::from(cpu.gpr[RBX]) | u128::from(cpu.gpr[RCX]) << 64;
        let ptr = lin.host_ptr(va, 16)?.ok_or_else(refuse)?;
        // SAFETY: `host_ptr` returned 16 bytes of mapped guest RAM in one page; the guest
        // address is 16-byte aligned and mappings are page aligned, so the host address is too.
        match unsafe { linear::cmpxchg16(ptr, old, new) } {
            Ok(()) => true,
            Err(cur) => {
                cpu.gpr[RAX] = cur as u64;
                cpu.gpr[RDX] = (cur >> 64) as u64;
                false
            }
        }
    } else {
        let lo = |r: u64| r & 0xffff_ffff;
        let old = lo(cpu.gpr[RAX]) | lo(cpu.gpr[RDX]) << 32;
        let new = lo(cpu.gpr[RBX]) | lo(cpu.gpr[RCX]) << 32;
        let result = match lin.host_ptr(va, 8)? {
            // SAFETY: 8 bytes of mapped guest RAM in one page.
            Some(ptr) => unsafe { linear::cmpxchg8(ptr, old, new) },
            None => {
                // Split across pages: read, compare, write (both pages already checked).
                let mut b = [0u8; 8];
                lin.read(va, &mut b, AccessKind::Read)?;
                let cur = u64::from_le_bytes(b);
                let stored = if cur == old { new } else { cur };
                lin.write(va, &stored.to_le_bytes())?;
                if cur == old { Ok(()) } else { Err(cur) }
            }
        };
        match result {
            Ok(()) => true,
            Err(cur) => {
                // 32-bit writes of EAX/EDX zero-extend in 64-bit mode.
                cpu.gpr[RAX] = cur & 0xffff_ffff;
                cpu.gpr[RDX] = cur >> 32;
                false
            }
        }
    };
    if equal {
        cpu.rflags |= alu::ZF;
    } else {
        cpu.rflags &= !alu::ZF;
    }
    Ok(())
}

/// The statistics' name of a mnemonic.
fn mnemonic_name(m: Mnemonic) -> &'static str {
    use Mnemonic as Mn;
    match m {
        Mn::Popcnt => "popcnt",
        Mn::Lzcnt => "lzcnt",
        Mn::Tzcnt => "tzcnt",
        Mn::Andn => "andn",
        Mn::Bextr => "bextr",
        Mn::Blsi => "blsi",
        Mn::Blsr => "blsr",
        Mn::Blsmsk => "blsmsk",
        Mn::Shlx => "shlx",
        Mn::Shrx => "shrx",
        Mn::Sarx => "sarx",
        Mn::Rorx => "rorx",
        Mn::Pdep => "pdep",
        Mn::Pext => "pext",
        Mn::Mulx => "mulx",
        Mn::Cmpxchg8b => "cmpxchg8b",
        Mn::Cmpxchg16b => "cmpxchg16b",
        Mn::Clac => "clac",
        Mn::Stac => "stac",
        Mn::Into => "into",
        Mn::Rdtscp => "rdtscp",
        Mn::Rdpid => "rdpid",
        Mn::Xgetbv => "xgetbv",
        Mn::Xsetbv => "xsetbv",
        Mn::Xsave | Mn::Xsave64 => "xsave",
        Mn::Xsaveopt | Mn::Xsaveopt64 => "xsaveopt",
        Mn::Xrstor | Mn::Xrstor64 => "xrstor",
        Mn::Wait => "fwait",
        Mn::Movdqu => "movdqu",
        Mn::Movdqa => "movdqa",
        Mn::Movups => "movups",
        Mn::Movaps => "movaps",
        Mn::Vmovdqu => "vmovdqu",
        Mn::Vmovdqa => "vmovdqa",
        Mn::Vmovups => "vmovups",
        Mn::Vmovaps => "vmovaps",
        Mn::Xsavec | Mn::Xsavec64 => "xsavec",
        Mn::Xsaves | Mn::Xsaves64 => "xsaves",
        Mn::Xrstors | Mn::Xrstors64 => "xrstors",
        Mn::Ldmxcsr | Mn::Vldmxcsr => "ldmxcsr",
        Mn::Stmxcsr | Mn::Vstmxcsr => "stmxcsr",
        _ => "other",
    }
}
