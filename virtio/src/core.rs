//! The transport-independent part of every virtio transport: feature negotiation, the
//! device-status state machine (virtio 1.2 §2.1, §3.1.1) and queue configuration. Written
//! once; virtio-mmio and virtio-pci only decode their registers into calls on [`TransportCore`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::device::{Activation, DeviceError, InterruptCause, VirtioDevice, VirtioInterrupt};
use crate::events::{DeviceEvents, RetryTimer};
use crate::memory::VirtioMemory;
use crate::persist::{CoreState, QueueSnapshot, StateError};
use crate::queue_server::{QueueServers, ServeOutcome};
use crate::spec::*;

/// Counters of driver mistakes and device events; every ignored guest action is counted here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportMetrics {
    /// Status writes that clear bits, skip a step or set device-only bits (ignored).
    pub illegal_status_writes: u64,
    /// `FEATURES_OK` refused: unoffered features or no `VIRTIO_F_VERSION_1`.
    pub features_refused: u64,
    /// Driver-feature writes outside the negotiation window (ignored).
    pub late_feature_writes: u64,
    /// Queue writes outside the configuration window or to a missing queue (ignored).
    pub bad_queue_writes: u64,
    /// Queue sizes refused (zero, not a power of two, or above the maximum).
    pub queue_size_refused: u64,
    /// Ring addresses refused (misaligned).
    pub queue_address_refused: u64,
    /// Notifications before `DRIVER_OK` or for a missing queue (ignored).
    pub bad_notifies: u64,
    /// Notifications delivered to the device.
    pub notifies: u64,
    /// Doorbell writes that trapped to the transport (the plain-exit path; with ioeventfds
    /// registered this stays 0).
    pub trapped_notifies: u64,
    /// Register accesses with a bad offset or width (ignored, reads return 0).
    pub bad_register_accesses: u64,
    /// Activations that failed (→ `DEVICE_NEEDS_RESET`).
    pub activation_failures: u64,
    /// Device errors after activation (→ `DEVICE_NEEDS_RESET`).
    pub device_errors: u64,
    /// Resets by the driver.
    pub resets: u64,
}

/// Wraps the transport's interrupt: a configuration-change signal bumps the generation first.
struct CountingInterrupt {
    inner: Arc<dyn VirtioInterrupt>,
    generation: Arc<AtomicU32>,
}

