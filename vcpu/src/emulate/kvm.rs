//! The emulator on a KVM vCPU: [`emulate_exit`] turns an emulation-failure exit into an
//! emulated instruction (or the exception it raises) and lets the vCPU go on.
//!
//! ```no_run
//! use vmkit_vcpu::emulate::{Emulator, kvm::emulate_exit};
//! use vmkit_vcpu::{Exit, ExitStats, IoHandler, KvmVcpu, RunOutcome, StopHandle, run_until_exit};
//! # fn demo(vcpu: &mut KvmVcpu, io: &impl IoHandler, mem: &vm_memory::GuestMemoryMmap)
//! #     -> Result<(), Box<dyn std::error::Error>> {
//! let mut emu = Emulator::new();
//! let mut stats = ExitStats::default();
//! loop {
//!     match run_until_exit(vcpu, io, &StopHandle::new(), &mut stats)? {
//!         RunOutcome::Exit(e @ Exit::InternalError { .. }) => {
//!             emulate_exit(vcpu, mem, &mut emu, &e)?; // resumes after the instruction
//!         }
//!         other => break println!("{other:?}; emulated {:?}", emu.stats().emulated),
//!     }
//! }
//! # Ok(()) }
//! ```

use kvm_bindings::{kvm_regs, kvm_xcrs};
use vm_memory::GuestMemory;

use super::{CpuState, EmulateError, Emulator, EventKind, Exception, Outcome};
use crate::vmcs::{InterruptionInfo, InterruptionType};
use crate::{Error, Exit, VcpuGuestState};

/// IA32_TSC.
const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_AUX.
const MSR_IA32_TSC_AUX: u32 = 0xc000_0103;

