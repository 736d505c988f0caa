//! Queue processing, apart from event plumbing: pop chains, parse, throttle, execute (through
//! the engine chosen at construction), put them on the used ring.
//!
//! [`QueueWorker`] serves one virtqueue; with `VIRTIO_BLK_F_MQ` the device has one per queue,
//! all sharing one [`BlockShared`] (image, metrics, rate limiter, parser configuration).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;
use vmkit_virtio::memory::CachedMemory;

use crate::defs::*;
use crate::exec::{Outcome, SyncExecutor, finish};
use crate::image::DiskImage;
use crate::metrics::{BlockMetrics, BlockMetricsSnapshot};
use crate::rate_limiter::RateLimiter;
use crate::request::{DataSegment, ParseConfig, parse_reusing};
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
    /// io_uring when the kernel completes cached reads of the raw image inline
    /// ([`crate::uring::completes_reads_inline`]), otherwise synchronous: on a file without
    /// `RWF_NOWAIT` support (tmpfs on many kernels) io_uring hands every request to a kernel
    /// worker thread, which is slower than running it in place.
    Auto {
        /// Ring entries when io_uring is chosen.
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
    /// Data segments of the last finished request, reused by the next one.
    spare: Vec<DataSegment>,
    done: Vec<Done>,
    /// Single-buffer reads and writes take [`crate::fast`] (see [`QueueWorker::with_fast_path`]).
    fast_path: bool,
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
            (EngineKind::Auto { depth }, Some(fd)) if crate::uring::completes_reads_inline(fd) => {
                Some(UringEngine::new(fd, depth).map_err(WorkerError::Uring)?)
            }
            _ => None,
        };
        Ok(Self {
            exec: SyncExecutor::new(id),
            uring,
            scratch: Vec::with_capacity(8),
            spare: Vec::with_capacity(8),
            done: Vec::new(),
            fast_path: true,
        })
    }

    /// Turn the fast path for single-buffer reads and writes on (the default) or off.
    ///
    /// With the synchronous engine and no active rate limiter, a read or write whose data is
    /// one buffer (what drivers send for 4 KiB requests) is checked and run in one pass, with a
    /// `pread`/`pwrite` on a raw image's file descriptor: a quarter fewer instructions, on
    /// 40 % less code, than parsing it into a [`crate::request::Request`] and executing that
    /// (the code matters most: it runs cold after each system call). Every other chain, and
    /// every chain the parser would reject, takes the general path. Results — status byte,
    /// used length, guest memory and its dirty pages, image contents, metrics — are the same
    /// either way (the differential tests and the `blk_request` fuzz target compare them);
    /// off is for such comparisons and for debugging.
    pub fn with_fast_path(mut self, on: bool) -> Self {
        self.fast_path = on;
        self
    }

    /// The engine this worker runs: [`EngineKind::Sync`] or [`EngineKind::IoUring`] (what
    /// [`EngineKind::Auto`] chose, and `Sync` for images io_uring does not serve).
    pub fn engine(&self) -> EngineKind {
        match &self.uring {
            Some(u) => EngineKind::IoUring { depth: u.depth() },
            None => EngineKind::Sync,
        }
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
    ///
    /// Plain (non-IOMMU) memory is accessed through a [`CachedMemory`] view for the whole pass.
    pub fn process<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        shared: &BlockShared,
    ) -> Result<Pass, WorkerError> {
        match mem.physical_memory() {
            Some(pm) => self.process_in(queue, &CachedMemory::new(pm), shared),
            None => self.process_in(queue, mem, shared),
        }
    }

    fn process_in<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        shared: &BlockShared,
    ) -> Result<Pass, WorkerError> {
        // Counts of the whole pass are added to the shared metrics once, even on error.
        let mut tally = BlockMetricsSnapshot::default();
        let r = self.pass(queue, mem, shared, &mut tally);
        shared.metrics.add(&tally);
        r
    }

    fn pass<M: GuestMemory>(
        &mut self,
        queue: &mut Queue,
        mem: &M,
        shared: &BlockShared,
        tally: &mut BlockMetricsSnapshot,
    ) -> Result<Pass, WorkerError> {
        let qerr = WorkerError::Queue;
        let mut pass = Pass::default();
        // Locked instructions cost more than the rest of a request's bookkeeping, so the
        // limiter is asked once per pass whether it limits at all, and the image lock, once
        // taken, is held until the pass ends (other queues of the device wait at most one pass).
        let limited = shared.limiter.lock().is_ok_and(|l| l.is_active());
        let mut disk: Option<MutexGuard<'_, Box<dyn DiskImage>>> = None;
        // The fast path ([`crate::fast`]) serves single-buffer reads and writes when neither
        // io_uring nor the rate limiter takes part.
        let fast = self.fast_path && self.uring.is_none() && !limited;
        if fast {
            disk = shared.disk.lock().ok();
        }
        let raw_fd = disk.as_ref().and_then(|d| d.raw_fd());
        'outer: loop {
            queue.disable_notification(mem).map_err(qerr)?;
            let mut popped = 0u32;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped += 1;
                let head = chain.head_index();
                // vmkit-virtio's one corrupt-ring policy: a head no used entry can name makes
                // the transport set DEVICE_NEEDS_RESET (and count it), as for every device.
                vmkit_virtio::queue_pass::check_head(queue, head).map_err(qerr)?;
                if fast
                    && let Some(d) = disk.as_mut()
                    && let Some(used) = crate::fast::try_read_write(
                        &chain,
                        mem,
                        &shared.parse_cfg,
                        &mut ***d,
                        raw_fd,
                        tally,
                    )
                {
                    queue.add_used(mem, head, used).map_err(qerr)?;
                    pass.completed += 1;
                    continue;
                }
                let spare = std::mem::take(&mut self.spare);
                let req = match parse_reusing(chain, &shared.parse_cfg, &mut self.scratch, spare) {
                    Ok(req) => req,
                    Err(rej) => {
                        tally.count_rejection(&rej.error);
                        let used = match (rej.status_addr, rej.error.status()) {
                            (Some(addr), Some(status)) => {
                                finish(mem, addr, status, 1, tally).used_len
                            }
                            _ => 0,
                        };
                        queue.add_used(mem, head, used).map_err(qerr)?;
                        pass.completed += 1;
                        continue;
                    }
                };
                if limited
                    && let Ok(mut limiter) = shared.limiter.lock()
                    && limiter.is_active()
                    && !limiter.consume(req.data_len())
                {
                    queue.go_to_previous_position();
                    tally.throttled_events += 1;
                    pass.throttled = limiter.retry_after();
                    break 'outer;
                }
                if let Some(uring) = self.uring.as_mut().filter(|_| UringEngine::handles(&req)) {
                    if !uring.has_room() {
                        // Do not hold the image lock while blocking on the kernel.
                        disk = None;
                        uring.wait(1).map_err(WorkerError::Uring)?;
                        pass.completed += reap(uring, &mut self.done, queue, mem, tally)?;
                    }
                    if uring.push(&req, mem).is_err() {
                        tally.memory_errors += 1;
                        let out = finish(mem, req.status_addr, VIRTIO_BLK_S_IOERR as u8, 1, tally);
                        queue.add_used(mem, head, out.used_len).map_err(qerr)?;
                        pass.completed += 1;
                    }
                    self.recycle(req);
                    continue;
                }
                if disk.is_none() {
                    disk = shared.disk.lock().ok();
                }
                let Outcome { used_len, .. } = match disk.as_mut() {
                    Some(d) => self.exec.execute_tallied(&req, mem, &mut ***d, tally),
                    None => {
                        // Poisoned: a thread panicked inside an image operation.
                        tally.io_errors += 1;
                        finish(mem, req.status_addr, VIRTIO_BLK_S_IOERR as u8, 1, tally)
                    }
                };
                self.recycle(req);
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
        drop(disk);
        if let Some(uring) = self.uring.as_mut() {
            uring.submit().map_err(WorkerError::Uring)?;
            pass.completed += reap(uring, &mut self.done, queue, mem, tally)?;
        }
        if pass.completed > 0 {
            pass.needs_signal = queue.needs_notification(mem).map_err(qerr)?;
        }
        Ok(pass)
    }

    /// Keep a finished request's segment vector for the next parse.
    #[inline]
    fn recycle(&mut self, req: crate::request::Request) {
        if let Some(v) = req.into_segments() {
            self.spare = v;
        }
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
            uring.acknowledge();
            pass.completed = reap_counted(uring, &mut self.done, queue, mem, &shared.metrics)?;
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
            let all = uring.in_flight();
            uring.wait(all).map_err(WorkerError::Uring)?;
            pass.completed += reap_counted(uring, &mut self.done, queue, mem, &shared.metrics)?;
        }
        if pass.completed > 0 {
            pass.needs_signal = queue.needs_notification(mem).map_err(WorkerError::Queue)?;
        }
        Ok(pass)
    }
}

