//! One pass over a split virtqueue (virtio 1.2 §2.7), written once for every device.
//!
//! A device supplies only what it does with one chain, as a [`ChainOutcome`]:
//!
//! * [`ChainOutcome::Used`] — done now; the pass puts it on the used ring with that length;
//! * [`ChainOutcome::InFlight`] — the device keeps the chain's head (an asynchronous engine
//!   such as io_uring runs it) and finishes it later through [`complete`];
//! * [`ChainOutcome::Retry`] — the device cannot take the chain now (a rate limiter is empty):
//!   the chain goes back to the available ring, the pass stops, and [`PassReport::retry`]
//!   says when to run the queue again ([`Retry::After`] a duration — `Activation::run_queue`
//!   arms the queue's retry timer, which the notify worker serves — or [`Retry::OnEvent`], one
//!   of the device's own event sources).
//!
//! The pass also owns the policy every device shares:
//!
//! * **A corrupt ring** — an available index more than a queue ahead of the device's (§2.7.13.3:
//!   the driver may only make `queue_size` buffers available), or a head index outside the
//!   descriptor table (§2.7.5) — is a [`DeviceError::Queue`] for every device: the transport
//!   then sets `DEVICE_NEEDS_RESET` (§2.1.2) and counts it in
//!   `TransportCore::corrupt_rings`. No device drops such a chain silently or spins on it.
//! * **Used-buffer notification suppression** — `VIRTIO_F_EVENT_IDX` (`used_event`, §2.7.10)
//!   or `VIRTQ_AVAIL_F_NO_INTERRUPT` — is decided once per pass (and per [`complete`] batch) by
//!   virtio-queue's `needs_notification`; a device never signals by hand.

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::time::Duration;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use crate::device::{DeviceError, InterruptCause, VirtioInterrupt};

/// What the device did with one chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainOutcome {
    /// Finished: return it on the used ring with this many bytes written to its writable
    /// buffers.
    Used(u32),
    /// Taken: the device completes it later through [`complete`] with its head index.
    InFlight,
    /// Not taken now: leave it (and what follows) on the available ring and stop the pass.
    Retry(Retry),
}

/// When a stopped queue runs again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// After this long (a throttled queue: the rate limiter's refill time).
    After(Duration),
    /// When one of the device's own event sources fires.
    OnEvent,
}

/// A finished in-flight chain: its head index and the bytes written to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The chain's head descriptor index (what [`ChainOutcome::InFlight`] kept).
    pub head: u16,
    /// Bytes written to its writable buffers.
    pub len: u32,
}

/// What one pass (or one [`complete`] batch) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Chains put on the used ring.
    pub used: u64,
    /// Chains the device took in flight.
    pub in_flight: u64,
    /// Interrupts raised (fewer than used chains with EVENT_IDX / NO_INTERRUPT).
    pub interrupts: u64,
    /// The pass stopped at a chain the device could not take; run the queue again then.
    pub retry: Option<Retry>,
}

/// The queue a pass runs over, with the memory its rings live in and how to signal the driver.
pub struct QueueContext<'a, M> {
    /// Queue index (for interrupts and errors).
    pub index: u16,
    /// The queue.
    pub queue: &'a mut Queue,
    /// Guest memory.
    pub mem: &'a M,
    /// How to notify the driver.
    pub interrupt: &'a dyn VirtioInterrupt,
}

impl<M: GuestMemory> QueueContext<'_, M> {
    fn qerr(&self, source: virtio_queue::Error) -> DeviceError {
        DeviceError::Queue {
            index: self.index,
            source,
        }
    }

    /// Signal the driver if the ring's suppression rules ask for it after `added` used entries.
    fn signal_if_needed(
        &mut self,
        added: bool,
        report: &mut PassReport,
    ) -> Result<(), DeviceError> {
        if added
            && self
                .queue
                .needs_notification(self.mem)
                .map_err(|e| self.qerr(e))?
        {
            self.interrupt
                .signal(InterruptCause::Queue(self.index))
                .map_err(DeviceError::Interrupt)?;
            report.interrupts += 1;
        }
        Ok(())
    }
}

