//! MSI-X (PCI Local Bus spec 3.0 §6.8.2): the vector table and pending-bit array (PBA) that live
//! in a BAR, per-vector and function masking, and the [`MsixVector`] interrupt handles devices
//! get.
//!
//! [`Msix`] is a cheap, cloneable handle: the PCI function keeps one to serve the table/PBA BAR
//! accesses, the [`ConfigSpace`](super::ConfigSpace) keeps one to forward message-control writes
//! (enable, function mask), and each [`MsixVector`] keeps one to signal. A signal on a masked
//! vector (or while the function is masked) sets its pending bit; unmasking delivers it.
//!
//! Delivery goes to the [`MsiSink`] (`KVM_SIGNAL_MSI`), or — for a vector with an irqfd attached
//! ([`Msix::attach_irqfd`]) — writes the eventfd, and the table entry's message is kept in the
//! sink's GSI route ([`MsiSink::set_route`]).
//!
//! ## Masking irqfd-backed vectors
//!
//! A device may write a vector's eventfd directly ([`InterruptSource::notifier`]), without going
//! through [`Msix`]. So that such writes obey masking too (PCI 3.0 §6.8.3.5: a masked vector's
//! message is not sent, its pending bit is set, and it is sent on unmask), the irqfd is attached
//! to KVM only while the vector is deliverable — MSI-X enabled, function not masked, vector not
//! masked — when the sink offers [`MsiSink::irqfd_control`] (as `KvmIrqRouter` does). While it
//! is detached, eventfd writes only add to the eventfd's counter; a PBA read, [`Msix::pending`],
//! [`Msix::state`] and every mask or enable transition fold a nonzero count into the pending bit
//! (while MSI-X is disabled the signals are dropped instead, as for [`Msix::signal`]). On unmask
//! the irqfd is attached again and a pending message is sent once, through it.
//!
//! ```
//! use std::sync::Arc;
//! use vmkit_devices::InterruptSource;
//! use vmkit_devices::msi::RecordingMsiSink;
//! use vmkit_devices::pci::{Msix, MsixConfig};
//! use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
//!
//! let sink = Arc::new(RecordingMsiSink::default()); // records irqfd attach/detach
//! let msix = Msix::new(MsixConfig::in_bar(0, 1, 0), sink.clone()).unwrap();
//! let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
//! msix.attach_irqfd(0, 24, fd.clone()).unwrap();
//! msix.set_control(1 << 15);
//! let v0 = msix.vector(0);
//! v0.notifier().unwrap().write(1).unwrap(); // a backend signals while the vector is masked
//! assert!(!sink.irqfd_registered(24, &fd)); // detached: KVM would inject nothing
//! let mut pba = [0u8; 8];
//! msix.bar_read(0, 16, &mut pba); // the guest reads the PBA: the count became the pending bit
//! assert_eq!(pba[0], 1);
//! msix.bar_write(0, 12, &0u32.to_le_bytes()); // unmask
//! assert!(sink.irqfd_registered(24, &fd));
//! assert_eq!(fd.read().unwrap(), 1); // attached again, the pending message written once
//! ```
//!
//! ```
//! use std::sync::Arc;
//! use vmkit_devices::InterruptSource;
//! use vmkit_devices::msi::RecordingMsiSink;
//! use vmkit_devices::pci::{Msix, MsixConfig};
//!
//! let sink = Arc::new(RecordingMsiSink::default());
//! let msix = Msix::new(MsixConfig::in_bar(1, 2, 0), sink.clone()).unwrap();
//! msix.set_control(1 << 15); // the guest sets MSI-X enable
//! // Entry 1: address, data, then clear its mask bit (a 4-byte store each, as drivers do).
//! msix.bar_write(1, 16, &0xfee0_0000u32.to_le_bytes());
//! msix.bar_write(1, 24, &0x41u32.to_le_bytes());
//! let v1 = msix.vector(1);
//! v1.trigger().unwrap();
//! assert!(sink.sent().is_empty() && msix.pending(1)); // still masked: held pending
//! msix.bar_write(1, 28, &0u32.to_le_bytes());
//! assert_eq!(sink.vectors(), [0x41]); // unmasking delivered it
//! assert!(!msix.pending(1));
//! ```

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::PciError;
use crate::interrupt::InterruptSource;
use crate::msi::{MsiMessage, MsiSink};

