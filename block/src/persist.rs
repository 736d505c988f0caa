//! Serde state of a block device for snapshot/restore.
//!
//! The image itself is not part of the state: the VMM snapshots or keeps the image file and
//! reopens it on restore. In-flight io_uring requests are completed before a state is taken.

use serde::{Deserialize, Serialize};

use crate::config::BlockConfig;
use crate::metrics::BlockMetricsSnapshot;

/// The queue snapshot and its restore error live in vmkit-virtio (shared by every device and
/// by the transports' state); re-exported here under their old names.
pub use vmkit_virtio::persist::{QueueSnapshot, StateError as PersistError};

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