/// The corrupt-ring check on a popped head, for loops that cannot use [`run`] yet: a head at
/// or beyond the queue size names no descriptor (virtio 1.2 §2.7.5), so no used entry can
/// return it.
///
/// # Errors
///
/// `InvalidDescriptorIndex`: report it as [`DeviceError::Queue`] (the transport then sets
/// `DEVICE_NEEDS_RESET`).
pub fn check_head(queue: &Queue, head: u16) -> Result<(), virtio_queue::Error> {
    if head < queue.size() {
        Ok(())
    } else {
        Err(virtio_queue::Error::InvalidDescriptorIndex)
    }
}

/// Take every available chain of the queue and hand it to `handle`; see the
/// [module docs](self). A queue that is not ready is left alone.
///
/// # Errors
///
/// [`DeviceError::Queue`] for a corrupt ring (the transport sets `DEVICE_NEEDS_RESET`),
/// [`DeviceError::Interrupt`] when signalling fails.
pub fn run<M, F>(mut ctx: QueueContext<'_, M>, mut handle: F) -> Result<PassReport, DeviceError>
where
    M: GuestMemory,
    F: FnMut(DescriptorChain<&M>) -> ChainOutcome,
{
    let mut report = PassReport::default();
    if !ctx.queue.ready() {
        return Ok(report);
    }
    let mem = ctx.mem;
    let mut idle_passes = 0;
    loop {
        ctx.queue
            .disable_notification(mem)
            .map_err(|e| ctx.qerr(e))?;
        // A driver that moved `avail.idx` more than a ring ahead corrupted the queue
        // (virtio-queue would just yield nothing, forever).
        let avail = ctx
            .queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|e| ctx.qerr(e))?;
        if (avail - Wrapping(ctx.queue.next_avail())).0 > ctx.queue.size() {
            return Err(ctx.qerr(virtio_queue::Error::InvalidAvailRingIndex));
        }
        let (mut popped, mut added) = (false, false);
        while let Some(chain) = ctx.queue.pop_descriptor_chain(mem) {
            popped = true;
            let head = chain.head_index();
            if let Err(e) = check_head(ctx.queue, head) {
                ctx.signal_if_needed(added, &mut report)?;
                return Err(ctx.qerr(e));
            }
            match handle(chain) {
                ChainOutcome::Used(len) => {
                    ctx.queue
                        .add_used(mem, head, len)
                        .map_err(|e| ctx.qerr(e))?;
                    report.used += 1;
                    added = true;
                }
                ChainOutcome::InFlight => report.in_flight += 1,
                ChainOutcome::Retry(retry) => {
                    ctx.queue.go_to_previous_position();
                    report.retry = Some(retry);
                    break;
                }
            }
        }
        ctx.signal_if_needed(added, &mut report)?;
        if report.retry.is_some() {
            // Notifications stay disabled: the retry (timer or event) runs the queue again.
            return Ok(report);
        }
        // Re-enable notifications; if the driver added chains meanwhile, go again. Two
        // passes in a row that find nothing to pop (a head the ring cannot yield) end it.
        idle_passes = if popped { 0 } else { idle_passes + 1 };
        if !ctx
            .queue
            .enable_notification(mem)
            .map_err(|e| ctx.qerr(e))?
            || idle_passes > 1
        {
            return Ok(report);
        }
    }
}

/// Put finished in-flight chains on the used ring and signal the driver once if the
/// suppression rules ask for it.
///
/// # Errors
///
/// [`DeviceError::Queue`] for a head outside the queue or a used ring outside memory,
/// [`DeviceError::Interrupt`] when signalling fails.
pub fn complete<M, I>(mut ctx: QueueContext<'_, M>, done: I) -> Result<PassReport, DeviceError>
where
    M: GuestMemory,
    I: IntoIterator<Item = Completion>,
{
    let mut report = PassReport::default();
    for c in done {
        ctx.queue
            .add_used(ctx.mem, c.head, c.len)
            .map_err(|e| ctx.qerr(e))?;
        report.used += 1;
    }
    let added = report.used > 0;
    ctx.signal_if_needed(added, &mut report)?;
    Ok(report)
}