/// Length of the MSI-X capability structure.
pub const MSIX_CAP_LEN: usize = 12;
/// Size of one table entry.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Most vectors a function can have.
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Message control: MSI-X enable.
pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;
/// Message control: function mask.
pub const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: mask bit.
pub const MSIX_VECTOR_CTRL_MASK: u32 = 1;

/// Where the table and PBA live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixConfig {
    /// Number of vectors (1..=2048).
    pub vectors: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR (8-byte aligned).
    pub table_offset: u32,
    /// BAR holding the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR (8-byte aligned).
    pub pba_offset: u32,
}

impl MsixConfig {
    /// `vectors` with the table at `table_offset` in `bar` and the PBA right after it.
    pub fn in_bar(bar: u8, vectors: u16, table_offset: u32) -> Self {
        Self {
            vectors,
            table_bar: bar,
            table_offset,
            pba_bar: bar,
            pba_offset: table_offset + vectors as u32 * MSIX_TABLE_ENTRY_SIZE as u32,
        }
    }
}

/// Saved MSI-X state (for snapshots): enable, function mask, table entries
/// (`[address low, address high, data, vector control]`) and pending bits.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// MSI-X enable.
    pub enabled: bool,
    /// Function mask.
    pub function_mask: bool,
    /// Table entries.
    pub table: Vec<[u32; 4]>,
    /// Pending bits, 64 vectors per word.
    pub pending: Vec<u64>,
}

/// Counters of an MSI-X function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixStats {
    /// Messages delivered through the sink or by [`Msix`] writing an irqfd (writes a device
    /// makes to an attached irqfd itself go straight to KVM and are not counted).
    pub delivered: u64,
    /// Signals held pending because the vector or function was masked (incl. eventfd writes to
    /// a detached irqfd, folded into the pending bit).
    pub pended: u64,
    /// Signals dropped because MSI-X was disabled or the vector number was out of range (incl.
    /// eventfd writes to a detached irqfd while MSI-X was disabled, or before a reset/restore).
    pub dropped: u64,
    /// Table/PBA accesses ignored: wrong width or alignment, straddling the end, PBA writes.
    pub bad_accesses: u64,
    /// Deliveries that failed (sink or eventfd error) while unmasking, failed route updates,
    /// and failed irqfd attach/detach or eventfd reads.
    pub delivery_errors: u64,
}

#[derive(Clone, Copy)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    ctrl: u32,
}

impl Entry {
    const RESET: Entry = Entry {
        addr_lo: 0,
        addr_hi: 0,
        data: 0,
        ctrl: MSIX_VECTOR_CTRL_MASK,
    };
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (self.addr_hi as u64) << 32 | self.addr_lo as u64,
            data: self.data,
        }
    }
    fn masked(&self) -> bool {
        self.ctrl & MSIX_VECTOR_CTRL_MASK != 0
    }
}

struct Irqfd {
    gsi: u32,
    fd: Arc<EventFd>,
    /// Attached to KVM as the irqfd of `gsi`. Always true when the sink has no
    /// [`IrqfdControl`](crate::msi::IrqfdControl) (the owner registered it and it stays registered).
    registered: bool,
}

struct State {
    enabled: bool,
    function_mask: bool,
    table: Vec<Entry>,
    pending: Vec<u64>,
    irqfds: Vec<Option<Irqfd>>,
    stats: MsixStats,
}

impl State {
    /// `v` is masked by its mask bit or the function mask; out-of-range vectors count as masked.
    fn masked(&self, v: usize) -> bool {
        self.function_mask || self.table.get(v).is_none_or(Entry::masked)
    }

    /// A message for `v` would be sent now: MSI-X enabled and `v` not masked.
    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.masked(v)
    }
}

struct Shared {
    config: MsixConfig,
    sink: Arc<dyn MsiSink>,
    state: Mutex<State>,
}

/// An MSI-X function's vector table, PBA and masking state (a cloneable handle).
#[derive(Clone)]
pub struct Msix(Arc<Shared>);