impl VirtioInterrupt for CountingInterrupt {
    fn signal(&self, cause: InterruptCause) -> std::io::Result<()> {
        if cause == InterruptCause::Config {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        self.inner.signal(cause)
    }
    fn notifier(&self, cause: InterruptCause) -> Option<&vmm_sys_util::eventfd::EventFd> {
        self.inner.notifier(cause)
    }
}

/// Device status, negotiated features and queue configuration of one virtio device, plus the
/// device itself. Transports decode guest register accesses into these calls.
///
/// ```
/// use std::sync::Arc;
/// use vmkit_virtio::{TransportCore, rng::Rng, spec::*};
/// # struct NoIrq;
/// # impl vmkit_virtio::VirtioInterrupt for NoIrq {
/// #     fn signal(&self, _: vmkit_virtio::InterruptCause) -> std::io::Result<()> { Ok(()) }
/// # }
/// let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
/// let mut core = TransportCore::new(Rng::default(), mem, Arc::new(NoIrq));
/// core.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE as u8 | VIRTIO_CONFIG_S_DRIVER as u8);
/// core.set_driver_features_select(1);
/// core.write_driver_features(1 << (VIRTIO_F_VERSION_1 - 32));
/// core.set_status(core.status() | VIRTIO_CONFIG_S_FEATURES_OK as u8);
/// assert!(core.status() & VIRTIO_CONFIG_S_FEATURES_OK as u8 != 0);
/// // Not a power of two: refused, counted.
/// core.set_queue_size(100);
/// assert_eq!(core.metrics().queue_size_refused, 1);
/// ```
pub struct TransportCore<D, M = GuestMemoryMmap> {
    device: D,
    mem: M,
    interrupt: Arc<dyn VirtioInterrupt>,
    status: u8,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    unknown_features: bool,
    queue_select: u16,
    queues: Vec<Queue>,
    activated: bool,
    generation: Arc<AtomicU32>,
    metrics: TransportMetrics,
    last_error: Option<DeviceError>,
    corrupt_rings: u64,
    events: Option<Arc<DeviceEvents>>,
    servers: Arc<QueueServers>,
}

impl<D, M> TransportCore<D, M>
where
    D: VirtioDevice<M>,
    M: VirtioMemory,
{
    /// A core for `device`, whose queues live in `mem`, signalling through `interrupt`.
    pub fn new(device: D, mem: M, interrupt: Arc<dyn VirtioInterrupt>) -> Self {
        let queues = Self::fresh_queues(&device);
        let servers = Arc::new(QueueServers::new(queues.len()));
        Self {
            servers,
            device,
            mem,
            interrupt,
            status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            unknown_features: false,
            queue_select: 0,
            queues,
            activated: false,
            generation: Arc::new(AtomicU32::new(0)),
            metrics: TransportMetrics::default(),
            last_error: None,
            corrupt_rings: 0,
            // Without an eventfd (fd limit) there are no device events: kicks still work.
            events: DeviceEvents::new().ok().map(Arc::new),
        }
    }

    fn fresh_queues(device: &D) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            // A max size the queue crate refuses (0, not a power of two) becomes an unusable
            // queue of max size 1 that a driver can never make ready with a bigger size.
            .map(|&max| {
                Queue::new(max)
                    .or_else(|_| Queue::new(1))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutably (e.g. to change its configuration, then [`Self::config_changed`]).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Guest memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// Counters.
    pub fn metrics(&self) -> TransportMetrics {
        let mut m = self.metrics;
        m.notifies += self.servers.notifies();
        m
    }

    /// Count a register access the transport could not decode.
    pub fn count_bad_access(&mut self) {
        self.metrics.bad_register_accesses += 1;
    }

    /// Device status byte.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// Whether the device has been activated (`DRIVER_OK` accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Configuration generation (virtio 1.2 §2.5.1): changes whenever the device changes its
    /// configuration, so a driver can detect torn multi-field reads.
    pub fn config_generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    /// The device changed its configuration: bump the generation and notify the driver.
    pub fn config_changed(&mut self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if self.interrupt.signal(InterruptCause::Config).is_err() {
            self.metrics.device_errors += 1;
        }
    }

    /// Device feature bits selected by the last [`Self::set_device_features_select`].
    pub fn device_features(&self) -> u32 {
        match self.device_features_select {
            0 => self.device.device_features() as u32,
            1 => (self.device.device_features() >> 32) as u32,
            _ => 0,
        }
    }

    /// `DeviceFeaturesSel` as last written.
    pub fn device_features_select(&self) -> u32 {
        self.device_features_select
    }

    /// `DriverFeaturesSel` as last written.
    pub fn driver_features_select(&self) -> u32 {
        self.driver_features_select
    }

    /// Select which 32 device feature bits [`Self::device_features`] returns.
    pub fn set_device_features_select(&mut self, select: u32) {
        self.device_features_select = select;
    }

    /// Driver feature bits selected by `DriverFeaturesSel` (for transports that can read them).
    pub fn driver_features(&self) -> u32 {
        match self.driver_features_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// All 64 driver feature bits.
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    /// Select which 32 driver feature bits the next write sets.
    pub fn set_driver_features_select(&mut self, select: u32) {
        self.driver_features_select = select;
    }

    /// The driver writes 32 feature bits; only between `DRIVER` and `FEATURES_OK`.
    pub fn write_driver_features(&mut self, value: u32) {
        let s = self.status;
        let window = s & STATUS_DRIVER != 0 && s & (STATUS_FEATURES_OK | STATUS_FAILED) == 0;
        if !window {
            self.metrics.late_feature_writes += 1;
            return;
        }
        match self.driver_features_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value as u64,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value as u64) << 32,
            // Bits above 63 do not exist: a non-zero write there asks for unoffered features.
            _ => self.unknown_features |= value != 0,
        }
    }

    /// A driver write of the device status (virtio 1.2 §2.1, §3.1.1).
    ///
    /// 0 resets. Otherwise bits are only added, in order: `ACKNOWLEDGE`, `DRIVER`,
    /// `FEATURES_OK` (refused — left clear — when the driver accepted features the device did
    /// not offer or omitted `VIRTIO_F_VERSION_1`), `DRIVER_OK` (activates the device; a failure
    /// sets `DEVICE_NEEDS_RESET`). `FAILED` may be added at any time. Anything else is ignored
    /// and counted.
    pub fn set_status(&mut self, new: u8) {
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let added = new & !old;
        let legal = new & old == old // never clears a bit
            && added & STATUS_NEEDS_RESET == 0 // device-only
            && new & 0x30 == 0 // reserved bits
            && (added & STATUS_DRIVER == 0 || new & STATUS_ACKNOWLEDGE != 0)
            && (added & STATUS_FEATURES_OK == 0 || new & STATUS_DRIVER != 0)
            && (added & STATUS_DRIVER_OK == 0 || new & STATUS_FEATURES_OK != 0)
            && (added & !STATUS_FAILED == 0 || old & STATUS_FAILED == 0);
        if !legal {
            self.metrics.illegal_status_writes += 1;
            return;
        }
        let mut new = new;
        if added & STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            self.metrics.features_refused += 1;
            new &= !STATUS_FEATURES_OK;
            if added & STATUS_DRIVER_OK != 0 {
                // DRIVER_OK together with a refused FEATURES_OK: ignore both.
                self.metrics.illegal_status_writes += 1;
                new &= !STATUS_DRIVER_OK;
            }
        }
        self.status = new;
        if added & STATUS_DRIVER_OK != 0 && new & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.device_features();
        !self.unknown_features
            && self.driver_features & !offered == 0
            && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            let mut state = q.state();
            state.event_idx_enabled = event_idx;
            let valid_state = Queue::try_from(state).ok();
            match valid_state {
                Some(nq) if !nq.ready() || nq.is_valid(&*self.mem.memory()) => queues.push(nq),
                _ => {
                    self.fail_activation();
                    return;
                }
            }
        }
        // One retry timer per queue, its source declared with the device's own.
        let mut sources = Vec::with_capacity(queues.len());
        let retry_timers = (0..queues.len() as u16)
            .map(|q| {
                let (timer, source) = RetryTimer::new(q).ok()?;
                sources.push(source);
                Some(timer)
            })
            .collect();
        let activation = Activation {
            retry_timers,
            mem: self.mem.clone(),
            queues,
            interrupt: Arc::new(CountingInterrupt {
                inner: self.interrupt.clone(),
                generation: self.generation.clone(),
            }),
            acked_features: self.driver_features,
        };
        match self.device.activate(activation) {
            Ok(()) => {
                self.activated = true;
                sources.extend(self.device.event_sources());
                if let Some(events) = &self.events {
                    events.set(sources);
                }
                self.servers.install(self.device.queue_servers());
            }
            Err(e) => {
                self.last_error = Some(e);
                self.fail_activation();
            }
        }
    }

