//! # vmkit-vcpu
//!
//! A vCPU abstraction for VMMs on Linux KVM:
//!
//! * narrow capability traits — [`VcpuRun`], [`VcpuRegisters`], [`VcpuSpecialRegisters`] — with a
//!   KVM implementation ([`KvmVm`], [`KvmVcpu`]);
//! * a typed exit ([`VcpuExit`]: guest I/O as borrowed accesses, everything else as owned
//!   [`Exit`] data) and per-kind [`ExitStats`];
//! * plain-data entry states for every firmware-less boot protocol — real mode
//!   ([`RealModeState`]), flat 32-bit protected mode for multiboot, PVH and Linux
//!   ([`ProtectedModeState`]) and 64-bit long mode ([`LongModeState`]) — with the general
//!   registers as vmkit data ([`GeneralRegisters`]);
//! * a run loop ([`run_until_exit`]) that dispatches PIO/MMIO to an [`IoHandler`] (the VMM's
//!   buses) and returns anything else to the caller, or stops when a [`StopHandle`] fires.
//!
//! * a **VMCS model** ([`vmcs`]): the six areas as plain data, SDM field encodings with width
//!   checks, exit reasons, exit-qualification decoders and the VM-entry guest-state checks —
//!   mapped onto KVM by [`kvm_map`] / [`kvm_ext`] ([`Vmcs::apply`], [`Vmcs::read_from`]);
//! * more capability traits: [`VcpuEvents`], [`VcpuMsrs`], [`VcpuExtendedState`],
//!   [`VcpuInterruptWindow`] (all implemented by [`KvmVcpu`]);
//! * [`events`]: event injection with VM-entry interruption-information semantics and an
//!   interrupt queue delivered through interrupt windows; [`events::inject_through_idt`] adds
//!   the IDT-gate checks (limit, type, DPL ≥ CPL, present) VM entry makes for injected software
//!   events ([`vmcs::delivery`]);
//! * [`cpuid`]: CPUID templates (`host`, `minimal`, JSON) normalized per vCPU;
//! * [`vcpu_config`]: vCPU creation with a chosen CPUID template and machine-check banks
//!   ([`KvmVm::create_vcpu_with`], QEMU's 10 banks by default);
//! * [`handle`]: one [`VcpuHandle`] per vCPU to kick, pause/resume and read registers from
//!   other threads, under any run loop;
//! * [`control`]: per-vCPU CPU-time caps, interrupt windows and [`control::run_controlled`];
//! * [`snapshot`]: versioned vCPU state save/restore.
//!
//! The library holds no policy: which ports exist, what to print and when to stop are decided by
//! the caller.
//!
//! ```no_run
//! use vmkit_vcpu::{Exit, IoHandler, KvmVm, RunOutcome, StopHandle, ExitStats, run_until_exit};
//!
//! struct Ports;
//! impl IoHandler for Ports {
//!     fn pio_read(&self, _port: u16, data: &mut [u8]) { data.fill(0xff) }
//!     fn pio_write(&self, port: u16, data: &[u8]) { println!("out {port:#x} {data:?}") }
//!     fn mmio_read(&self, _addr: u64, data: &mut [u8]) { data.fill(0xff) }
//!     fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
//! }
//!
//! # fn main() -> Result<(), vmkit_vcpu::Error> {
//! let vm = KvmVm::new()?;
//! let mut vcpu = vm.create_vcpu(0)?;
//! // ... register memory, load a guest, apply a LongModeState ...
//! let mut stats = ExitStats::default();
//! match run_until_exit(&mut vcpu, &Ports, &StopHandle::new(), &mut stats)? {
//!     RunOutcome::Stopped(status) => println!("guest stopped with {status}"),
//!     RunOutcome::Exit(Exit::Hlt) => println!("guest halted"),
//!     RunOutcome::Exit(other) => println!("unhandled exit {other:?}"),
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

pub mod control;
pub mod cpuid;
#[cfg(feature = "emulate")]
pub mod emulate;
pub mod entry;
mod error;
pub mod events;
pub mod exit;
pub mod handle;
pub mod kvm;
pub mod kvm_ext;
pub mod kvm_map;
pub mod run_loop;
pub mod snapshot;
pub mod state;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
mod traits;
pub mod vcpu_config;
pub mod vmcs;

pub use entry::{GeneralRegisters, ProtectedModeState, RealModeState};
pub use error::Error;
pub use exit::{Exit, ExitKind, ExitStats, VcpuExit};
pub use handle::VcpuHandle;
pub use kvm::{KvmVcpu, KvmVm};
pub use run_loop::{IoHandler, RunOutcome, StopHandle, dispatch_io, run_until_exit};
pub use state::{LongModeState, Segment};
pub use traits::{
    VcpuEvents, VcpuExtendedState, VcpuGuestState, VcpuInterruptWindow, VcpuMsrs, VcpuRegisters,
    VcpuRun, VcpuSpecialRegisters,
};
pub use vcpu_config::VcpuConfig;
pub use vmcs::Vmcs;

#[cfg(test)]
mod kvm_tests;
#[cfg(test)]
mod kvm_tests_control;
#[cfg(test)]
mod kvm_tests_delivery;
#[cfg(test)]
mod kvm_tests_entry;
#[cfg(test)]
mod kvm_tests_vmcs;
#[cfg(test)]
mod map_tests;
