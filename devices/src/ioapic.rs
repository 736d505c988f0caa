//! A userspace I/O APIC (Intel 82093AA datasheet; version 0x20 with the EOI register) for KVM's
//! split irqchip: 24 pins, each with a redirection-table entry turned into an MSI message for
//! the in-kernel local APICs.
//!
//! * Edge pins deliver once per rising edge of their line.
//! * Level pins deliver while the line is asserted and remote IRR is clear; delivery sets remote
//!   IRR, and the guest's EOI for the vector ([`Ioapic::end_of_interrupt`], from the vCPU's
//!   `Exit::IoapicEoi` or the EOI register) clears it — redelivering if the line is still high.
//! * Masked pins ignore edges and level changes; unmasking a level pin whose line is asserted
//!   delivers it.
//!
//! Lines are logical (asserted or not); the polarity bit is kept and reported but does not invert
//! them. Each pin's message is published as GSI `pin`'s route ([`MsiSink::set_route`]): that is how
//! KVM's split irqchip learns which level-triggered vectors need an EOI exit.
//!
//! ```
//! use std::sync::Arc;
//! use vmkit_devices::ioapic::{Ioapic, IOREGSEL, IOWIN};
//! use vmkit_devices::msi::RecordingMsiSink;
//! use vmkit_devices::MutBusDevice;
//!
//! let sink = Arc::new(RecordingMsiSink::default());
//! let mut ioapic = Ioapic::new(sink.clone());
//! // The guest programs pin 4: vector 0x24, level, unmasked, destination APIC 0.
//! ioapic.write(IOREGSEL, &[0x10 + 2 * 4]);
//! ioapic.write(IOWIN, &0x0000_8024u32.to_le_bytes());
//! ioapic.set_irq(4, true);
//! ioapic.set_irq(4, true); // still in service: not redelivered
//! assert_eq!(sink.vectors(), [0x24]);
//! ioapic.end_of_interrupt(0x24); // line still high: delivered again
//! assert_eq!(sink.vectors(), [0x24, 0x24]);
//! ```

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::MutBusDevice;
use crate::interrupt::{InterruptSource, IrqLine};
use crate::msi::{DeliveryMode, MsiDelivery, MsiFields, MsiMessage, MsiSink};

/// Number of input pins (and redirection entries).
pub const IOAPIC_NUM_PINS: usize = 24;
/// The conventional MMIO base address.
pub const IOAPIC_DEFAULT_BASE: u64 = 0xfec0_0000;
/// MMIO window length to register on the bus.
pub const IOAPIC_MMIO_SIZE: u64 = 0x1000;
/// I/O register select (MMIO offset).
pub const IOREGSEL: u64 = 0x00;
/// I/O window (MMIO offset).
pub const IOWIN: u64 = 0x10;
/// EOI register of version 0x20 I/O APICs (MMIO offset).
pub const IOAPIC_EOI: u64 = 0x40;
/// Register index: ID.
pub const IOAPICID: u8 = 0x00;
/// Register index: version.
pub const IOAPICVER: u8 = 0x01;
/// Register index: arbitration ID.
pub const IOAPICARB: u8 = 0x02;
/// Register index of the low dword of redirection entry 0 (entry n: `0x10 + 2n`, `0x11 + 2n`).
pub const IOREDTBL: u8 = 0x10;
/// Implementation version reported in IOAPICVER.
pub const IOAPIC_VERSION: u32 = 0x20;

/// Redirection entry bits (82093AA §3.2.4).
pub mod redir {
    /// Vector, bits 7:0.
    pub const VECTOR: u64 = 0xff;
    /// Delivery mode, bits 10:8.
    pub const DELIVERY_MODE_SHIFT: u32 = 8;
    /// Destination mode (1 = logical), bit 11.
    pub const DEST_MODE: u64 = 1 << 11;
    /// Delivery status (read-only), bit 12.
    pub const DELIVERY_STATUS: u64 = 1 << 12;
    /// Interrupt input pin polarity (1 = active low), bit 13.
    pub const POLARITY: u64 = 1 << 13;
    /// Remote IRR (read-only), bit 14.
    pub const REMOTE_IRR: u64 = 1 << 14;
    /// Trigger mode (1 = level), bit 15.
    pub const TRIGGER_MODE: u64 = 1 << 15;
    /// Interrupt mask, bit 16.
    pub const MASK: u64 = 1 << 16;
    /// Destination field, bits 63:56.
    pub const DEST_SHIFT: u32 = 56;
    /// Bits the guest may write.
    pub const WRITABLE: u64 =
        !(DELIVERY_STATUS | REMOTE_IRR) & !(0xff_ffff_ffffu64 << 17) | 0xffu64 << DEST_SHIFT;
}

