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

/// Offsets of the fields of `struct virtio_pci_common_cfg` in the common configuration
/// structure (virtio 1.2 §4.1.4.3), named as Linux's `uapi/linux/virtio_pci.h` names them.
/// Defined once for the transport's decoder, the test harnesses, the fuzz code and the tiny
/// guests' driver code.
pub mod common_cfg {
    /// `le32 device_feature_select`.
    pub const VIRTIO_PCI_COMMON_DFSELECT: u64 = 0x00;
    /// `le32 device_feature` (read-only).
    pub const VIRTIO_PCI_COMMON_DF: u64 = 0x04;
    /// `le32 driver_feature_select`.
    pub const VIRTIO_PCI_COMMON_GFSELECT: u64 = 0x08;
    /// `le32 driver_feature`.
    pub const VIRTIO_PCI_COMMON_GF: u64 = 0x0c;
    /// `le16 config_msix_vector`.
    pub const VIRTIO_PCI_COMMON_MSIX: u64 = 0x10;
    /// `le16 num_queues` (read-only).
    pub const VIRTIO_PCI_COMMON_NUMQ: u64 = 0x12;
    /// `u8 device_status`.
    pub const VIRTIO_PCI_COMMON_STATUS: u64 = 0x14;
    /// `u8 config_generation` (read-only).
    pub const VIRTIO_PCI_COMMON_CFGGENERATION: u64 = 0x15;
    /// `le16 queue_select`.
    pub const VIRTIO_PCI_COMMON_Q_SELECT: u64 = 0x16;
    /// `le16 queue_size`.
    pub const VIRTIO_PCI_COMMON_Q_SIZE: u64 = 0x18;
    /// `le16 queue_msix_vector`.
    pub const VIRTIO_PCI_COMMON_Q_MSIX: u64 = 0x1a;
    /// `le16 queue_enable`.
    pub const VIRTIO_PCI_COMMON_Q_ENABLE: u64 = 0x1c;
    /// `le16 queue_notify_off` (read-only).
    pub const VIRTIO_PCI_COMMON_Q_NOFF: u64 = 0x1e;
    /// `le64 queue_desc` (low half; the high half is at +4).
    pub const VIRTIO_PCI_COMMON_Q_DESCLO: u64 = 0x20;
    /// `le64 queue_desc`, high half.
    pub const VIRTIO_PCI_COMMON_Q_DESCHI: u64 = 0x24;
    /// `le64 queue_driver` (the available ring; low half).
    pub const VIRTIO_PCI_COMMON_Q_AVAILLO: u64 = 0x28;
    /// `le64 queue_driver`, high half.
    pub const VIRTIO_PCI_COMMON_Q_AVAILHI: u64 = 0x2c;
    /// `le64 queue_device` (the used ring; low half).
    pub const VIRTIO_PCI_COMMON_Q_USEDLO: u64 = 0x30;
    /// `le64 queue_device`, high half.
    pub const VIRTIO_PCI_COMMON_Q_USEDHI: u64 = 0x34;
    /// `le16 queue_notify_data` (read-only).
    pub const VIRTIO_PCI_COMMON_Q_NDATA: u64 = 0x38;
    /// `le16 queue_reset`.
    pub const VIRTIO_PCI_COMMON_Q_RESET: u64 = 0x3a;
    /// Length of the structure up to and including `queue_reset`.
    pub const VIRTIO_PCI_COMMON_CFG_LEN: u64 = 0x3c;
}
