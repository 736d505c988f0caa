//! Queue processing, apart from event plumbing: pop chains, parse, throttle, execute (through
//! the engine chosen at construction), put them on the used ring.
//!
//! [`QueueWorker`] serves one virtqueue; with `VIRTIO_BLK_F_MQ` the device has one per queue,
//! all sharing one [`BlockShared`] (image, metrics, rate limiter, parser configuration).

use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use crate::defs::*;
use crate::exec::{Outcome, SyncExecutor, finish};
use crate::image::DiskImage;
use crate::metrics::{BlockMetrics, add, inc};
use crate::rate_limiter::RateLimiter;
use crate::request::{ParseConfig, parse_with};
use crate::uring::{Done, OpKind, UringEngine, UringError};
use virtio_queue::desc::split::Descriptor;

/// Which execution engine a device uses; chosen at construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EngineKind {
    /// Every request runs to completion inside the queue notification.
    Sync,
    /// Reads, writes and flushes of raw images go through io_uring and complete later
    /// ([`QueueWorker::complete`]); other requests and formats run synchronously.
    IoUring {
        /// Ring entries (most requests in flight per queue).
        depth: u32,
    },
}

/// What every queue of a device shares.
pub struct BlockShared {
    /// The image.
    pub disk: Mutex<Box<dyn DiskImage>>,
    /// Counters.
    pub metrics: BlockMetrics,
    /// The device's rate limiter.
    pub limiter: Mutex<RateLimiter>,
    /// Capacity, read-only flag and negotiated features for the parser.
    pub parse_cfg: ParseConfig,
}

impl std::fmt::Debug for BlockShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockShared")
            .field("parse_cfg", &self.parse_cfg)
            .finish()
    }
}

/// The result of one pass over a queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Chains returned to the used ring.
    pub completed: u32,
    /// The driver should be interrupted (used ring suppression rules say so).
    pub needs_signal: bool,
    /// The rate limiter stopped the queue; retry after this long.
    pub throttled: Option<Duration>,
}

