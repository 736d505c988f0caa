//! The virtio-blk device: [`Block`] implements `vmkit_virtio::VirtioDevice`.
//!
//! Queue notifications run [`QueueWorker::process`] on the notified queue. The device declares
//! its own events (`VirtioDevice::event_sources`), which vmkit-virtio's `NotifyWorker` serves by
//! itself: with the io_uring engine each queue's completion eventfd wakes the queue, whose pass
//! also completes what finished; when the rate limiter stops a queue, the queue's retry timer
//! (`Activation::retry_after`, armed for [`Block::throttled_for`]) runs it again — no driver
//! notification and no VMM code needed. [`Block::completion_fds`],
//! [`Block::process_completions`] and [`Block::retry_throttled`] remain for VMMs with their own
//! event loop.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

use vm_memory::{GuestMemory, GuestMemoryMmap};
use vmkit_virtio::events::{EventAction, EventSource};
use vmkit_virtio::{Activation, DeviceError, InterruptCause, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

use crate::config::BlockConfig;
use crate::defs::*;
use crate::image::DiskImage;
use crate::metrics::{BlockMetrics, BlockMetricsSnapshot};
use crate::persist::{BlockState, QueueSnapshot};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use crate::worker::{BlockShared, Pass, QueueWorker, WorkerError};

/// Errors building a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The configuration is unusable.
    #[error("invalid block device configuration: {0}")]
    Config(&'static str),
    /// Creating an execution engine failed.
    #[error("engine setup failed")]
    Engine(#[source] WorkerError),
}

/// A virtio-blk device over a [`DiskImage`].
///
/// ```
/// use vmkit_block::{Block, config::BlockConfig, image::RawImage};
/// use vmkit_block::defs::*;
/// use vmkit_virtio::test_utils::{Desc, DriverHarness};
///
/// let dir = tempfile::tempdir().unwrap();
/// let img = RawImage::create(&dir.path().join("d.raw"), 1 << 20).unwrap();
/// let mut h = DriverHarness::new(Block::new(Box::new(img), BlockConfig::default()).unwrap());
/// h.activate(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH).unwrap();
///
/// // OUT: header (type, reserved, sector), 512 bytes of data, status.
/// let mut hdr = VIRTIO_BLK_T_OUT.to_le_bytes().to_vec();
/// hdr.extend_from_slice(&[0; 4]);
/// hdr.extend_from_slice(&2u64.to_le_bytes());
/// let c = h
///     .add_chain(0, &[Desc::Readable(hdr), Desc::Readable(vec![7; 512]), Desc::Writable(1)])
///     .unwrap();
/// h.kick(0);
/// assert_eq!(h.used(0), [(c.head, 1)]);
/// assert_eq!(h.read_buffer(&c.buffers[2]), [VIRTIO_BLK_S_OK as u8]);
/// assert_eq!(h.device().metrics().writes, 1);
/// ```
pub struct Block<M = GuestMemoryMmap> {
    config: BlockConfig,
    features: u64,
    config_space: [u8; VIRTIO_BLK_CONFIG_SIZE],
    queue_sizes: Vec<u16>,
    capacity: u64,
    image_read_only: bool,
    shared: BlockShared,
    workers: Vec<QueueWorker>,
    active: Option<Activation<M>>,
    throttled: Option<Duration>,
}

impl<M> std::fmt::Debug for Block<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("config", &self.config)
            .field("capacity", &self.capacity)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl<M> Block<M> {
    /// A device serving `disk` as configured.
    pub fn new(disk: Box<dyn DiskImage>, config: BlockConfig) -> Result<Self, BlockError> {
        if config.num_queues == 0 {
            return Err(BlockError::Config("num_queues must be at least 1"));
        }
        if config.queue_size == 0 || !config.queue_size.is_power_of_two() {
            return Err(BlockError::Config("queue_size must be a power of two"));
        }
        let image_read_only = disk.read_only();
        let capacity = disk.size() >> SECTOR_SHIFT;
        let mut workers = Vec::with_capacity(config.num_queues as usize);
        for _ in 0..config.num_queues {
            workers.push(
                QueueWorker::new(config.engine, &*disk, config.id_bytes())
                    .map_err(BlockError::Engine)?,
            );
        }
        Ok(Self {
            features: config.features(image_read_only),
            config_space: config.config_space(capacity),
            queue_sizes: vec![config.queue_size; config.num_queues as usize],
            capacity,
            image_read_only,
            shared: BlockShared {
                parse_cfg: config.parse_config(capacity, 0, image_read_only),
                disk: Mutex::new(disk),
                metrics: BlockMetrics::default(),
                limiter: Mutex::new(RateLimiter::new(config.rate_limiter)),
            },
            workers,
            active: None,
            throttled: None,
            config,
        })
    }

    /// A device rebuilt from a saved state over the (reopened) image: same configuration,
    /// features and configuration space. The transport restores the queues from
    /// `state.queues` ([`QueueSnapshot::to_queue`]) and activates the device with
    /// `state.acked_features`; counters restart from zero.
    pub fn from_state(disk: Box<dyn DiskImage>, state: &BlockState) -> Result<Self, BlockError> {
        Self::new(disk, state.config.clone())
    }

    /// Counters.
    pub fn metrics(&self) -> BlockMetricsSnapshot {
        self.shared.metrics.snapshot()
    }

    /// Disk capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// `(queue, eventfd)` for every queue using io_uring: readable when completions wait.
    pub fn completion_fds(&self) -> Vec<(u16, RawFd)> {
        self.completion_eventfd_refs()
            .map(|(i, fd)| (i, fd.as_raw_fd()))
            .collect()
    }

    /// Duplicates of the completion eventfds of [`Block::completion_fds`], owned by the caller:
    /// what vmkit-virtio's `NotifyWorker::spawn_with_wakeups` takes, so the thread that serves
    /// the queue's doorbell also completes its io_uring requests (a notification's pass over
    /// the queue reaps finished requests as well as submitting new ones). Empty with the
    /// synchronous engine.
    pub fn completion_eventfds(&self) -> std::io::Result<Vec<(u16, EventFd)>> {
        self.completion_eventfd_refs()
            .map(|(i, fd)| Ok((i, fd.try_clone()?)))
            .collect()
    }

    /// `(queue, completion eventfd)` of every queue using io_uring.
    fn completion_eventfd_refs(&self) -> impl Iterator<Item = (u16, &EventFd)> {
        self.workers
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.uring().map(|u| (i as u16, u.completion_fd())))
    }

    /// How long until a throttled queue can go on (None: not throttled).
    pub fn throttled_for(&self) -> Option<Duration> {
        self.throttled
    }

    /// The device's image (locked).
    pub fn disk(&self) -> std::sync::MutexGuard<'_, Box<dyn DiskImage>> {
        self.shared
            .disk
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn worker_err(index: u16, e: WorkerError) -> DeviceError {
    match e {
        WorkerError::Queue(source) => DeviceError::Queue { index, source },
        // The whole error, not its text: the transport keeps it with its `source()` chain.
        e @ WorkerError::Uring(_) => DeviceError::Backend(Box::new(e)),
    }
}

impl<M: GuestMemory> Block<M> {
    fn signal(&self, index: u16, pass: Pass) -> Result<(), DeviceError> {
        if let (true, Some(a)) = (pass.needs_signal, self.active.as_ref()) {
            a.interrupt
                .signal(InterruptCause::Queue(index))
                .map_err(DeviceError::Interrupt)?;
        }
        Ok(())
    }

    fn run_queue(&mut self, index: u16, completions_only: bool) -> Result<(), DeviceError> {
        let (Some(a), Some(w)) = (self.active.as_mut(), self.workers.get_mut(index as usize))
        else {
            return Ok(());
        };
        let Some(q) = a.queues.get_mut(index as usize) else {
            return Ok(());
        };
        if !virtio_queue::QueueT::ready(q) {
            return Ok(());
        }
        let pass = if completions_only {
            w.complete(q, &a.mem, &self.shared)
        } else {
            w.process(q, &a.mem, &self.shared)
        }
        .map_err(|e| worker_err(index, e))?;
        if !completions_only {
            self.throttled = pass.throttled;
            if let Some(after) = pass.throttled {
                // The queue's retry timer (a declared event source) runs it again: a throttled
                // queue resumes without a driver notification.
                a.retry_after(index, after)?;
            }
        }
        self.signal(index, pass)
    }

    /// Put finished io_uring requests of queue `index` on its used ring.
    pub fn process_completions(&mut self, index: u16) -> Result<(), DeviceError> {
        self.run_queue(index, true)
    }

    /// Replace the rate limiter while the device runs (as a VMM's "update drive" call does):
    /// the new buckets start full, the configuration [`Block::save`] records changes too, and
    /// a queue the old limiter had stopped is served again at once.
    pub fn update_rate_limiter(&mut self, cfg: RateLimiterConfig) -> Result<(), DeviceError> {
        *self
            .shared
            .limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = RateLimiter::new(cfg);
        self.config.rate_limiter = cfg;
        if self.throttled.take().is_some() {
            self.retry_throttled()?;
        }
        Ok(())
    }

    /// Serve every queue again (after [`Block::throttled_for`] elapsed).
    pub fn retry_throttled(&mut self) -> Result<(), DeviceError> {
        for i in 0..self.queue_sizes.len() as u16 {
            self.run_queue(i, false)?;
        }
        Ok(())
    }

    /// Complete every in-flight request (before reset, snapshot or drop).
    pub fn drain(&mut self) -> Result<(), DeviceError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        for (i, (w, q)) in self.workers.iter_mut().zip(a.queues.iter_mut()).enumerate() {
            let pass = w
                .drain(q, &a.mem, &self.shared)
                .map_err(|e| worker_err(i as u16, e))?;
            if pass.needs_signal {
                a.interrupt
                    .signal(InterruptCause::Queue(i as u16))
                    .map_err(DeviceError::Interrupt)?;
            }
        }
        Ok(())
    }

    /// Drain, then capture the device state.
    pub fn save(&mut self) -> Result<BlockState, DeviceError> {
        self.drain()?;
        let (acked_features, queues) = match &self.active {
            Some(a) => (
                a.acked_features,
                a.queues.iter().map(QueueSnapshot::from).collect(),
            ),
            None => (0, Vec::new()),
        };
        Ok(BlockState {
            config: self.config.clone(),
            acked_features,
            queues,
            metrics: self.metrics(),
        })
    }
}

impl<M> Drop for Block<M> {
    fn drop(&mut self) {
        // QueueWorker's io_uring engine waits for its in-flight operations when dropped, before
        // the activation (and with it the guest memory handle) goes away.
        self.workers.clear();
    }
}

impl<M: GuestMemory + Send> VirtioDevice<M> for Block<M> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn config_space(&self) -> &[u8] {
        &self.config_space
    }

    fn activate(&mut self, activation: Activation<M>) -> Result<(), DeviceError> {
        self.shared.parse_cfg = self.config.parse_config(
            self.capacity,
            activation.acked_features,
            self.image_read_only,
        );
        self.active = Some(activation);
        Ok(())
    }

    fn queue_notify(&mut self, queue: u16) -> Result<(), DeviceError> {
        self.run_queue(queue, false)
    }

    /// Each io_uring queue's completion eventfd wakes its queue: the pass reaps what finished.
    /// (The retry timers of throttled queues are declared by the transport.)
    fn event_sources(&self) -> Vec<EventSource> {
        self.completion_eventfd_refs()
            .filter_map(|(i, fd)| EventSource::counter(fd, EventAction::Queue(i)).ok())
            .collect()
    }

    fn reset(&mut self) {
        if self.drain().is_err() {
            // The rings are broken: still wait for the kernel before the memory may go.
            self.workers.iter_mut().for_each(QueueWorker::abandon);
        }
        self.active = None;
        self.throttled = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uring::UringError;
    use std::error::Error as _;

    /// An io_uring failure reaches the transport as a `Backend` error whose `source()` chain
    /// ends at the kernel's errno (it used to be flattened to a string).
    #[test]
    fn engine_errors_keep_their_source() {
        let os = std::io::Error::from_raw_os_error(libc::EIO);
        let e = worker_err(3, WorkerError::Uring(UringError::Ring(os)));
        assert!(matches!(e, DeviceError::Backend(_)));
        let worker = e.source().unwrap().downcast_ref::<WorkerError>().unwrap();
        assert!(matches!(worker, WorkerError::Uring(_)));
        let io = worker
            .source()
            .and_then(|u| u.source())
            .and_then(|i| i.downcast_ref::<std::io::Error>())
            .unwrap();
        assert_eq!(io.raw_os_error(), Some(libc::EIO));
    }
}