    fn fail_activation(&mut self) {
        self.metrics.activation_failures += 1;
        self.needs_reset();
    }

    /// Set `DEVICE_NEEDS_RESET` and tell the driver (virtio 1.2 §2.1.2).
    /// Queue servers stop (waiting for running ones): none runs again until the driver resets
    /// the device.
    pub fn needs_reset(&mut self) {
        self.servers.clear();
        if self.status & STATUS_NEEDS_RESET == 0 {
            self.status |= STATUS_NEEDS_RESET;
            self.config_changed();
        }
    }

    /// Reset: the device and every queue return to their initial state.
    pub fn reset(&mut self) {
        self.activated = false;
        if let Some(events) = &self.events {
            events.clear();
        }
        // Waits for running queue servers: after this no server touches the rings.
        self.servers.clear();
        self.device.reset();
        self.status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.unknown_features = false;
        self.queue_select = 0;
        self.queues = Self::fresh_queues(&self.device);
        self.metrics.resets += 1;
    }

    /// The transport-independent state (see [`crate::persist`]): take it from a quiescent
    /// device (nothing in flight). The queue positions of an active device are read from
    /// each ready queue's used ring.
    pub fn save(&self) -> CoreState {
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let mut snap = QueueSnapshot::from(q);
                if self.activated
                    && q.ready()
                    && let Ok(idx) = q.used_idx(&*self.mem.memory(), Ordering::Acquire)
                {
                    // Quiescent: every chain taken is on the used ring.
                    snap.next_used = idx.0;
                    snap.next_avail = idx.0;
                }
                snap
            })
            .collect();
        CoreState {
            status: self.status,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            queues,
            config_generation: self.config_generation(),
            activated: self.activated,
        }
    }

    /// Restore `state` into this core, which must be fresh (never activated) around a freshly
    /// built device of the same kind; a state saved while active activates the device.
    ///
    /// # Errors
    ///
    /// [`StateError::Mismatch`] when the state does not fit the device (queue count or sizes,
    /// unoffered features) or the restored activation fails; [`StateError::Queue`] for an
    /// invalid queue. The core is left reset on error.
    pub fn restore(&mut self, state: &CoreState) -> Result<(), StateError> {
        let r = self.try_restore(state);
        if r.is_err() {
            self.reset();
        }
        r
    }

    fn try_restore(&mut self, state: &CoreState) -> Result<(), StateError> {
        if self.activated {
            return Err(StateError::Mismatch("core already active"));
        }
        let maxes = self.device.queue_max_sizes();
        if state.queues.len() != maxes.len()
            || state
                .queues
                .iter()
                .zip(maxes)
                .any(|(q, &m)| q.max_size != m)
        {
            return Err(StateError::Mismatch("queue count or sizes"));
        }
        if state.driver_features & !self.device.device_features() != 0 {
            return Err(StateError::Mismatch("unoffered features"));
        }
        let queues = state
            .queues
            .iter()
            .map(QueueSnapshot::to_queue)
            .collect::<Result<Vec<_>, _>>()?;
        self.status = state.status;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.driver_features = state.driver_features;
        self.unknown_features = false;
        self.queue_select = state.queue_select;
        self.queues = queues;
        self.generation
            .store(state.config_generation, Ordering::Release);
        if state.activated {
            self.activate();
            if !self.activated {
                return Err(StateError::Mismatch("the restored activation failed"));
            }
        }
        Ok(())
    }

    /// Number of queues.
    pub fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }

    /// Selected queue index.
    pub fn queue_select(&self) -> u16 {
        self.queue_select
    }

    /// Select the queue the queue registers refer to.
    pub fn set_queue_select(&mut self, index: u16) {
        self.queue_select = index;
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(self.queue_select as usize)
    }

    /// The selected queue, if it exists and its configuration may change now (after
    /// `FEATURES_OK`, before `DRIVER_OK`); otherwise the write is counted.
    fn selected_for_write(&mut self) -> Option<&mut Queue> {
        let s = self.status;
        let window = s & STATUS_FEATURES_OK != 0
            && s & (STATUS_DRIVER_OK | STATUS_FAILED | STATUS_NEEDS_RESET) == 0;
        match self.queues.get_mut(self.queue_select as usize) {
            Some(q) if window => Some(q),
            _ => {
                self.metrics.bad_queue_writes += 1;
                None
            }
        }
    }

    /// Maximum size of the selected queue (0 if it does not exist).
    pub fn queue_max_size(&self) -> u16 {
        self.selected().map_or(0, |q| q.max_size())
    }

    /// Current size of the selected queue (0 if it does not exist).
    pub fn queue_size(&self) -> u16 {
        self.selected().map_or(0, |q| q.size())
    }

    /// Set the selected queue's size; refused unless a power of two in `1..=max`.
    pub fn set_queue_size(&mut self, size: u16) {
        let Some(q) = self.selected_for_write() else {
            return;
        };
        if q.try_set_size(size).is_err() {
            self.metrics.queue_size_refused += 1;
        }
    }

    /// Whether the selected queue is ready.
    pub fn queue_ready(&self) -> bool {
        self.selected().is_some_and(|q| q.ready())
    }

    /// Enable (or disable) the selected queue.
    pub fn set_queue_ready(&mut self, ready: bool) {
        if let Some(q) = self.selected_for_write() {
            q.set_ready(ready);
        }
    }

    /// A ring address of the selected queue.
    pub fn queue_address(&self, ring: Ring) -> u64 {
        self.selected().map_or(0, |q| match ring {
            Ring::Descriptors => q.desc_table(),
            Ring::Driver => q.avail_ring(),
            Ring::Device => q.used_ring(),
        })
    }

    /// Write the low or high half of a ring address of the selected queue.
    pub fn set_queue_address_half(&mut self, ring: Ring, high: bool, value: u32) {
        let old = self.queue_address(ring);
        let addr = if high {
            (old & 0xffff_ffff) | (value as u64) << 32
        } else {
            (old & !0xffff_ffff) | value as u64
        };
        self.set_queue_address(ring, addr);
    }

    /// Set a ring address of the selected queue; refused when misaligned.
    pub fn set_queue_address(&mut self, ring: Ring, addr: u64) {
        let Some(q) = self.selected_for_write() else {
            return;
        };
        let a = GuestAddress(addr);
        let r = match ring {
            Ring::Descriptors => q.try_set_desc_table_address(a),
            Ring::Driver => q.try_set_avail_ring_address(a),
            Ring::Device => q.try_set_used_ring_address(a),
        };
        if r.is_err() {
            self.metrics.queue_address_refused += 1;
        }
    }

    /// The driver notified queue `index`: forward to the device once it is active. A device
    /// error sets `DEVICE_NEEDS_RESET`.
    pub fn notify(&mut self, index: u16) {
        if !self.runs_queue(index) {
            self.metrics.bad_notifies += 1;
            return;
        }
        self.metrics.notifies += 1;
        self.run_queue(index);
    }

    /// Run queue `index`: its server (see [`crate::queue_server`]) if it has one, otherwise
    /// the device's `queue_notify`.
    fn run_queue(&mut self, index: u16) {
        let r = match self.servers.run(index) {
            ServeOutcome::NotServed => self.device.queue_notify(index),
            ServeOutcome::Done => Ok(()),
            ServeOutcome::Failed { error, .. } => Err(error),
        };
        if let Err(e) = r {
            self.device_error(e);
        }
    }

    /// The queue servers, for a notify worker to run outside the transport lock.
    pub fn queue_servers(&self) -> Arc<QueueServers> {
        self.servers.clone()
    }

    /// A queue server of activation `epoch` failed (reported by the notify worker, which ran
    /// it without the transport lock): a device error, unless the driver reset the device
    /// since (then the error belongs to a gone activation and is dropped).
    pub fn server_error(&mut self, epoch: u64, error: DeviceError) {
        if epoch == self.servers.epoch() && self.activated {
            self.device_error(error);
        }
    }

    /// The device's own event asks for a pass over queue `index` (see
    /// `QueueNotify::wake_queue`): forward it like [`Self::notify`] without counting a driver
    /// notification. Ignored, uncounted, while the device is not active — a late completion
    /// after a reset is no driver mistake.
    pub fn wake(&mut self, index: u16) {
        if !self.runs_queue(index) {
            return;
        }
        self.run_queue(index);
    }

    /// A declared event source with `EventAction::Device(token)` fired: forward it to the
    /// device while it is active (ignored otherwise, uncounted). A device error sets
    /// `DEVICE_NEEDS_RESET`.
    pub fn device_event(&mut self, token: u32) {
        if !self.activated || self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        if let Err(e) = self.device.handle_event(token) {
            self.device_error(e);
        }
    }

    /// The device's event sources, for a notify worker to serve (`None` if the registry could
    /// not be created).
    pub fn device_events(&self) -> Option<Arc<DeviceEvents>> {
        self.events.clone()
    }

    /// Whether queue `index` may run: the device is active, has the queue, and does not need
    /// a reset.
    fn runs_queue(&self, index: u16) -> bool {
        self.activated && index < self.num_queues() && self.status & STATUS_NEEDS_RESET == 0
    }

    /// A doorbell write trapped to the transport: count it, then [`Self::notify`].
    pub fn trapped_notify(&mut self, index: u16) {
        self.metrics.trapped_notifies += 1;
        self.notify(index);
    }

    /// Record a device error reported outside [`Self::notify`] (e.g. from a worker): count it,
    /// set `DEVICE_NEEDS_RESET` and keep it as [`Self::last_device_error`].
    pub fn device_error(&mut self, error: DeviceError) {
        self.metrics.device_errors += 1;
        if matches!(error, DeviceError::Queue { .. }) {
            self.corrupt_rings += 1;
        }
        self.last_error = Some(error);
        self.needs_reset();
    }

    /// Device errors that were a corrupt ring ([`DeviceError::Queue`], the shared policy of
    /// [`crate::queue_pass`]): each also set `DEVICE_NEEDS_RESET` and counts in
    /// [`TransportMetrics::device_errors`]. (A separate counter: `TransportMetrics` keeps its
    /// fields, which VMMs print.)
    pub fn corrupt_rings(&self) -> u64 {
        self.corrupt_rings
    }

    /// The last error the device reported (from activation, a notification or a worker), with
    /// its whole `source()` chain; kept across a reset so a VMM can still log why the driver
    /// had to reset, until [`Self::take_last_device_error`] or the next error replaces it.
    pub fn last_device_error(&self) -> Option<&DeviceError> {
        self.last_error.as_ref()
    }

    /// Take [`Self::last_device_error`] out (e.g. to log it once).
    pub fn take_last_device_error(&mut self) -> Option<DeviceError> {
        self.last_error.take()
    }

    /// A driver read of the device configuration space.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.device.read_config(offset, data);
    }

    /// A driver write of the device configuration space.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.device.write_config(offset, data);
    }
}

/// The three parts of a split virtqueue (virtio 1.2 §2.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    /// Descriptor table (`queue_desc`).
    Descriptors,
    /// Driver (available) ring (`queue_driver`).
    Driver,
    /// Device (used) ring (`queue_device`).
    Device,
}
