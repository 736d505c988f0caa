use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

use crate::entry::GeneralRegisters;
use crate::{Error, VcpuExit};

/// Runs the vCPU until the next exit.
pub trait VcpuRun {
    /// Enter the guest; return the reason it stopped. I/O exits borrow the exit buffer: complete
    /// a read by filling its `data` before the next call.
    fn run(&mut self) -> Result<VcpuExit<'_>, Error>;
}

/// General-purpose registers (RAX…R15, RIP, RFLAGS), in rust-vmm's `kvm_regs` layout.
pub trait VcpuRegisters {
    /// Read the registers.
    fn regs(&self) -> Result<kvm_regs, Error>;
    /// Write the registers.
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), Error>;

    /// Read the registers as vmkit data.
    ///
    /// # Errors
    /// As [`regs`](Self::regs).
    fn general_registers(&self) -> Result<GeneralRegisters, Error> {
        self.regs().map(|r| GeneralRegisters::from_kvm(&r))
    }

    /// Write the registers from vmkit data (no kvm-bindings type needed by the caller).
    ///
    /// # Errors
    /// As [`set_regs`](Self::set_regs).
    fn set_general_registers(&mut self, regs: &GeneralRegisters) -> Result<(), Error> {
        self.set_regs(&regs.to_kvm())
    }
}

/// Segment, control and descriptor-table registers plus EFER, in `kvm_sregs` layout.
pub trait VcpuSpecialRegisters {
    /// Read the special registers.
    fn sregs(&self) -> Result<kvm_sregs, Error>;
    /// Write the special registers.
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), Error>;
}

/// Pending/injected events, interrupt shadow and NMI masking, and the activity (MP) state.
pub trait VcpuEvents {
    /// Read the event state (KVM_GET_VCPU_EVENTS).
    fn vcpu_events(&self) -> Result<kvm_vcpu_events, Error>;
    /// Write the event state (KVM_SET_VCPU_EVENTS).
    fn set_vcpu_events(&mut self, events: &kvm_vcpu_events) -> Result<(), Error>;
    /// Read the activity state (KVM_GET_MP_STATE).
    fn mp_state(&self) -> Result<kvm_mp_state, Error>;
    /// Write the activity state (KVM_SET_MP_STATE).
    fn set_mp_state(&mut self, state: kvm_mp_state) -> Result<(), Error>;
}

/// Model-specific registers.
pub trait VcpuMsrs {
    /// Read the MSRs `indices` (at most `KVM_MAX_MSR_ENTRIES`).
    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, Error>;
    /// Write MSRs; fails naming the first MSR KVM rejects.
    fn set_msrs(&mut self, entries: &[kvm_msr_entry]) -> Result<(), Error>;
}

/// Debug registers, extended control registers, the local APIC and the XSAVE area.
pub trait VcpuExtendedState {
    /// DR0–DR3, DR6, DR7.
    fn debug_regs(&self) -> Result<kvm_debugregs, Error>;
    /// Write DR0–DR3, DR6, DR7.
    fn set_debug_regs(&mut self, regs: &kvm_debugregs) -> Result<(), Error>;
    /// XCRs.
    fn xcrs(&self) -> Result<kvm_xcrs, Error>;
    /// Write XCRs.
    fn set_xcrs(&mut self, xcrs: &kvm_xcrs) -> Result<(), Error>;
    /// The legacy 4-KiB XSAVE area.
    fn xsave(&self) -> Result<kvm_xsave, Error>;
    /// Write the XSAVE area.
    fn set_xsave(&mut self, xsave: &kvm_xsave) -> Result<(), Error>;
    /// Local APIC registers (needs an in-kernel irqchip).
    fn lapic(&self) -> Result<kvm_lapic_state, Error>;
    /// Write the local APIC registers.
    fn set_lapic(&mut self, lapic: &kvm_lapic_state) -> Result<(), Error>;
}

/// Everything the VMCS guest-state area maps to (see [`crate::kvm_map`]).
pub trait VcpuGuestState:
    VcpuRegisters + VcpuSpecialRegisters + VcpuEvents + VcpuMsrs + VcpuExtendedState
{
}

impl<T> VcpuGuestState for T where
    T: VcpuRegisters + VcpuSpecialRegisters + VcpuEvents + VcpuMsrs + VcpuExtendedState + ?Sized
{
}

/// Interrupt-window control for injecting external interrupts without an in-kernel irqchip.
pub trait VcpuInterruptWindow {
    /// True when the last exit reported that the guest can take an external interrupt now
    /// (RFLAGS.IF = 1, no STI/MOV SS shadow, nothing already queued).
    fn interrupt_window_open(&mut self) -> bool;
    /// Ask for an exit as soon as the window opens (`kvm_run.request_interrupt_window`).
    fn request_interrupt_window(&mut self, on: bool);
    /// Queue external interrupt `vector` for the next entry (KVM_INTERRUPT). Only valid when the
    /// window is open.
    fn inject_external_interrupt(&mut self, vector: u8) -> Result<(), Error>;
}