/// Errors of queue processing (the rings themselves are broken).
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A ring access failed.
    #[error("virtqueue access failed")]
    Queue(#[source] virtio_queue::Error),
    /// The io_uring engine failed.
    #[error("io_uring engine failed")]
    Uring(#[source] UringError),
}

/// Serves one virtqueue.
#[derive(Debug)]
pub struct QueueWorker {
    exec: SyncExecutor,
    uring: Option<UringEngine>,
    scratch: Vec<Descriptor>,
    done: Vec<Done>,
}

impl QueueWorker {
    /// A worker for `disk` using `engine` (io_uring only takes effect for raw images).
    pub fn new(
        engine: EngineKind,
        disk: &dyn DiskImage,
        id: [u8; VIRTIO_BLK_ID_BYTES],
    ) -> Result<Self, WorkerError> {
        let uring = match (engine, disk.raw_fd()) {
            (EngineKind::IoUring { depth }, Some(fd)) => {
                Some(UringEngine::new(fd, depth).map_err(WorkerError::Uring)?)
            }
            _ => None,
        };
        Ok(Self {
            exec: SyncExecutor::new(id),
            uring,
            scratch: Vec::with_capacity(8),
            done: Vec::new(),
        })
    }

    /// The io_uring engine, when the worker uses one (its eventfd signals completions).
    pub fn uring(&self) -> Option<&UringEngine> {
        self.uring.as_ref()
    }

    /// Requests submitted to io_uring and not completed yet.
    pub fn in_flight(&self) -> usize {
        self.uring.as_ref().map_or(0, UringEngine::in_flight)
    }

    /// Take every available chain of `queue` and run or submit it.
    pub fn process<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        shared: &BlockShared,
    ) -> Result<Pass, WorkerError> {
        let qerr = WorkerError::Queue;
        let mut pass = Pass::default();
        let metrics = &shared.metrics;
        'outer: loop {
            queue.disable_notification(mem).map_err(qerr)?;
            let mut popped = 0u32;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                if head >= queue.size() {
                    // No used-ring entry can name this head: drop it, counted.
                    inc(&metrics.invalid_chains);
                    continue;
                }
                let req = match parse_with(chain, &shared.parse_cfg, &mut self.scratch) {
                    Ok(req) => req,
                    Err(rej) => {
                        metrics.count_rejection(&rej.error);
                        let used = match (rej.status_addr, rej.error.status()) {
                            (Some(addr), Some(status)) => {
                                finish(mem, addr, status, 1, metrics).used_len
                            }
                            _ => 0,
                        };
                        queue.add_used(mem, head, used).map_err(qerr)?;
                        pass.completed += 1;
                        continue;
                    }
                };
                if let Ok(mut limiter) = shared.limiter.lock()
                    && limiter.is_active()
                    && !limiter.consume(req.data_len())
                {
                    queue.go_to_previous_position();
                    inc(&metrics.throttled_events);
                    pass.throttled = limiter.retry_after();
                    break 'outer;
                }
                if let Some(uring) = self.uring.as_mut().filter(|_| UringEngine::handles(&req)) {
                    if !uring.has_room() {
                        uring.wait(1).map_err(WorkerError::Uring)?;
                        pass.completed += reap(uring, &mut self.done, queue, mem, metrics)?;
                    }
                    if uring.push(&req, mem).is_err() {
                        inc(&metrics.memory_errors);
                        let out =
                            finish(mem, req.status_addr, VIRTIO_BLK_S_IOERR as u8, 1, metrics);
                        queue.add_used(mem, head, out.used_len).map_err(qerr)?;
                        pass.completed += 1;
                    }
                    continue;
                }
                let Outcome { used_len, .. } = match shared.disk.lock() {
                    Ok(mut disk) => self.exec.execute(&req, mem, &mut **disk, metrics),
                    Err(_) => {
                        inc(&metrics.io_errors);
                        finish(mem, req.status_addr, VIRTIO_BLK_S_IOERR as u8, 1, metrics)
                    }
                };
                queue.add_used(mem, head, used_len).map_err(qerr)?;
                pass.completed += 1;
            }
            if let Some(uring) = self.uring.as_mut() {
                uring.submit().map_err(WorkerError::Uring)?;
            }
            if !queue.enable_notification(mem).map_err(qerr)? {
                break;
            }
            if popped == 0 {
                // More work announced but nothing could be taken: the available index is
                // corrupt (more than a queue ahead). Report it instead of spinning.
                queue.iter(mem).map_err(qerr)?;
                break;
            }
        }
        if let Some(uring) = self.uring.as_mut() {
            uring.submit().map_err(WorkerError::Uring)?;
            pass.completed += reap(uring, &mut self.done, queue, mem, metrics)?;
        }
        if pass.completed > 0 {
            pass.needs_signal = queue.needs_notification(mem).map_err(qerr)?;
        }
        Ok(pass)
    }

    /// Put finished io_uring operations on the used ring (call when the completion eventfd
    /// fires). A no-op for the synchronous engine.
    pub fn complete<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        shared: &BlockShared,
    ) -> Result<Pass, WorkerError> {
        let mut pass = Pass::default();
        if let Some(uring) = self.uring.as_mut() {
            pass.completed = reap(uring, &mut self.done, queue, mem, &shared.metrics)?;
        }
        if pass.completed > 0 {
            pass.needs_signal = queue.needs_notification(mem).map_err(WorkerError::Queue)?;
        }
        Ok(pass)
    }

    /// Wait for every io_uring operation without touching the rings (their results are
    /// dropped): what a reset does after [`QueueWorker::drain`] failed, before the guest memory
    /// may go away.
    pub fn abandon(&mut self) {
        if let Some(uring) = self.uring.as_mut() {
            uring.drain(|_| {});
        }
    }

    /// Block until every io_uring operation finished, and complete them all.
    pub fn drain<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        shared: &BlockShared,
    ) -> Result<Pass, WorkerError> {
        let mut pass = Pass::default();
        while let Some(uring) = self.uring.as_mut().filter(|u| u.in_flight() > 0) {
            uring.wait(1).map_err(WorkerError::Uring)?;
            pass.completed += reap(uring, &mut self.done, queue, mem, &shared.metrics)?;
        }
        if pass.completed > 0 {
            pass.needs_signal = queue.needs_notification(mem).map_err(WorkerError::Queue)?;
        }
        Ok(pass)
    }
}

/// Reap ready io_uring completions onto the used ring.
fn reap<M: GuestMemory>(
    uring: &mut UringEngine,
    done: &mut Vec<Done>,
    queue: &mut Queue,
    mem: &M,
    metrics: &BlockMetrics,
) -> Result<u32, WorkerError> {
    done.clear();
    uring.reap(|d| done.push(d));
    let mut n = 0;
    for d in done.drain(..) {
        let (status, used) = if d.ok {
            match d.kind {
                OpKind::Read => {
                    inc(&metrics.reads);
                    add(&metrics.read_bytes, d.bytes);
                    (VIRTIO_BLK_S_OK, (d.bytes as u32).saturating_add(1))
                }
                OpKind::Write => {
                    inc(&metrics.writes);
                    add(&metrics.write_bytes, d.bytes);
                    (VIRTIO_BLK_S_OK, 1)
                }
                OpKind::Flush => {
                    inc(&metrics.flushes);
                    (VIRTIO_BLK_S_OK, 1)
                }
            }
        } else {
            inc(&metrics.io_errors);
            (VIRTIO_BLK_S_IOERR, 1)
        };
        let out = finish(mem, d.status_addr, status as u8, used, metrics);
        queue
            .add_used(mem, d.head_index, out.used_len)
            .map_err(WorkerError::Queue)?;
        n += 1;
    }
    Ok(n)
}