impl Msix {
    /// Vectors delivered through `sink`; all vectors start masked, MSI-X disabled.
    pub fn new(config: MsixConfig, sink: Arc<dyn MsiSink>) -> Result<Self, PciError> {
        if config.vectors == 0 || config.vectors > MSIX_MAX_VECTORS {
            return Err(PciError::MsixLayout("vector count must be 1..=2048"));
        }
        if !config.table_offset.is_multiple_of(8) || !config.pba_offset.is_multiple_of(8) {
            return Err(PciError::MsixLayout("table and PBA must be 8-byte aligned"));
        }
        let n = config.vectors as usize;
        let table_end = config.table_offset as u64 + n as u64 * MSIX_TABLE_ENTRY_SIZE;
        let pba_end = config.pba_offset as u64 + (n as u64).div_ceil(64) * 8;
        if config.table_bar == config.pba_bar
            && (config.table_offset as u64) < pba_end
            && (config.pba_offset as u64) < table_end
        {
            return Err(PciError::MsixLayout("table and PBA overlap"));
        }
        Ok(Self(Arc::new(Shared {
            config,
            sink,
            state: Mutex::new(State {
                enabled: false,
                function_mask: false,
                table: vec![Entry::RESET; n],
                pending: vec![0; n.div_ceil(64)],
                irqfds: (0..n).map(|_| None).collect(),
                stats: MsixStats::default(),
            }),
        })))
    }

    /// The layout.
    pub fn config(&self) -> MsixConfig {
        self.0.config
    }

