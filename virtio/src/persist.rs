//! Serde state of the transports, so a device restores into a running VM: the shared core
//! ([`CoreState`]: status, features, selectors, queue configuration and positions, config
//! generation) and what each transport adds ([`MmioTransportState`]: `InterruptStatus`;
//! [`PciTransportState`]: configuration space, MSI-X table/PBA and the virtio MSI-X vector
//! assignments).
//!
//! A state is taken from a quiescent device: the VMM stops the vCPUs and the notify worker and
//! lets the device finish what it has in flight (vmkit-block's `Block::drain`). The queue
//! positions are then read where the device published them, the used ring's `idx` in guest
//! memory (with nothing in flight, the next chain to take is the next used slot), so every
//! device is covered without keeping its own copy. Restoring rebuilds a fresh transport around
//! a freshly built device: the queues are validated like a driver's writes would be, and a
//! state saved after `DRIVER_OK` activates the new device at once (its event sources, retry
//! timers and queue servers come back with it).

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

/// Errors restoring a state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A saved queue is not a valid queue.
    #[error("invalid saved queue")]
    Queue(#[source] virtio_queue::Error),
    /// The state does not fit the device (queue count, features, vector count).
    #[error("state does not fit the device: {0}")]
    Mismatch(&'static str),
    /// The saved PCI configuration space or MSI-X state was refused.
    #[error("invalid saved PCI state")]
    Pci(#[source] vmkit_devices::pci::PciError),
}

/// A virtqueue's state (mirror of `virtio_queue::QueueState` with serde).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered by the device.
    pub max_size: u16,
    /// Next available-ring entry to take.
    pub next_avail: u16,
    /// Next used-ring entry to fill.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// Queue enabled.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<&Queue> for QueueSnapshot {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl QueueSnapshot {
    /// Rebuild the queue.
    ///
    /// ```
    /// use virtio_queue::{Queue, QueueT};
    /// use vmkit_virtio::persist::QueueSnapshot;
    /// let mut q = Queue::new(64).unwrap();
    /// q.set_next_avail(7);
    /// let snap = QueueSnapshot::from(&q);
    /// let back = snap.to_queue().unwrap();
    /// assert_eq!(back.next_avail(), 7);
    /// ```
    ///
    /// # Errors
    ///
    /// [`StateError::Queue`]: the sizes or addresses are not a valid queue.
    pub fn to_queue(&self) -> Result<Queue, StateError> {
        let q = Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(StateError::Queue)?;
        Ok(q)
    }
}

/// The transport-independent state ([`crate::TransportCore::save`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreState {
    /// Device status byte.
    pub status: u8,
    /// `DeviceFeaturesSel`.
    pub device_features_select: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_select: u32,
    /// Driver (acked) features.
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_select: u16,
    /// Every queue, with its positions when the device was active.
    pub queues: Vec<QueueSnapshot>,
    /// Configuration generation.
    pub config_generation: u32,
    /// Whether the device was active (`DRIVER_OK` accepted).
    pub activated: bool,
}

/// State of a [`crate::mmio::MmioTransport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    /// The shared core.
    pub core: CoreState,
    /// `InterruptStatus`.
    pub interrupt_status: u32,
}

/// State of a [`crate::pci::VirtioPciTransport`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciTransportState {
    /// The shared core.
    pub core: CoreState,
    /// Configuration space registers (BARs, command, capabilities).
    pub config_space: Vec<u8>,
    /// MSI-X table, PBA and enable bits.
    pub msix: vmkit_devices::pci::MsixState,
    /// `config_msix_vector`.
    pub config_vector: u16,
    /// `queue_msix_vector` of every queue.
    pub queue_vectors: Vec<u16>,
}
