//! # vmkit-virtio
//!
//! virtio for vmkit VMMs (virtio 1.2):
//!
//! * [`VirtioDevice`] — a transport-agnostic device: type, features, queues, configuration,
//!   activate/notify/reset. [`Activation`] hands it memory, queues and a [`VirtioInterrupt`],
//!   and runs the EVENT_IDX-aware queue loop, so a device is a few dozen lines
//!   (see [`rng::Rng`]).
//! * [`TransportCore`] — feature negotiation, the device-status state machine and queue
//!   configuration, written once and shared by the transports:
//!   [`mmio::MmioTransport`] (virtio-mmio v2) and [`pci::VirtioPciTransport`] (modern
//!   virtio-pci with MSI-X, and INTx through a level-triggered line while MSI-X is disabled,
//!   on vmkit-devices' `PciFunction`).
//! * [`notify`] — queue notifications through ioeventfd and interrupts through irqfd.
//! * `test_utils` (feature `test-utils`) — a driver-side harness over mock guest memory.
//!
//! Every ignored guest action (illegal status transition, unoffered feature, bad queue size,
//! bad register access, …) is counted in [`TransportMetrics`]; none can panic.
#![deny(missing_docs)]

mod core;
pub mod counters;
pub mod device;
pub mod doorbell;
pub mod events;
pub mod guest_access;
#[cfg(any(test, feature = "guest-driver"))]
pub mod guest_driver;
mod intx;
pub mod memory;
pub mod mmio;
pub mod notify;
pub mod pci;
pub mod persist;
pub mod queue_pass;
pub mod queue_server;
pub mod rate_limiter;
pub mod rng;
pub mod spec;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use crate::core::{Ring, TransportCore, TransportMetrics};
pub use device::{
    Activation, BoxedCause, DeviceError, InterruptCause, QueueWork, VirtioDevice, VirtioInterrupt,
};
pub use spec::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

#[cfg(test)]
mod kvm_multi_tests;
#[cfg(test)]
mod kvm_tests;
#[cfg(test)]
mod memory_kinds_tests;
#[cfg(test)]
mod pci_cfg_tests;
#[cfg(test)]
mod pci_intx_tests;
#[cfg(test)]
mod pci_tests;
#[cfg(test)]
mod persist_tests;
#[cfg(test)]
mod queue_pass_tests;
#[cfg(test)]
mod queue_server_tests;
#[cfg(test)]
mod tests;