/// Why an exit could not be handled by emulation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmulateExitError {
    /// The exit is not an emulation failure.
    #[error("not an emulation-failure exit")]
    NotEmulationFailure,
    /// The emulator refused the instruction.
    #[error("emulation refused")]
    Refused(#[from] EmulateError),
    /// Reading or writing the vCPU failed.
    #[error("vCPU access failed")]
    Vcpu(#[from] Error),
}

/// Read the state the emulator needs from `vcpu` (registers, control registers, segment
/// bases, CPL, XCR0, TSC and TSC_AUX, and the XSAVE area).
///
/// # Errors
/// [`Error`] when KVM refuses one of the reads.
pub fn read_state<V: VcpuGuestState + ?Sized>(vcpu: &V) -> Result<CpuState, Error> {
    let r = vcpu.regs()?;
    let s = vcpu.sregs()?;
    let msrs = vcpu
        .get_msrs(&[MSR_IA32_TSC, MSR_IA32_TSC_AUX])
        .unwrap_or_default();
    let msr = |i| msrs.iter().find(|m| m.index == i).map_or(0, |m| m.data);
    let xcrs = vcpu.xcrs().ok();
    let xcr0 = xcrs
        .as_ref()
        .and_then(|x| x.xcrs[..x.nr_xcrs as usize].iter().find(|x| x.xcr == 0))
        .map_or(1, |x| x.value);
    let xsave: Vec<u8> = vcpu
        .xsave()
        .map(|x| x.region.iter().flat_map(|w| w.to_le_bytes()).collect())
        .unwrap_or_default();
    // What XSETBV may enable: the host's XCR0 bits (CPUID.(EAX=0DH,ECX=0):EDX:EAX).
    let d = std::arch::x86_64::__cpuid_count(0xd, 0);
    Ok(CpuState {
        gpr: [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        rip: r.rip,
        rflags: r.rflags,
        cr0: s.cr0,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer,
        cpl: s.cs.dpl,
        long_mode: s.cs.l != 0,
        seg_base: [
            s.es.base, s.cs.base, s.ss.base, s.ds.base, s.fs.base, s.gs.base,
        ],
        maxphyaddr: host_maxphyaddr(),
        xcr0,
        xcr0_supported: u64::from(d.eax) | u64::from(d.edx) << 32,
        tsc: msr(MSR_IA32_TSC),
        tsc_aux: msr(MSR_IA32_TSC_AUX),
        xsave,
        extended_state_dirty: false,
    })
}

/// MAXPHYADDR of the host (CPUID.80000008H:EAX[7:0]), which KVM gives its guests.
fn host_maxphyaddr() -> u8 {
    let r = std::arch::x86_64::__cpuid(0x8000_0008);
    (r.eax & 0xff) as u8
}

/// Write back what the emulator changed: general registers, RIP, RFLAGS, and XCR0 and the
/// XSAVE area when they changed.
///
/// # Errors
/// [`Error`] when KVM refuses a write.
pub fn write_state<V: VcpuGuestState + ?Sized>(vcpu: &mut V, cpu: &CpuState) -> Result<(), Error> {
    let g = &cpu.gpr;
    let regs = kvm_regs {
        rax: g[0],
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rsp: g[4],
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: cpu.rip,
        rflags: cpu.rflags,
    };
    vcpu.set_regs(&regs)?;
    if cpu.extended_state_dirty {
        let mut x = vcpu.xsave()?;
        for (w, b) in x.region.iter_mut().zip(cpu.xsave.chunks_exact(4)) {
            *w = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        vcpu.set_xsave(&x)?;
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = cpu.xcr0;
        vcpu.set_xcrs(&xcrs)?;
    }
    Ok(())
}

/// Deliver `e` to `vcpu` at its next entry: #PF with CR2 set, software events with their
/// instruction length and the IDT-gate checks of their delivery.
fn deliver<V: VcpuGuestState + ?Sized, M: GuestMemory + ?Sized>(
    vcpu: &mut V,
    mem: &M,
    e: &Exception,
) -> Result<(), Error> {
    if let Some(cr2) = e.cr2 {
        let mut s = vcpu.sregs()?;
        s.cr2 = cr2;
        vcpu.set_sregs(&s)?;
    }
    let kind = match e.kind {
        EventKind::Fault => InterruptionType::HardwareException,
        EventKind::SoftwareInterrupt => InterruptionType::SoftwareInterrupt,
        EventKind::SoftwareException => InterruptionType::SoftwareException,
        EventKind::PrivilegedSoftwareException => InterruptionType::PrivilegedSoftwareException,
    };
    let info = InterruptionInfo::new(e.vector, kind, e.error_code.is_some());
    let code = e.error_code.unwrap_or(0);
    let len = u32::from(e.instruction_len);
    if e.kind == EventKind::Fault {
        crate::events::inject(vcpu, info, code, len)
    } else {
        let cpu = read_state(vcpu)?;
        crate::events::inject_through_idt(vcpu, info, code, len, |_, va, buf| {
            super::linear::Linear::new(&cpu, mem)
                .read(va, buf, vmkit_memory::walk::AccessKind::Read)
                .is_ok()
        })
        .map(|_| ())
    }
}

/// Handle the emulation-failure exit `exit` of `vcpu` by emulating its instruction: the vCPU
/// then resumes after it (or with the exception it raised injected). Returns the outcome.
///
/// # Errors
/// [`EmulateExitError::NotEmulationFailure`] for any other exit; [`EmulateExitError::Refused`]
/// when the emulator cannot emulate the instruction (stop the vCPU and report its
/// disassembly); [`EmulateExitError::Vcpu`] when KVM refuses a state access.
pub fn emulate_exit<V: VcpuGuestState + ?Sized, M: GuestMemory + ?Sized>(
    vcpu: &mut V,
    mem: &M,
    emulator: &mut Emulator,
    exit: &Exit,
) -> Result<Outcome, EmulateExitError> {
    let Exit::InternalError { suberror, .. } = exit else {
        return Err(EmulateExitError::NotEmulationFailure);
    };
    if *suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
        return Err(EmulateExitError::NotEmulationFailure);
    }
    let bytes = exit.instruction_bytes().unwrap_or_default();
    let mut cpu = read_state(vcpu)?;
    let outcome = emulator.step(&mut cpu, mem, &bytes)?;
    match &outcome {
        Outcome::Emulated { .. } => write_state(vcpu, &cpu)?,
        Outcome::Exception(e) => deliver(vcpu, mem, e)?,
    }
    Ok(outcome)
}