    /// Table length in bytes.
    pub fn table_len(&self) -> u64 {
        self.0.config.vectors as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// PBA length in bytes (whole qwords).
    pub fn pba_len(&self) -> u64 {
        (self.0.config.vectors as u64).div_ceil(64) * 8
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Apply the capability's message control (called by the config space on guest writes):
    /// enable and function mask. Becoming deliverable delivers pending unmasked vectors.
    pub fn set_control(&self, control: u16) {
        let mut s = self.lock();
        let enabled = control & MSIX_CTRL_ENABLE != 0;
        let function_mask = control & MSIX_CTRL_FUNCTION_MASK != 0;
        let n = self.0.config.vectors as usize;
        if (enabled, function_mask) != (s.enabled, s.function_mask) {
            // Signals collected by detached irqfds belong to the old state.
            for v in 0..n {
                self.fold(&mut s, v);
            }
            s.enabled = enabled;
            s.function_mask = function_mask;
            for v in 0..n {
                self.sync_irqfd(&mut s, v);
            }
        }
        for v in 0..n {
            self.deliver_if_pending(&mut s, v);
        }
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.lock().enabled
    }

    /// Whether `vector` is masked (by its mask bit or the function mask); out-of-range vectors
    /// count as masked.
    pub fn masked(&self, vector: u16) -> bool {
        self.lock().masked(vector as usize)
    }

    /// Whether `vector`'s pending bit is set (after folding in what its detached irqfd
    /// collected).
    pub fn pending(&self, vector: u16) -> bool {
        let mut s = self.lock();
        self.fold(&mut s, vector as usize);
        pending_bit(&s, vector as usize)
    }

    /// The message programmed in `vector`'s table entry.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        self.lock().table.get(vector as usize).map(Entry::message)
    }

    /// Counters.
    pub fn stats(&self) -> MsixStats {
        self.lock().stats
    }

    /// Function-level reset: MSI-X disabled, every vector masked with a zero message, no pending
    /// bits. Irqfds stay attached to their vectors (and are detached from KVM, the vectors being
    /// masked); signals they collected are dropped.
    pub fn reset(&self) {
        let mut s = self.lock();
        s.enabled = false;
        s.function_mask = false;
        s.table.fill(Entry::RESET);
        for v in 0..s.table.len() {
            self.sync_irqfd(&mut s, v);
            self.fold(&mut s, v); // disabled: counted as dropped
        }
        s.pending.fill(0);
    }

    /// The state, for snapshots (pending bits include what detached irqfds collected).
    pub fn state(&self) -> MsixState {
        let mut s = self.lock();
        for v in 0..s.table.len() {
            self.fold(&mut s, v);
        }
        MsixState {
            enabled: s.enabled,
            function_mask: s.function_mask,
            table: s
                .table
                .iter()
                .map(|e| [e.addr_lo, e.addr_hi, e.data, e.ctrl])
                .collect(),
            pending: s.pending.clone(),
        }
    }

    /// Restore a snapshot taken from a function with the same vector count; republishes the
    /// routes of irqfd-backed vectors and attaches their irqfds exactly where the restored
    /// vectors are deliverable (signals detached irqfds collected before are dropped). Nothing
    /// is delivered (pending bits stay pending until the guest's next unmask).
    pub fn restore(&self, state: &MsixState) -> Result<(), PciError> {
        let mut s = self.lock();
        if state.table.len() != s.table.len() || state.pending.len() != s.pending.len() {
            return Err(PciError::MsixLayout(
                "snapshot has a different vector count",
            ));
        }
        // The snapshot's pending bits replace whatever was collected before it.
        s.enabled = false;
        for v in 0..s.table.len() {
            self.fold(&mut s, v);
        }
        s.enabled = state.enabled;
        s.function_mask = state.function_mask;
        for (e, &[addr_lo, addr_hi, data, ctrl]) in s.table.iter_mut().zip(&state.table) {
            *e = Entry {
                addr_lo: addr_lo & !0x3,
                addr_hi,
                data,
                ctrl: ctrl & MSIX_VECTOR_CTRL_MASK,
            };
        }
        s.pending.copy_from_slice(&state.pending);
        let routes: Vec<(u32, MsiMessage)> = s
            .irqfds
            .iter()
            .zip(&s.table)
            .filter_map(|(i, e)| i.as_ref().map(|i| (i.gsi, e.message())))
            .collect();
        for (gsi, msg) in routes {
            if self.0.sink.set_route(gsi, Some(msg)).is_err() {
                s.stats.delivery_errors += 1;
            }
        }
        for v in 0..s.table.len() {
            self.sync_irqfd(&mut s, v);
        }
        Ok(())
    }

    /// Deliver `vector` through `fd`, the irqfd of `gsi`, instead of the sink; the entry's
    /// message is kept as `gsi`'s route through [`MsiSink::set_route`]. Attach before handing
    /// out [`Msix::vector`] handles.
    ///
    /// When the sink has [`MsiSink::irqfd_control`], [`Msix`] owns the registration from here
    /// on (whether or not the caller registered `fd`): it makes `fd` non-blocking and attaches
    /// it to KVM only while the vector is deliverable (see the module docs). Without it, `fd`
    /// must be registered by the caller and stays so; direct writes to it then bypass masking.
    pub fn attach_irqfd(&self, vector: u16, gsi: u32, fd: Arc<EventFd>) -> io::Result<()> {
        let mut s = self.lock();
        let v = vector as usize;
        let msg = match s.table.get(v) {
            Some(e) => e.message(),
            None => return Err(io::Error::from(io::ErrorKind::InvalidInput)),
        };
        let ctl = self.0.sink.irqfd_control();
        if let Some(ctl) = ctl {
            set_nonblocking(&fd)?;
            ctl.unregister_irqfd(gsi, &fd)?;
        }
        self.0.sink.set_route(gsi, Some(msg))?;
        if let (Some(ctl), Some(Some(old))) = (ctl, s.irqfds.get(v))
            && old.registered
        {
            ctl.unregister_irqfd(old.gsi, &old.fd)?;
        }
        if let Some(slot) = s.irqfds.get_mut(v) {
            *slot = Some(Irqfd {
                gsi,
                fd,
                registered: ctl.is_none(),
            });
        }
        self.sync_irqfd(&mut s, v);
        Ok(())
    }

    /// The interrupt handle a device uses for `vector`.
    pub fn vector(&self, vector: u16) -> MsixVector {
        let irqfd = self
            .lock()
            .irqfds
            .get(vector as usize)
            .and_then(|i| i.as_ref().map(|i| i.fd.clone()));
        MsixVector {
            msix: self.clone(),
            vector,
            irqfd,
        }
    }

    /// Signal `vector`: delivered now if enabled and unmasked, else held pending (masked) or
    /// dropped (disabled, out of range) — both counted.
    pub fn signal(&self, vector: u16) -> io::Result<()> {
        let mut s = self.lock();
        let v = vector as usize;
        let Some(entry) = s.table.get(v).copied() else {
            s.stats.dropped += 1;
            return Ok(());
        };
        if !s.enabled {
            s.stats.dropped += 1;
            return Ok(());
        }
        if s.masked(v) {
            set_pending(&mut s, v, true);
            s.stats.pended += 1;
            return Ok(());
        }
        self.deliver(&mut s, v, entry.message())
    }

    fn deliver(&self, s: &mut State, v: usize, msg: MsiMessage) -> io::Result<()> {
        let r = match s.irqfds.get(v).and_then(|i| i.as_ref()) {
            Some(i) if i.registered => i.fd.write(1),
            // No irqfd, or attaching it failed: the sink still reaches the guest.
            _ => self.0.sink.send(msg),
        };
        if r.is_ok() {
            s.stats.delivered += 1;
        }
        r
    }

    /// Fold what `v`'s detached irqfd collected into its pending bit (counted as dropped while
    /// MSI-X is disabled). Reading the eventfd consumes the count.
    fn fold(&self, s: &mut State, v: usize) {
        let Some(Some(i)) = s.irqfds.get(v) else {
            return;
        };
        if i.registered {
            return; // KVM consumes the count (or the sink cannot detach it)
        }
        let n = match i.fd.read() {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => {
                s.stats.delivery_errors += 1;
                0
            }
        };
        if n == 0 {
            return;
        }
        if s.enabled {
            set_pending(s, v, true);
            s.stats.pended = s.stats.pended.saturating_add(n);
            // Deliverable but detached (attaching failed): the sink sends it.
            self.deliver_if_pending(s, v);
        } else {
            s.stats.dropped = s.stats.dropped.saturating_add(n);
        }
    }

    /// Attach `v`'s irqfd to KVM exactly while the vector is deliverable (sinks with
    /// [`IrqfdControl`](crate::msi::IrqfdControl) only).
    fn sync_irqfd(&self, s: &mut State, v: usize) {
        let want = s.deliverable(v);
        let Some(ctl) = self.0.sink.irqfd_control() else {
            return;
        };
        let Some(Some(i)) = s.irqfds.get_mut(v) else {
            return;
        };
        if i.registered == want {
            return;
        }
        let r = match want {
            true => ctl.register_irqfd(i.gsi, &i.fd),
            false => ctl.unregister_irqfd(i.gsi, &i.fd),
        };
        match r {
            Ok(()) => i.registered = want,
            Err(_) => s.stats.delivery_errors += 1,
        }
    }

    fn deliver_if_pending(&self, s: &mut State, v: usize) {
        let Some(entry) = s.table.get(v).copied() else {
            return;
        };
        if s.deliverable(v) && pending_bit(s, v) {
            set_pending(s, v, false);
            if self.deliver(s, v, entry.message()).is_err() {
                s.stats.delivery_errors += 1;
            }
        }
    }

    /// Serve a guest load from `bar` at `offset` if it falls in the table or PBA; returns whether
    /// it did. Accesses must be 4 or 8 bytes, naturally aligned, inside the structure; others
    /// read all-ones and are counted.
    pub fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        let c = self.0.config;
        if let Some(rel) = inside(bar, offset, c.table_bar, c.table_offset, self.table_len()) {
            let mut s = self.lock();
            match dwords(rel, data.len(), self.table_len()) {
                Some(n) => {
                    for (i, chunk) in data.chunks_exact_mut(4).enumerate().take(n) {
                        let w = rel / 4 + i as u64;
                        chunk.copy_from_slice(&table_dword(&s, w).to_le_bytes());
                    }
                }
                None => {
                    s.stats.bad_accesses += 1;
                    data.fill(0xff);
                }
            }
            return true;
        }
        if let Some(rel) = inside(bar, offset, c.pba_bar, c.pba_offset, self.pba_len()) {
            let mut s = self.lock();
            match dwords(rel, data.len(), self.pba_len()) {
                Some(_) => {
                    let first = (rel / 8) as usize * 64;
                    for v in first..(first + 64).min(s.table.len()) {
                        self.fold(&mut s, v);
                    }
                    let q = s.pending.get((rel / 8) as usize).copied().unwrap_or(0);
                    let bytes = q.to_le_bytes();
                    let start = (rel % 8) as usize;
                    data.copy_from_slice(&bytes[start..start + data.len()]);
                }
                None => {
                    s.stats.bad_accesses += 1;
                    data.fill(0xff);
                }
            }
            return true;
        }
        false
    }