/// [`reap`], adding its counts to `metrics`.
fn reap_counted<M: GuestMemory>(
    uring: &mut UringEngine,
    done: &mut Vec<Done>,
    queue: &mut Queue,
    mem: &M,
    metrics: &BlockMetrics,
) -> Result<u32, WorkerError> {
    let mut tally = BlockMetricsSnapshot::default();
    let r = reap(uring, done, queue, mem, &mut tally);
    metrics.add(&tally);
    r
}

/// Reap ready io_uring completions onto the used ring.
fn reap<M: GuestMemory>(
    uring: &mut UringEngine,
    done: &mut Vec<Done>,
    queue: &mut Queue,
    mem: &M,
    metrics: &mut BlockMetricsSnapshot,
) -> Result<u32, WorkerError> {
    done.clear();
    uring.reap(|d| done.push(d));
    let mut n = 0;
    for d in done.drain(..) {
        let (status, used) = if d.ok {
            match d.kind {
                OpKind::Read => {
                    metrics.count_read(d.bytes);
                    (VIRTIO_BLK_S_OK, (d.bytes as u32).saturating_add(1))
                }
                OpKind::Write => {
                    metrics.count_write(d.bytes);
                    (VIRTIO_BLK_S_OK, 1)
                }
                OpKind::Flush => {
                    metrics.flushes += 1;
                    (VIRTIO_BLK_S_OK, 1)
                }
            }
        } else {
            metrics.io_errors += 1;
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
