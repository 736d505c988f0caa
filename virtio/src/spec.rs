//! Constants from the virtio 1.2 specification, named as there (re-exported from
//! virtio-bindings where it has them).

pub use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
pub use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
pub use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};

/// `ACKNOWLEDGE` as a status byte bit.
pub const STATUS_ACKNOWLEDGE: u8 = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
/// `DRIVER` as a status byte bit.
pub const STATUS_DRIVER: u8 = VIRTIO_CONFIG_S_DRIVER as u8;
/// `DRIVER_OK` as a status byte bit.
pub const STATUS_DRIVER_OK: u8 = VIRTIO_CONFIG_S_DRIVER_OK as u8;
/// `FEATURES_OK` as a status byte bit.
pub const STATUS_FEATURES_OK: u8 = VIRTIO_CONFIG_S_FEATURES_OK as u8;
/// `DEVICE_NEEDS_RESET` as a status byte bit.
pub const STATUS_NEEDS_RESET: u8 = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
/// `FAILED` as a status byte bit.
pub const STATUS_FAILED: u8 = VIRTIO_CONFIG_S_FAILED as u8;

/// PCI vendor ID of virtio devices (virtio 1.2 §4.1.2).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio PCI device IDs are 0x1040 + device type (virtio 1.2 §4.1.2).
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// "No MSI-X vector" (virtio 1.2 §4.1.4.3).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// virtio-pci capability `cfg_type`: common configuration (virtio 1.2 §4.1.4).
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
/// virtio-pci capability `cfg_type`: notifications.
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
/// virtio-pci capability `cfg_type`: ISR status.
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
/// virtio-pci capability `cfg_type`: device-specific configuration.
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
/// virtio-pci capability `cfg_type`: PCI configuration access.
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// ISR bit: a queue was used (virtio 1.2 §4.1.4.5).
pub const VIRTIO_PCI_ISR_QUEUE: u8 = 1;
/// ISR bit: the configuration changed.
pub const VIRTIO_PCI_ISR_CONFIG: u8 = 2;

/// virtio-mmio `MagicValue`: "virt" little-endian (virtio 1.2 §4.2.2).
pub const VIRTIO_MMIO_MAGIC: u32 = 0x7472_6976;
/// virtio-mmio version of the modern (non-legacy) interface.
pub const VIRTIO_MMIO_VERSION_2: u32 = 2;
/// virtio-mmio `InterruptStatus` bit: used buffer notification.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// virtio-mmio `InterruptStatus` bit: configuration change notification.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;
