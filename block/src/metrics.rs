//! Device counters, serializable with serde, declared once with vmkit-virtio's `counters!`.
//!
//! Counters are atomics so the device can bump them from `&self` while a VMM thread reads a
//! [`BlockMetrics::snapshot`]. The queue worker tallies a whole pass in a plain
//! [`BlockMetricsSnapshot`] and adds it once ([`BlockMetrics::add`]): an atomic add per counter
//! and request costs more than the rest of the device's bookkeeping on a 4 KiB request.
//!
//! ```
//! let m = vmkit_block::metrics::BlockMetrics::default();
//! let json = serde_json::to_string(&m.snapshot()).unwrap();
//! assert!(json.contains("\"reads\":0"));
//! ```

use crate::request::RequestError;

vmkit_virtio::counters! {
    /// Live counters of one block device.
    pub struct BlockMetrics => BlockMetricsSnapshot {
        /// Completed `VIRTIO_BLK_T_IN` requests.
        reads,
        /// Completed `VIRTIO_BLK_T_OUT` requests.
        writes,
        /// Bytes read from the image.
        read_bytes,
        /// Bytes written to the image.
        write_bytes,
        /// Completed `VIRTIO_BLK_T_FLUSH` requests.
        flushes,
        /// Completed `VIRTIO_BLK_T_GET_ID` requests.
        get_ids,
        /// Completed `VIRTIO_BLK_T_DISCARD` requests.
        discards,
        /// Completed `VIRTIO_BLK_T_WRITE_ZEROES` requests.
        write_zeroes,
        /// Requests rejected with no usable status descriptor (used length 0).
        invalid_chains,
        /// Requests rejected with `VIRTIO_BLK_S_IOERR` by the parser.
        invalid_requests,
        /// Requests answered `VIRTIO_BLK_S_UNSUPP`.
        unsupported_requests,
        /// Requests that failed in the backend (`VIRTIO_BLK_S_IOERR`).
        io_errors,
        /// Times a queue stopped because a rate limiter ran out of tokens.
        throttled_events,
        /// Guest memory accesses that failed while executing (status write, data copy).
        memory_errors,
    }
}

impl BlockMetricsSnapshot {
    /// Count a parser rejection under the counter its status selects.
    pub fn count_rejection(&mut self, error: &RequestError) {
        match error.status() {
            None => self.invalid_chains += 1,
            Some(s) if u32::from(s) == crate::defs::VIRTIO_BLK_S_UNSUPP => {
                self.unsupported_requests += 1
            }
            Some(_) => self.invalid_requests += 1,
        }
    }

    /// Count a completed read of `bytes`.
    #[inline]
    pub(crate) fn count_read(&mut self, bytes: u64) {
        self.reads += 1;
        self.read_bytes += bytes;
    }

    /// Count a completed write of `bytes`.
    #[inline]
    pub(crate) fn count_write(&mut self, bytes: u64) {
        self.writes += 1;
        self.write_bytes += bytes;
    }
}

impl BlockMetrics {
    /// Count a parser rejection under the counter its status selects.
    pub fn count_rejection(&self, error: &RequestError) {
        let mut t = BlockMetricsSnapshot::default();
        t.count_rejection(error);
        self.add(&t);
    }
}
