//! A driver-side harness for device tests (feature `test-utils`): no KVM.
//!
//! [`DriverHarness`] puts a device behind a real [`MmioTransport`] in mock guest memory and
//! plays the driver through the transport's registers: it negotiates features, lays out split
//! queues, writes descriptor chains (through virtio-queue's mock [`DescriptorTable`]) and their
//! buffers, kicks, and collects used entries and interrupts.
//!
//! (virtio-queue's `MockSplitQueue` is not used for the rings: creating one re-zeroes the ring
//! indices, and in 0.18 it places the used ring `size` bytes rather than `2 * size` bytes after
//! the available ring, overlapping them. The layout here follows virtio 1.2 §2.7.)
//!
//! ```
//! use vmkit_virtio::{rng::Rng, spec::*, test_utils::{Desc, DriverHarness}};
//!
//! let mut h = DriverHarness::new(Rng::default());
//! let acked = h.activate(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX).unwrap();
//! assert_eq!(acked, 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX);
//! let c = h.add_chain(0, &[Desc::Writable(16), Desc::Writable(4)]).unwrap();
//! h.kick(0);
//! assert_eq!(h.used(0), [(c.head, 20)]);
//! assert_eq!(h.interrupts(), 1);
//! assert_ne!(h.read_buffer(&c.buffers[0]), vec![0; 16]); // (with overwhelming probability)
//! ```

use std::sync::Arc;

use thiserror::Error;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::DescriptorTable;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_devices::MutBusDevice;
use vmkit_devices::interrupt::RecordingInterrupt;

use crate::device::VirtioDevice;
use crate::events::{EventAction, EventPoller};
use crate::memory::VirtioMemory;
use crate::mmio::MmioTransport;
use crate::spec::*;
use vmm_sys_util::epoll::Epoll;

/// Size of the harness's guest memory.
pub const HARNESS_MEM_SIZE: u64 = 64 << 20;
/// Where queue `i`'s rings start: `QUEUE_BASE + i * QUEUE_STRIDE`.
pub const QUEUE_BASE: u64 = 0x10_0000;
/// Space reserved per queue (enough for 32768 entries).
pub const QUEUE_STRIDE: u64 = 0x10_0000;
/// Most queues the harness lays out.
pub const MAX_QUEUES: u16 = 16;
/// Where data buffers are allocated from.
pub const BUFFER_BASE: u64 = 0x200_0000;

/// Harness failures (driver-side: the device refused something).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HarnessError {
    /// The device left `FEATURES_OK` clear.
    #[error("device refused features {0:#x}")]
    FeaturesRefused(u64),
    /// `DRIVER_OK` did not stick or `DEVICE_NEEDS_RESET` came up.
    #[error("device failed to activate (status {0:#x})")]
    NotActivated(u8),
    /// Queue index beyond what the harness or device has.
    #[error("no queue {0}")]
    NoQueue(u16),
    /// Out of descriptors or buffer memory.
    #[error("harness out of {0}")]
    Exhausted(&'static str),
    /// Writing the driver structures failed.
    #[error("guest memory write failed")]
    Memory,
}

/// One descriptor of a chain to submit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Desc {
    /// A device-readable buffer with these contents.
    Readable(Vec<u8>),
    /// A device-writable buffer of this size (zero-filled).
    Writable(u32),
    /// A raw descriptor: any address, length and flags (`NEXT` is managed by the harness).
    Raw {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
        /// Device-writable.
        writable: bool,
    },
}

/// A buffer of a submitted chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// A submitted chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// Head descriptor index (the id the used ring reports).
    pub head: u16,
    /// The buffers, in chain order.
    pub buffers: Vec<Buffer>,
}

#[derive(Clone, Copy, Debug, Default)]
struct DriverQueue {
    size: u16,
    next_desc: u16,
    last_used: u16,
}