/// Errors of the I/O APIC's handles.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum IoapicError {
    /// Pin number ≥ 24.
    #[error("no pin {0}")]
    BadPin(u8),
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicStats {
    /// Messages the sink delivered.
    pub delivered: u64,
    /// Messages no local APIC accepted ([`MsiDelivery::Blocked`], e.g. the destination APIC
    /// is software-disabled); a level pin's remote IRR stays clear for them, as no EOI will
    /// come (KVM's own IOAPIC does the same, `ioapic_service`).
    #[serde(default)]
    pub undelivered: u64,
    /// Edges and level asserts ignored because the pin was masked.
    pub masked: u64,
    /// EOIs received (any vector).
    pub eois: u64,
    /// MMIO accesses ignored (bad width/offset, unknown register) and bad pins.
    pub bad_accesses: u64,
    /// Entries with a reserved delivery mode when they fired (not delivered).
    pub bad_entries: u64,
    /// Sink errors.
    pub delivery_errors: u64,
}

/// Saved state (for snapshots).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    /// ID register value (bits 27:24).
    pub id: u32,
    /// Selected register.
    pub ioregsel: u8,
    /// Redirection entries (incl. remote IRR).
    pub redirection: Vec<u64>,
    /// Line levels, bit per pin.
    pub lines: u32,
}

/// The I/O APIC model. Register it on the MMIO bus inside a `Mutex` ([`MutBusDevice`]).
pub struct Ioapic {
    id: u32,
    ioregsel: u8,
    table: [u64; IOAPIC_NUM_PINS],
    lines: u32,
    routes: [Option<MsiMessage>; IOAPIC_NUM_PINS],
    sink: Arc<dyn MsiSink>,
    stats: IoapicStats,
}

