use kvm_bindings::{kvm_regs, kvm_sregs};

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
}

/// Segment, control and descriptor-table registers plus EFER, in `kvm_sregs` layout.
pub trait VcpuSpecialRegisters {
    /// Read the special registers.
    fn sregs(&self) -> Result<kvm_sregs, Error>;
    /// Write the special registers.
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), Error>;
}
