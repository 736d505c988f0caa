//! Userspace instruction emulation: what a VMM does when the hypervisor gives up on an
//! instruction.
//!
//! KVM's in-kernel emulator rejects some instructions a stock Linux kernel runs early (on the
//! software KVM of PLATFORM.md: BMI2 `shlx`, `cmpxchg16b`, `xrstor`, `int3`, `clac`, later
//! `popcnt`); KVM_RUN then returns `KVM_EXIT_INTERNAL_ERROR` with the instruction bytes
//! ([`Exit::instruction_bytes`](crate::Exit::instruction_bytes)). [`Emulator::step`] decodes
//! the instruction (iced-x86; more bytes are fetched through the guest's page tables when the
//! exit gives fewer), executes it against a [`CpuState`] and guest memory, advances RIP and
//! reports what to do next: resume, or deliver an exception (#PF with its error code and CR2,
//! #GP, #UD, or the software interrupt of `int3`/`int n`). An instruction it does not emulate
//! is an [`EmulateError::Unsupported`] carrying its disassembly, never a loop.
//!
//! Emulated, with the SDM's flags (the undefined ones as the host CPU sets them, checked
//! against it): `popcnt`, `lzcnt`, `tzcnt`; BMI1 `andn`, `bextr`, `blsi`, `blsr`, `blsmsk`;
//! BMI2 `shlx`, `shrx`, `sarx`, `rorx`, `pdep`, `pext`, `mulx`; `cmpxchg8b`/`cmpxchg16b`
//! (atomic against other vCPUs: a host atomic on the guest page); `clac`, `stac`; `int3`,
//! `into`, `int n`, `int1`; `rdtscp`, `rdpid`; `xgetbv`, `xsetbv`, `xsave`, `xsaveopt`,
//! `xrstor`, `xsavec`, `xsaves`, `xrstors` (standard and compacted formats) against the vCPU's
//! XSAVE area; `ldmxcsr`/`stmxcsr`; the vector moves `movdqu movdqa movups movaps` and their
//! VEX forms on XMM/YMM; `fwait` (#NM / #MF as the SDM says, else nothing).
//!
//! The emulator is pure with respect to the hypervisor: [`CpuState`] is plain data the caller
//! fills from the vCPU and writes back ([`kvm`] does both for a [`KvmVcpu`](crate::KvmVcpu)).

mod alu;
mod exec;
pub mod kvm;
mod linear;
mod vector;
mod xsave;

#[cfg(test)]
mod tests;

pub use alu::{AC, AF, ARITH, CF, OF, PF, SF, ZF};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemory;

/// CR0.PG.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.OSXSAVE.
pub const CR4_OSXSAVE: u64 = 1 << 18;
/// CR4.SMAP.
pub const CR4_SMAP: u64 = 1 << 21;
/// CR4.TSD: RDTSC/RDTSCP only at CPL 0.
pub const CR4_TSD: u64 = 1 << 2;
/// IA32_EFER.LMA.
pub const EFER_LMA: u64 = 1 << 10;

/// The vCPU state an emulated instruction reads and writes: plain data, filled by the caller.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuState {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8 … R15 (the hardware's numbering).
    pub gpr: [u64; 16],
    /// RIP of the instruction.
    pub rip: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
    /// Current privilege level (CS.DPL; SS.DPL in real use).
    pub cpl: u8,
    /// CS.L: 64-bit code (else 32-bit protected-mode code with CS.D).
    pub long_mode: bool,
    /// Segment bases ES, CS, SS, DS, FS, GS (only FS and GS count in 64-bit mode).
    pub seg_base: [u64; 6],
    /// MAXPHYADDR of the guest (reserved bits of its page-table entries).
    pub maxphyaddr: u8,
    /// XCR0.
    pub xcr0: u64,
    /// The XCR0 bits the vCPU supports (XSETBV refuses others with #GP).
    pub xcr0_supported: u64,
    /// IA32_TSC at the exit (RDTSCP's result).
    pub tsc: u64,
    /// IA32_TSC_AUX (RDTSCP's ECX, RDPID's result).
    pub tsc_aux: u64,
    /// The vCPU's XSAVE area in standard format (`KVM_GET_XSAVE`), for the XSAVE family;
    /// empty when the caller did not load it (those instructions are then unsupported).
    pub xsave: Vec<u8>,
    /// Set by the emulator when it changed XCR0 or the XSAVE area (the caller writes them
    /// back).
    pub extended_state_dirty: bool,
}

impl CpuState {
    /// Whether paging is on (CR0.PG; the emulator supports IA-32e paging only).
    pub fn paging_enabled(&self) -> bool {
        self.cr0 & CR0_PG != 0
    }
}

/// What kind of event an [`Exception`] is, for its injection (SDM vol. 3 §6.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A fault: RIP stays at the instruction, which is restarted after the handler.
    Fault,
    /// A software exception (`int3`, `into`): delivered with RIP after the instruction.
    SoftwareException,
    /// A software interrupt (`int n`): delivered with RIP after the instruction.
    SoftwareInterrupt,
    /// A privileged software exception (`int1`): as a software exception, DPL not checked.
    PrivilegedSoftwareException,
}