/// The driver side of a virtio device, over virtio-mmio, in mock memory. The driver writes
/// through a `GuestMemoryMmap`; the device sees the same memory as `M` (by default that
/// `GuestMemoryMmap`; see [`DriverHarness::with_device_memory`] for `GuestMemoryAtomic` or
/// `IommuMemory`).
pub struct DriverHarness<D: VirtioDevice<M>, M: VirtioMemory = GuestMemoryMmap> {
    mem: GuestMemoryMmap,
    transport: MmioTransport<D, M>,
    irq: Arc<RecordingInterrupt>,
    queues: Vec<DriverQueue>,
    next_buffer: u64,
    events: Option<(Epoll, EventPoller)>,
}

impl<D: VirtioDevice> DriverHarness<D> {
    /// `device` in [`HARNESS_MEM_SIZE`] bytes of fresh guest memory at 0.
    pub fn new(device: D) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), HARNESS_MEM_SIZE as usize)])
            .unwrap_or_default();
        Self::with_memory(device, mem)
    }

    /// `device` in `mem` (which must cover [`QUEUE_BASE`] onwards for the harness's rings).
    pub fn with_memory(device: D, mem: GuestMemoryMmap) -> Self {
        Self::with_device_memory(device, mem.clone(), mem)
    }

    /// Restore the transport state `state` (saved from this harness's transport, e.g. after a
    /// serde round trip) into a fresh transport around `device`, on the same guest memory,
    /// keeping the driver side (queue layout, next descriptor, used entries seen): the driver
    /// goes on as if nothing happened.
    ///
    /// # Errors
    ///
    /// The state does not fit `device` (see `TransportCore::restore`).
    pub fn resume<D2: VirtioDevice>(
        &self,
        device: D2,
        state: &crate::persist::MmioTransportState,
    ) -> Result<DriverHarness<D2>, crate::persist::StateError> {
        let mut h = DriverHarness::with_memory(device, self.mem.clone());
        h.transport.restore(state)?;
        h.queues = self.queues.clone();
        h.next_buffer = self.next_buffer;
        Ok(h)
    }
}

impl<D: VirtioDevice<M>, M: VirtioMemory> DriverHarness<D, M> {
    /// `device` over `device_mem`, which must present the memory the driver writes through
    /// `mem` (e.g. a `GuestMemoryAtomic` holding `mem`, or an identity-mapped `IommuMemory`
    /// over it); `mem` must cover [`QUEUE_BASE`] onwards for the harness's rings.
    pub fn with_device_memory(device: D, mem: GuestMemoryMmap, device_mem: M) -> Self {
        let irq = Arc::new(RecordingInterrupt::default());
        let transport = MmioTransport::new(device, device_mem, irq.clone());
        Self {
            mem,
            transport,
            irq,
            queues: Vec::new(),
            next_buffer: BUFFER_BASE,
            events: None,
        }
    }

