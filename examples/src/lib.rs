//! # vmkit-examples
//!
//! Pieces the example VMMs (`src/bin/`) share, so each binary shows only what is its own:
//!
//! * [`guest`] — guest-side assembly (iced-x86): console output, PCI configuration access,
//!   BAR and MSI-X programming, the virtio bring-up, virtqueue descriptors and doorbells,
//!   the counting interrupt handler, and the guest-physical layout all PCI examples use;
//! * [`machine`] — host side: a KVM VM with the split irqchip, a PCI root bus, serial console
//!   and debug-exit port, and a virtio function wired with irqfd (MSI-X) and ioeventfd
//!   (doorbells).
//!
//! Like the binaries, these modules hold policy (ports, addresses, printing): they are example
//! code, not a library for VMMs.
#![deny(missing_docs)]

pub mod guest;
pub mod machine;
