//! # vmkit-devices
//!
//! Device plumbing for vmkit VMMs:
//!
//! * [`bus`] — PIO and MMIO buses that dispatch guest accesses by address range to
//!   [`BusDevice`]s; [`IoBuses`] plugs both into the vCPU run loop
//!   ([`vmkit_vcpu::IoHandler`]). Unclaimed accesses are counted and read as all-ones.
//! * [`interrupt`] — the [`InterruptSource`] handle a device receives instead of the VM, and
//!   the level-triggered [`IrqLine`] (PCI INTx#, an I/O APIC pin).
//! * [`ioapic`] — a userspace I/O APIC (24 pins, edge/level, remote IRR, EOI) for KVM's split
//!   irqchip, delivering MSI messages.
//! * [`irq_port`] — a port that drives I/O APIC lines, for test devices and test kernels.
//! * [`kvm_irq`] — split irqchip setup, the GSI routing table, `KVM_SIGNAL_MSI` and irqfds.
//! * [`msi`] — MSI messages (SDM §11.11 encode/decode) and the [`msi::MsiSink`] they go to.
//! * [`pci`] — the [`pci::PciFunction`] trait, type-0 config space, MSI-X, and the root bus
//!   (0xCF8/0xCFC and ECAM) that maps BARs on the buses.
//! * [`serial`] — a 16550 UART (vm-superio) writing to any `io::Write`.
//! * [`fw_cfg`] — QEMU's fw_cfg interface (ports 0x510/0x511: signature, file directory, RAM
//!   size, CPU counts, command line; DMA refused).
//! * [`debug_exit`] — a port through which the guest ends the VM with a status code.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_devices::{IoBuses, debug_exit::DebugExit, serial::Serial, interrupt::NoInterrupt};
//! use vmkit_vcpu::{IoHandler, StopHandle};
//!
//! let stop = StopHandle::new();
//! let buses = IoBuses::default();
//! let out = Arc::new(Mutex::new(Vec::new()));
//! let serial = Serial::new(Arc::new(NoInterrupt), SharedBuf(out.clone()));
//! buses.pio.insert(0x3f8, 8, "com1", Arc::new(serial)).unwrap();
//! buses.pio.insert(0xf4, 4, "debug-exit", Arc::new(DebugExit::new(stop.clone()))).unwrap();
//!
//! // What a guest `out` does, via the run loop:
//! buses.pio_write(0x3f8, b"h");
//! buses.pio_write(0xf4, &[3]);
//! assert_eq!(*out.lock().unwrap(), b"h");
//! assert_eq!(stop.requested(), Some(3));
//!
//! # #[derive(Clone)] struct SharedBuf(Arc<Mutex<Vec<u8>>>);
//! # impl std::io::Write for SharedBuf {
//! #     fn write(&mut self, b: &[u8]) -> std::io::Result<usize> { self.0.lock().unwrap().extend_from_slice(b); Ok(b.len()) }
//! #     fn flush(&mut self) -> std::io::Result<()> { Ok(()) }
//! # }
//! ```
#![deny(missing_docs)]

pub mod bus;
pub mod debug_exit;
pub mod fw_cfg;
pub mod interrupt;
pub mod ioapic;
pub mod irq_port;
pub mod kvm_irq;
#[cfg(test)]
mod kvm_tests;
pub mod msi;
pub mod pci;
pub mod serial;

pub use bus::{Bus, BusDevice, BusError, BusStats, IoBuses, MutBusDevice};
pub use interrupt::{InterruptSource, IrqLine};