    /// Serve the device's own event sources (retry timers, completion eventfds, …) the way a
    /// `NotifyWorker` does — same poller, same dispatch to the transport — until one action
    /// was served or `timeout` passed. Returns how many actions ran (0: none fired in time).
    ///
    /// # Errors
    ///
    /// Creating the epoll instance or waiting failed.
    pub fn serve_events(&mut self, timeout: std::time::Duration) -> std::io::Result<usize> {
        if self.events.is_none() {
            let registry = self
                .transport
                .core()
                .device_events()
                .ok_or_else(|| std::io::Error::other("no device event registry"))?;
            let epoll = Epoll::new()?;
            let poller = EventPoller::new(registry, &epoll, 0)?;
            self.events = Some((epoll, poller));
        }
        let Some((epoll, poller)) = self.events.as_mut() else {
            return Ok(0);
        };
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let actions = poller.wait_once(epoll, left)?;
            for a in &actions {
                match *a {
                    EventAction::Queue(q) => self.transport.wake_queue(q),
                    EventAction::Device(t) => self.transport.core_mut().device_event(t),
                }
            }
            if !actions.is_empty() || left.is_zero() {
                return Ok(actions.len());
            }
        }
    }

    /// Guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The transport.
    pub fn transport(&self) -> &MmioTransport<D, M> {
        &self.transport
    }

    /// Give up the harness and keep the transport (e.g. to hand it to a `NotifyWorker`).
    pub fn into_transport(self) -> MmioTransport<D, M> {
        self.transport
    }

    /// The transport, mutably.
    pub fn transport_mut(&mut self) -> &mut MmioTransport<D, M> {
        &mut self.transport
    }

    /// The device.
    pub fn device(&self) -> &D {
        self.transport.device()
    }

    /// The device, mutably.
    pub fn device_mut(&mut self) -> &mut D {
        self.transport.core_mut().device_mut()
    }

    /// 32-bit register read.
    pub fn read32(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// 32-bit register write.
    pub fn write32(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    /// Device status.
    pub fn status(&mut self) -> u8 {
        self.read32(0x70) as u8
    }

    /// Write the device status.
    pub fn set_status(&mut self, status: u8) {
        self.write32(0x70, status as u32)
    }

    /// The 64 device feature bits.
    pub fn device_features(&mut self) -> u64 {
        self.write32(0x14, 0);
        let lo = self.read32(0x10) as u64;
        self.write32(0x14, 1);
        lo | (self.read32(0x10) as u64) << 32
    }

    /// Write the 64 driver feature bits.
    pub fn write_driver_features(&mut self, features: u64) {
        self.write32(0x24, 0);
        self.write32(0x20, features as u32);
        self.write32(0x24, 1);
        self.write32(0x20, (features >> 32) as u32);
    }

    /// Reset, then ACKNOWLEDGE, DRIVER, accept `wanted & offered` (exactly `wanted` if
    /// `exact`), FEATURES_OK. Returns the accepted features.
    pub fn negotiate_features(&mut self, wanted: u64, exact: bool) -> Result<u64, HarnessError> {
        self.set_status(0);
        self.queues.clear();
        self.set_status(STATUS_ACKNOWLEDGE);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let features = if exact {
            wanted
        } else {
            wanted & self.device_features()
        };
        self.write_driver_features(features);
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if self.status() & STATUS_FEATURES_OK == 0 {
            return Err(HarnessError::FeaturesRefused(features));
        }
        Ok(features)
    }

    /// Lay out and enable every queue the device has at its maximum size.
    pub fn setup_queues(&mut self) -> Result<(), HarnessError> {
        let n = self.transport.core().num_queues().min(MAX_QUEUES);
        for q in 0..n {
            self.write32(0x30, q as u32);
            let max = self.read32(0x34) as u16;
            self.setup_queue(q, max)?;
        }
        Ok(())
    }

    /// Lay out queue `index` with `size` entries and enable it.
    pub fn setup_queue(&mut self, index: u16, size: u16) -> Result<(), HarnessError> {
        if index >= MAX_QUEUES {
            return Err(HarnessError::NoQueue(index));
        }
        let l = ring_layout(index, size);
        // Fresh rings: zero flags, indices and the EVENT_IDX fields.
        let zeros = vec![0u8; (l.end - l.desc.0) as usize];
        self.mem
            .write_slice(&zeros, l.desc)
            .map_err(|_| HarnessError::Memory)?;
        self.write32(0x30, index as u32);
        self.write32(0x38, size as u32);
        for (reg, addr) in [(0x80, l.desc), (0x90, l.avail), (0xa0, l.used)] {
            self.write32(reg, addr.0 as u32);
            self.write32(reg + 4, (addr.0 >> 32) as u32);
        }
        self.write32(0x44, 1);
        if self.queues.len() <= index as usize {
            self.queues
                .resize(index as usize + 1, DriverQueue::default());
        }
        self.queues[index as usize] = DriverQueue {
            size,
            next_desc: 0,
            last_used: 0,
        };
        Ok(())
    }

    /// Set DRIVER_OK and check the device accepted it.
    pub fn driver_ok(&mut self) -> Result<(), HarnessError> {
        let s = self.status();
        self.set_status(s | STATUS_DRIVER_OK);
        let s = self.status();
        if s & STATUS_DRIVER_OK == 0 || s & STATUS_NEEDS_RESET != 0 {
            return Err(HarnessError::NotActivated(s));
        }
        Ok(())
    }

    /// Negotiate `wanted & offered`, set up all queues, DRIVER_OK. Returns the accepted features.
    pub fn activate(&mut self, wanted: u64) -> Result<u64, HarnessError> {
        let f = self.negotiate_features(wanted, false)?;
        self.setup_queues()?;
        self.driver_ok()?;
        Ok(f)
    }

    fn queue(&self, index: u16) -> Result<(RingLayout, DriverQueue), HarnessError> {
        let dq = *self
            .queues
            .get(index as usize)
            .filter(|q| q.size != 0)
            .ok_or(HarnessError::NoQueue(index))?;
        Ok((ring_layout(index, dq.size), dq))
    }

    /// Allocate `len` bytes of buffer memory (16-byte aligned).
    pub fn alloc(&mut self, len: u32) -> Result<GuestAddress, HarnessError> {
        let addr = self.next_buffer;
        let end = addr + (len as u64).div_ceil(16) * 16;
        if end > HARNESS_MEM_SIZE.min(self.mem_end()) {
            return Err(HarnessError::Exhausted("buffer memory"));
        }
        self.next_buffer = end;
        Ok(GuestAddress(addr))
    }

    fn mem_end(&self) -> u64 {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.mem
            .iter()
            .map(|r| r.start_addr().0 + r.len())
            .max()
            .unwrap_or(0)
    }

    /// Write `descs` as one chain into queue `index` and publish it on the available ring.
    pub fn add_chain(&mut self, index: u16, descs: &[Desc]) -> Result<Chain, HarnessError> {
        let (l, dq) = self.queue(index)?;
        if descs.is_empty() || descs.len() > dq.size as usize {
            return Err(HarnessError::Exhausted("descriptors"));
        }
        let mut buffers = Vec::with_capacity(descs.len());
        for d in descs {
            buffers.push(match d {
                Desc::Readable(data) => {
                    let addr = self.alloc(data.len() as u32)?;
                    self.mem
                        .write_slice(data, addr)
                        .map_err(|_| HarnessError::Memory)?;
                    Buffer {
                        addr,
                        len: data.len() as u32,
                        writable: false,
                    }
                }
                Desc::Writable(len) => {
                    let addr = self.alloc(*len)?;
                    let zeros = vec![0u8; *len as usize];
                    self.mem
                        .write_slice(&zeros, addr)
                        .map_err(|_| HarnessError::Memory)?;
                    Buffer {
                        addr,
                        len: *len,
                        writable: true,
                    }
                }
                Desc::Raw {
                    addr,
                    len,
                    writable,
                } => Buffer {
                    addr: GuestAddress(*addr),
                    len: *len,
                    writable: *writable,
                },
            });
        }
        let table = DescriptorTable::new(&self.mem, l.desc, dq.size);
        let head = dq.next_desc;
        let n = buffers.len();
        for (i, b) in buffers.iter().enumerate() {
            let idx = (head as usize + i) % dq.size as usize;
            let next = ((idx + 1) % dq.size as usize) as u16;
            let mut flags = 0u16;
            if b.writable {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = SplitDescriptor::new(b.addr.0, b.len, flags, next);
            table
                .store(idx as u16, RawDescriptor::from(d))
                .map_err(|_| HarnessError::Memory)?;
        }
        self.publish(index, head)?;
        self.queues[index as usize].next_desc = ((head as usize + n) % dq.size as usize) as u16;
        Ok(Chain { head, buffers })
    }

    /// Make `head` available on queue `index` as it is — any value, also one outside the
    /// descriptor table (what a hostile driver can do): ring[avail_idx % size] = head; then
    /// avail_idx += 1 (virtio 1.2 §2.7.13).
    pub fn publish(&mut self, index: u16, head: u16) -> Result<(), HarnessError> {
        let (l, dq) = self.queue(index)?;
        let avail = l.avail;
        let avail_idx: u16 = self
            .mem
            .read_obj(avail.unchecked_add_(2))
            .map_err(|_| HarnessError::Memory)?;
        let slot = avail.unchecked_add_(4 + 2 * (avail_idx % dq.size) as u64);
        self.mem
            .write_obj(head, slot)
            .map_err(|_| HarnessError::Memory)?;
        self.mem
            .write_obj(avail_idx.wrapping_add(1), avail.unchecked_add_(2))
            .map_err(|_| HarnessError::Memory)
    }

    /// Notify queue `index` through the `QueueNotify` register (the trapped-exit path).
    pub fn kick(&mut self, index: u16) {
        self.write32(0x50, index as u32);
    }

    /// New used-ring entries of queue `index` as `(id, len)` since the last call. Also moves
    /// `used_event` (EVENT_IDX) so the device interrupts on the next entry.
    pub fn used(&mut self, index: u16) -> Vec<(u16, u32)> {
        let Ok((l, dq)) = self.queue(index) else {
            return Vec::new();
        };
        let (used, avail) = (l.used, l.avail);
        let used_idx: u16 = self
            .mem
            .read_obj(used.unchecked_add_(2))
            .unwrap_or(dq.last_used);
        let mut out = Vec::new();
        let mut i = dq.last_used;
        while i != used_idx {
            let e = used.unchecked_add_(4 + 8 * (i % dq.size) as u64);
            let id: u32 = self.mem.read_obj(e).unwrap_or(u32::MAX);
            let len: u32 = self.mem.read_obj(e.unchecked_add_(4)).unwrap_or(0);
            out.push((id as u16, len));
            i = i.wrapping_add(1);
        }
        // used_event lives after the available ring entries.
        let _ = self
            .mem
            .write_obj(used_idx, avail.unchecked_add_(4 + 2 * dq.size as u64));
        self.queues[index as usize].last_used = used_idx;
        out
    }

    /// Contents of a buffer.
    pub fn read_buffer(&self, b: &Buffer) -> Vec<u8> {
        let mut v = vec![0u8; b.len as usize];
        let _ = self.mem.read_slice(&mut v, b.addr);
        v
    }

    /// Interrupts raised on the transport's line so far.
    pub fn interrupts(&self) -> u64 {
        self.irq.count()
    }

    /// Read and acknowledge `InterruptStatus`.
    pub fn ack_interrupts(&mut self) -> u32 {
        let s = self.read32(0x60);
        self.write32(0x64, s);
        s
    }

    /// Read `len` bytes of device configuration at `offset`.
    pub fn read_config(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.transport.read(0x100 + offset, &mut v);
        v
    }

    /// Write device configuration at `offset`.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.transport.write(0x100 + offset, data);
    }
}

/// Where queue `index`'s rings are (virtio 1.2 §2.7: 16-byte descriptors; available ring
/// `flags, idx, ring[size], used_event`; used ring 4-aligned `flags, idx, ring[size], avail_event`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingLayout {
    /// Descriptor table.
    pub desc: GuestAddress,
    /// Available (driver) ring.
    pub avail: GuestAddress,
    /// Used (device) ring.
    pub used: GuestAddress,
    /// First byte after the used ring.
    pub end: u64,
}

/// The harness's ring layout for queue `index` with `size` entries.
pub fn ring_layout(index: u16, size: u16) -> RingLayout {
    let n = size as u64;
    let desc = QUEUE_BASE + index as u64 * QUEUE_STRIDE;
    let avail = desc + 16 * n;
    let used = (avail + 6 + 2 * n).next_multiple_of(4);
    RingLayout {
        desc: GuestAddress(desc),
        avail: GuestAddress(avail),
        used: GuestAddress(used),
        end: used + 6 + 8 * n,
    }
}

trait AddrExt {
    fn unchecked_add_(self, off: u64) -> GuestAddress;
}

impl AddrExt for GuestAddress {
    fn unchecked_add_(self, off: u64) -> GuestAddress {
        GuestAddress(self.0.wrapping_add(off))
    }
}