    /// Serve a guest store to `bar` at `offset` if it falls in the table or PBA; returns whether
    /// it did. Invalid accesses (as for [`Msix::bar_read`]) and PBA writes are ignored and counted.
    pub fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) -> bool {
        let c = self.0.config;
        if let Some(rel) = inside(bar, offset, c.table_bar, c.table_offset, self.table_len()) {
            let mut s = self.lock();
            match dwords(rel, data.len(), self.table_len()) {
                Some(n) => {
                    for (i, chunk) in data.chunks_exact(4).enumerate().take(n) {
                        let mut b = [0u8; 4];
                        b.copy_from_slice(chunk);
                        self.write_table_dword(&mut s, rel / 4 + i as u64, u32::from_le_bytes(b));
                    }
                }
                None => s.stats.bad_accesses += 1,
            }
            return true;
        }
        if inside(bar, offset, c.pba_bar, c.pba_offset, self.pba_len()).is_some() {
            self.lock().stats.bad_accesses += 1;
            return true;
        }
        false
    }

    fn write_table_dword(&self, s: &mut State, w: u64, value: u32) {
        let v = (w / 4) as usize;
        let Some(e) = s.table.get_mut(v) else {
            return;
        };
        let old = *e;
        let mut new = old;
        match w % 4 {
            0 => new.addr_lo = value & !0x3,
            1 => new.addr_hi = value,
            2 => new.data = value,
            _ => new.ctrl = (old.ctrl & !MSIX_VECTOR_CTRL_MASK) | (value & MSIX_VECTOR_CTRL_MASK),
        }
        let mask_change = new.masked() != old.masked();
        if mask_change {
            self.fold(s, v);
        }
        if let Some(e) = s.table.get_mut(v) {
            *e = new;
        }
        if new.message() != old.message()
            && let Some(Some(i)) = s.irqfds.get(v)
            && self.0.sink.set_route(i.gsi, Some(new.message())).is_err()
        {
            s.stats.delivery_errors += 1;
        }
        if mask_change {
            self.sync_irqfd(s, v);
        }
        self.deliver_if_pending(s, v);
    }
}

