//! Device counters, serializable with serde.
//!
//! Counters are atomics so the device can bump them from `&self` while a VMM thread reads a
//! [`BlockMetrics::snapshot`].

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::request::RequestError;

/// Live counters of one block device.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Completed `VIRTIO_BLK_T_IN` requests.
    pub reads: AtomicU64,
    /// Completed `VIRTIO_BLK_T_OUT` requests.
    pub writes: AtomicU64,
    /// Bytes read from the image.
    pub read_bytes: AtomicU64,
    /// Bytes written to the image.
    pub write_bytes: AtomicU64,
    /// Completed `VIRTIO_BLK_T_FLUSH` requests.
    pub flushes: AtomicU64,
    /// Completed `VIRTIO_BLK_T_GET_ID` requests.
    pub get_ids: AtomicU64,
    /// Completed `VIRTIO_BLK_T_DISCARD` requests.
    pub discards: AtomicU64,
    /// Completed `VIRTIO_BLK_T_WRITE_ZEROES` requests.
    pub write_zeroes: AtomicU64,
    /// Requests rejected with no usable status descriptor (used length 0).
    pub invalid_chains: AtomicU64,
    /// Requests rejected with `VIRTIO_BLK_S_IOERR` by the parser.
    pub invalid_requests: AtomicU64,
    /// Requests answered `VIRTIO_BLK_S_UNSUPP`.
    pub unsupported_requests: AtomicU64,
    /// Requests that failed in the backend (`VIRTIO_BLK_S_IOERR`).
    pub io_errors: AtomicU64,
    /// Times a queue stopped because a rate limiter ran out of tokens.
    pub throttled_events: AtomicU64,
    /// Guest memory accesses that failed while executing (status write, data copy).
    pub memory_errors: AtomicU64,
}

/// A plain copy of [`BlockMetrics`] for serialization.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMetricsSnapshot {
    /// See [`BlockMetrics::reads`].
    pub reads: u64,
    /// See [`BlockMetrics::writes`].
    pub writes: u64,
    /// See [`BlockMetrics::read_bytes`].
    pub read_bytes: u64,
    /// See [`BlockMetrics::write_bytes`].
    pub write_bytes: u64,
    /// See [`BlockMetrics::flushes`].
    pub flushes: u64,
    /// See [`BlockMetrics::get_ids`].
    pub get_ids: u64,
    /// See [`BlockMetrics::discards`].
    pub discards: u64,
    /// See [`BlockMetrics::write_zeroes`].
    pub write_zeroes: u64,
    /// See [`BlockMetrics::invalid_chains`].
    pub invalid_chains: u64,
    /// See [`BlockMetrics::invalid_requests`].
    pub invalid_requests: u64,
    /// See [`BlockMetrics::unsupported_requests`].
    pub unsupported_requests: u64,
    /// See [`BlockMetrics::io_errors`].
    pub io_errors: u64,
    /// See [`BlockMetrics::throttled_events`].
    pub throttled_events: u64,
    /// See [`BlockMetrics::memory_errors`].
    pub memory_errors: u64,
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

    /// Add counts tallied elsewhere. The queue worker tallies a whole pass in a plain
    /// [`BlockMetricsSnapshot`] and adds it once: an atomic add per counter and request costs
    /// more than the rest of the device's bookkeeping on a 4 KiB request.
    pub fn add(&self, d: &BlockMetricsSnapshot) {
        let pairs = [
            (&self.reads, d.reads),
            (&self.writes, d.writes),
            (&self.read_bytes, d.read_bytes),
            (&self.write_bytes, d.write_bytes),
            (&self.flushes, d.flushes),
            (&self.get_ids, d.get_ids),
            (&self.discards, d.discards),
            (&self.write_zeroes, d.write_zeroes),
            (&self.invalid_chains, d.invalid_chains),
            (&self.invalid_requests, d.invalid_requests),
            (&self.unsupported_requests, d.unsupported_requests),
            (&self.io_errors, d.io_errors),
            (&self.throttled_events, d.throttled_events),
            (&self.memory_errors, d.memory_errors),
        ];
        for (c, n) in pairs {
            if n != 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Copy every counter.
    ///
    /// ```
    /// let m = vmkit_block::metrics::BlockMetrics::default();
    /// let json = serde_json::to_string(&m.snapshot()).unwrap();
    /// assert!(json.contains("\"reads\":0"));
    /// ```
    pub fn snapshot(&self) -> BlockMetricsSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BlockMetricsSnapshot {
            reads: g(&self.reads),
            writes: g(&self.writes),
            read_bytes: g(&self.read_bytes),
            write_bytes: g(&self.write_bytes),
            flushes: g(&self.flushes),
            get_ids: g(&self.get_ids),
            discards: g(&self.discards),
            write_zeroes: g(&self.write_zeroes),
            invalid_chains: g(&self.invalid_chains),
            invalid_requests: g(&self.invalid_requests),
            unsupported_requests: g(&self.unsupported_requests),
            io_errors: g(&self.io_errors),
            throttled_events: g(&self.throttled_events),
            memory_errors: g(&self.memory_errors),
        }
    }
}