/// An exception or interrupt the instruction raises, to deliver through the guest's IDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exception {
    /// The vector.
    pub vector: u8,
    /// The error code, for the vectors that push one.
    pub error_code: Option<u32>,
    /// CR2 for a #PF.
    pub cr2: Option<u64>,
    /// How it is delivered.
    pub kind: EventKind,
    /// The instruction's length (software events are delivered after it).
    pub instruction_len: u8,
}

/// #UD.
pub const UD: u8 = 6;
/// #GP.
pub const GP: u8 = 13;
/// #PF.
pub const PF_VECTOR: u8 = 14;
/// #BP.
pub const BP: u8 = 3;
/// #OF.
pub const OF_VECTOR: u8 = 4;
/// #DB.
pub const DB: u8 = 1;
/// #NM (device not available).
pub const NM: u8 = 7;
/// #MF (x87 floating-point error).
pub const MF: u8 = 16;

impl Exception {
    /// A fault with no error code.
    pub const fn fault(vector: u8) -> Self {
        Self {
            vector,
            error_code: None,
            cr2: None,
            kind: EventKind::Fault,
            instruction_len: 0,
        }
    }
    /// #UD.
    pub const fn ud() -> Self {
        Self::fault(UD)
    }
    /// #GP with `error_code`.
    pub const fn gp(error_code: u32) -> Self {
        Self {
            error_code: Some(error_code),
            ..Self::fault(GP)
        }
    }
    /// #PF with `error_code` at `cr2`.
    pub const fn page_fault(error_code: u32, cr2: u64) -> Self {
        Self {
            error_code: Some(error_code),
            cr2: Some(cr2),
            ..Self::fault(PF_VECTOR)
        }
    }
}

/// What to do after [`Emulator::step`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The instruction ran: RIP (and whatever it changed) updated; resume the vCPU.
    Emulated {
        /// Its mnemonic (as the statistics count it).
        mnemonic: &'static str,
    },
    /// Deliver this exception (for faults RIP is unchanged); then resume.
    Exception(Exception),
}

/// Why an instruction was not emulated (the vCPU should stop: resuming would only fail again).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmulateError {
    /// The bytes are not an instruction (or too few could be fetched).
    #[error("cannot decode the instruction bytes {bytes:02x?}")]
    Decode {
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// A valid instruction the emulator does not implement (or not in this form).
    #[error("instruction not emulated: {disassembly}")]
    Unsupported {
        /// Its disassembly (GNU syntax), e.g. `vaddps %ymm2,%ymm1,%ymm0`.
        disassembly: String,
    },
    /// A memory operand lies outside guest RAM (MMIO is not emulated here).
    #[error("guest-physical address {gpa:#x} is not RAM")]
    NotRam {
        /// The address.
        gpa: u64,
    },
    /// The vCPU state is outside what the emulator supports (e.g. 32-bit paging).
    #[error("unsupported vCPU state: {what} ({value:#x})")]
    BadState {
        /// What.
        what: &'static str,
        /// The offending value.
        value: u64,
    },
}

/// Counts of emulated instructions by mnemonic, exceptions raised, and refusals.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmulationStats {
    /// Instructions emulated, by mnemonic.
    pub emulated: BTreeMap<String, u64>,
    /// Exceptions raised, by vector.
    pub exceptions: BTreeMap<u8, u64>,
    /// Instructions refused ([`EmulateError`]).
    pub refused: u64,
}

/// The emulator: stateless but for its statistics.
#[derive(Debug, Default)]
pub struct Emulator {
    stats: EmulationStats,
}

impl Emulator {
    /// A new emulator with zeroed statistics.
    pub fn new() -> Self {
        Self::default()
    }

    /// The statistics so far.
    pub fn stats(&self) -> &EmulationStats {
        &self.stats
    }

    /// Emulate the instruction at `cpu.rip`, whose first bytes KVM reported as `bytes` (may be
    /// empty or short: the rest is fetched from guest memory through the guest's paging).
    ///
    /// # Errors
    /// [`EmulateError`] when the instruction cannot be emulated: the caller should stop the
    /// vCPU and report it.
    pub fn step<M: GuestMemory + ?Sized>(
        &mut self,
        cpu: &mut CpuState,
        mem: &M,
        bytes: &[u8],
    ) -> Result<Outcome, EmulateError> {
        let r = exec::step(cpu, mem, bytes);
        match &r {
            Ok(Outcome::Emulated { mnemonic }) => {
                *self
                    .stats
                    .emulated
                    .entry((*mnemonic).to_string())
                    .or_default() += 1;
            }
            Ok(Outcome::Exception(e)) => {
                // Software events are the instruction's own effect: counted as emulated.
                let name = match e.kind {
                    EventKind::Fault => None,
                    EventKind::SoftwareInterrupt => Some("int"),
                    EventKind::PrivilegedSoftwareException => Some("int1"),
                    EventKind::SoftwareException if e.vector == BP => Some("int3"),
                    EventKind::SoftwareException => Some("into"),
                };
                if let Some(name) = name {
                    *self.stats.emulated.entry(name.to_string()).or_default() += 1;
                }
                *self.stats.exceptions.entry(e.vector).or_default() += 1;
            }
            Err(_) => self.stats.refused += 1,
        }
        r
    }
}