fn pending_bit(s: &State, v: usize) -> bool {
    s.pending
        .get(v / 64)
        .is_some_and(|q| q & (1u64 << (v % 64)) != 0)
}

fn set_pending(s: &mut State, v: usize, on: bool) {
    if let Some(q) = s.pending.get_mut(v / 64) {
        if on {
            *q |= 1 << (v % 64);
        } else {
            *q &= !(1 << (v % 64));
        }
    }
}

fn table_dword(s: &State, w: u64) -> u32 {
    s.table
        .get((w / 4) as usize)
        .map_or(u32::MAX, |e| match w % 4 {
            0 => e.addr_lo,
            1 => e.addr_hi,
            2 => e.data,
            _ => e.ctrl,
        })
}

/// Make `fd` non-blocking, so that folding an empty count never waits.
fn set_nonblocking(fd: &EventFd) -> io::Result<()> {
    // SAFETY: F_GETFL on a descriptor `fd` owns and keeps open; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: F_SETFL with an integer flag argument on the same open descriptor.
        let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// `offset` relative to a structure at `base` (len `len`) in `want_bar`, if it starts inside.
fn inside(bar: u8, offset: u64, want_bar: u8, base: u32, len: u64) -> Option<u64> {
    let rel = offset.checked_sub(base as u64)?;
    (bar == want_bar && rel < len).then_some(rel)
}

/// Number of dwords of a valid access (4 or 8 bytes, aligned, ending inside `len`).
fn dwords(rel: u64, size: usize, len: u64) -> Option<usize> {
    let ok = matches!(size, 4 | 8) && rel.is_multiple_of(size as u64) && rel + size as u64 <= len;
    ok.then_some(size / 4)
}

/// The interrupt handle for one MSI-X vector ([`Msix::vector`]). `trigger` respects masking
/// (pending bit) and uses the vector's irqfd when one is attached; [`InterruptSource::notifier`]
/// exposes that eventfd for hot paths that write it directly. Such writes respect masking too
/// when the sink controls irqfds ([`MsiSink::irqfd_control`], e.g. `KvmIrqRouter`): the irqfd
/// is detached while the vector is masked and its count becomes the pending bit (module docs).
#[derive(Clone)]
pub struct MsixVector {
    msix: Msix,
    vector: u16,
    irqfd: Option<Arc<EventFd>>,
}

impl MsixVector {
    /// The vector number.
    pub fn index(&self) -> u16 {
        self.vector
    }
}

impl InterruptSource for MsixVector {
    fn trigger(&self) -> io::Result<()> {
        self.msix.signal(self.vector)
    }
    fn notifier(&self) -> Option<&EventFd> {
        self.irqfd.as_deref()
    }
}