impl Ioapic {
    /// An I/O APIC after reset (every pin masked, ID 0) delivering through `sink`.
    pub fn new(sink: Arc<dyn MsiSink>) -> Self {
        Self {
            id: 0,
            ioregsel: 0,
            table: [redir::MASK; IOAPIC_NUM_PINS],
            lines: 0,
            routes: [None; IOAPIC_NUM_PINS],
            sink,
            stats: IoapicStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> IoapicStats {
        self.stats
    }

    /// Redirection entry of `pin` (None for pins ≥ 24).
    pub fn entry(&self, pin: u8) -> Option<u64> {
        self.table.get(pin as usize).copied()
    }

    /// Drive `pin`'s line. Bad pins are counted and ignored.
    pub fn set_irq(&mut self, pin: u8, asserted: bool) {
        let p = pin as usize;
        let Some(&e) = self.table.get(p) else {
            self.stats.bad_accesses += 1;
            return;
        };
        let bit = 1u32 << p;
        let was = self.lines & bit != 0;
        if asserted {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        if !asserted {
            return;
        }
        if e & redir::MASK != 0 {
            self.stats.masked += 1;
            return;
        }
        if e & redir::TRIGGER_MODE == 0 {
            if !was {
                self.deliver(p);
            }
        } else if e & redir::REMOTE_IRR == 0 {
            self.deliver(p);
        }
    }

    /// The guest ended the interrupt with `vector`: clear remote IRR of the level pins using it
    /// and redeliver those whose line is still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        self.stats.eois += 1;
        for p in 0..IOAPIC_NUM_PINS {
            let e = self.table[p];
            if e & redir::VECTOR == vector as u64
                && e & redir::TRIGGER_MODE != 0
                && e & redir::REMOTE_IRR != 0
            {
                self.table[p] &= !redir::REMOTE_IRR;
                self.service_level(p);
            }
        }
    }

    /// Deliver a level pin if its line is high, it is unmasked and remote IRR is clear.
    fn service_level(&mut self, p: usize) {
        let e = self.table[p];
        if e & redir::TRIGGER_MODE != 0
            && e & (redir::MASK | redir::REMOTE_IRR) == 0
            && self.lines & (1 << p) != 0
        {
            self.deliver(p);
        }
    }

    fn message(e: u64) -> Option<MsiMessage> {
        let mode = DeliveryMode::from_bits(((e >> redir::DELIVERY_MODE_SHIFT) & 7) as u8)?;
        Some(MsiMessage::from(MsiFields {
            dest_id: (e >> redir::DEST_SHIFT) as u8,
            redirection_hint: false,
            dest_logical: e & redir::DEST_MODE != 0,
            vector: (e & redir::VECTOR) as u8,
            delivery_mode: mode,
            level_triggered: e & redir::TRIGGER_MODE != 0,
        }))
    }

    fn deliver(&mut self, p: usize) {
        let e = self.table[p];
        let Some(msg) = Self::message(e) else {
            self.stats.bad_entries += 1;
            return;
        };
        match self.sink.deliver(msg) {
            Ok(MsiDelivery::Delivered) => {
                // Set after the send, but no EOI can come in between: it is handled under the
                // same `&mut self`.
                if e & redir::TRIGGER_MODE != 0 {
                    self.table[p] |= redir::REMOTE_IRR;
                }
                self.stats.delivered += 1;
            }
            Ok(MsiDelivery::Blocked) => self.stats.undelivered += 1,
            Err(_) => self.stats.delivery_errors += 1,
        }
    }

    /// Publish pin `p`'s message as GSI `p`'s route when it changed.
    fn update_route(&mut self, p: usize) {
        let msg = Self::message(self.table[p]);
        if self.routes[p] != msg {
            self.routes[p] = msg;
            if self.sink.set_route(p as u32, msg).is_err() {
                self.stats.delivery_errors += 1;
            }
        }
    }

    /// Read the register selected by index `reg` (what IOWIN returns).
    pub fn read_register(&mut self, reg: u8) -> u32 {
        match reg {
            IOAPICID => self.id,
            IOAPICVER => ((IOAPIC_NUM_PINS as u32 - 1) << 16) | IOAPIC_VERSION,
            IOAPICARB => self.id,
            r if r >= IOREDTBL && ((r - IOREDTBL) as usize) < 2 * IOAPIC_NUM_PINS => {
                let i = (r - IOREDTBL) as usize;
                let e = self.table[i / 2];
                if i.is_multiple_of(2) {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => {
                self.stats.bad_accesses += 1;
                0
            }
        }
    }

    /// Write the register selected by index `reg` (what IOWIN does). Read-only bits keep
    /// their value.
    pub fn write_register(&mut self, reg: u8, value: u32) {
        match reg {
            IOAPICID => self.id = value & 0x0f00_0000,
            IOAPICVER | IOAPICARB => {}
            r if r >= IOREDTBL && ((r - IOREDTBL) as usize) < 2 * IOAPIC_NUM_PINS => {
                let i = (r - IOREDTBL) as usize;
                let p = i / 2;
                let old = self.table[p];
                let (shift, half) = if i.is_multiple_of(2) {
                    (0, 0xffff_ffffu64)
                } else {
                    (32, 0xffff_ffffu64 << 32)
                };
                let m = half & redir::WRITABLE;
                let mut e = (old & !m) | (((value as u64) << shift) & m);
                // Switching a pin to edge mode drops a stale remote IRR.
                if e & redir::TRIGGER_MODE == 0 {
                    e &= !redir::REMOTE_IRR;
                }
                self.table[p] = e;
                self.update_route(p);
                self.service_level(p);
            }
            _ => self.stats.bad_accesses += 1,
        }
    }

    /// The state, for snapshots.
    pub fn state(&self) -> IoapicState {
        IoapicState {
            id: self.id,
            ioregsel: self.ioregsel,
            redirection: self.table.to_vec(),
            lines: self.lines,
        }
    }

    /// Restore a snapshot (entries beyond 24 are ignored, missing ones reset) and republish
    /// every route.
    pub fn restore(&mut self, state: &IoapicState) {
        self.id = state.id & 0x0f00_0000;
        self.ioregsel = state.ioregsel;
        self.lines = state.lines & ((1 << IOAPIC_NUM_PINS) - 1);
        for p in 0..IOAPIC_NUM_PINS {
            self.table[p] = state.redirection.get(p).copied().unwrap_or(redir::MASK);
            self.routes[p] = None;
            self.update_route(p);
        }
    }
}

impl MutBusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (IOREGSEL, 1 | 4) => {
                data.fill(0);
                data[0] = self.ioregsel;
            }
            (IOWIN, 4) => {
                let v = self.read_register(self.ioregsel);
                data.copy_from_slice(&v.to_le_bytes());
            }
            _ => {
                self.stats.bad_accesses += 1;
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (IOREGSEL, [sel] | [sel, _, _, _]) => self.ioregsel = *sel,
            (IOWIN, [a, b, c, d]) => {
                self.write_register(self.ioregsel, u32::from_le_bytes([*a, *b, *c, *d]))
            }
            (IOAPIC_EOI, [v] | [v, _, _, _]) => self.end_of_interrupt(*v),
            _ => self.stats.bad_accesses += 1,
        }
    }
}

/// One I/O APIC input line as a device's interrupt handle.
///
/// [`IoapicLine::set_level`] drives the line (level-triggered devices; also through the
/// [`IrqLine`] trait, e.g. as a PCI function's INTx#); [`InterruptSource::trigger`] pulses it
/// (assert then deassert), which is one edge on an edge pin and one delivery on a level pin.
#[derive(Clone)]
pub struct IoapicLine {
    ioapic: Arc<Mutex<Ioapic>>,
    pin: u8,
}

impl IoapicLine {
    /// The line of `pin` (0..24).
    pub fn new(ioapic: Arc<Mutex<Ioapic>>, pin: u8) -> Result<Self, IoapicError> {
        if pin as usize >= IOAPIC_NUM_PINS {
            return Err(IoapicError::BadPin(pin));
        }
        Ok(Self { ioapic, pin })
    }

    /// Assert (`true`) or deassert the line.
    pub fn set_level(&self, asserted: bool) {
        self.ioapic
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_irq(self.pin, asserted)
    }
}

impl InterruptSource for IoapicLine {
    fn trigger(&self) -> std::io::Result<()> {
        let mut io = self.ioapic.lock().unwrap_or_else(|e| e.into_inner());
        io.set_irq(self.pin, true);
        io.set_irq(self.pin, false);
        Ok(())
    }
}

/// The pin as a level-triggered line (what a PCI function's INTx# is wired to).
impl IrqLine for IoapicLine {
    fn set_level(&self, asserted: bool) {
        IoapicLine::set_level(self, asserted)
    }
}

#[cfg(test)]
mod tests;
