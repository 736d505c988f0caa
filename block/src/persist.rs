//! Serde state of a block device for snapshot/restore.
//!
//! The image itself is not part of the state: the VMM snapshots or keeps the image file and
//! reopens it on restore. In-flight io_uring requests are completed before a state is taken.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use crate::config::BlockConfig;
use crate::metrics::BlockMetricsSnapshot;

/// Errors restoring a state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// A saved queue is not a valid queue.
    #[error("invalid saved queue")]
    Queue(#[source] virtio_queue::Error),
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
    /// use vmkit_block::persist::QueueSnapshot;
    /// let mut q = Queue::new(64).unwrap();
    /// q.set_next_avail(7);
    /// let snap = QueueSnapshot::from(&q);
    /// let back = snap.to_queue().unwrap();
    /// assert_eq!(back.next_avail(), 7);
    /// ```
    pub fn to_queue(&self) -> Result<Queue, PersistError> {
        Queue::try_from(QueueState {
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
        .map_err(PersistError::Queue)
    }
}

/// Everything needed to bring a block device back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// How the device was built.
    pub config: BlockConfig,
    /// Features the driver accepted (0 before activation).
    pub acked_features: u64,
    /// Queues, when the device was active.
    pub queues: Vec<QueueSnapshot>,
    /// Counters at the time of the snapshot.
    pub metrics: BlockMetricsSnapshot,
}
