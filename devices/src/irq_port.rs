//! A port through which a test device — or a test guest — drives I/O APIC input lines:
//! [`IrqLinePort`]. Writing one byte `level << 7 | pin` sets `pin`'s line to `level`; reading
//! four bytes returns the line levels (bit per pin). Test kernels use it the way they use
//! QEMU's `isa-debug-exit`: to raise and lower level or edge interrupts without modelling a
//! device.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use vmkit_devices::BusDevice;
//! use vmkit_devices::ioapic::Ioapic;
//! use vmkit_devices::irq_port::IrqLinePort;
//! use vmkit_devices::msi::RecordingMsiSink;
//!
//! let ioapic = Arc::new(Mutex::new(Ioapic::new(Arc::new(RecordingMsiSink::default()))));
//! let port = IrqLinePort::new(ioapic.clone());
//! port.write(0, &[0x80 | 5]); // assert pin 5
//! let mut lines = [0u8; 4];
//! port.read(0, &mut lines);
//! assert_eq!(u32::from_le_bytes(lines), 1 << 5);
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::BusDevice;
use crate::ioapic::{IOAPIC_NUM_PINS, Ioapic};

/// Bit 7 of a written byte: the level.
pub const IRQ_PORT_LEVEL: u8 = 0x80;

/// The line port (register it on the PIO bus, 4 ports wide for the read).
pub struct IrqLinePort {
    ioapic: Arc<Mutex<Ioapic>>,
    bad_accesses: AtomicU64,
}

impl IrqLinePort {
    /// A port driving `ioapic`'s lines.
    pub fn new(ioapic: Arc<Mutex<Ioapic>>) -> Self {
        Self {
            ioapic,
            bad_accesses: AtomicU64::new(0),
        }
    }

    /// Accesses ignored: other widths or offsets than a 1-byte write / 4-byte read at 0, and
    /// pins ≥ 24 (also counted by the IOAPIC as bad pins).
    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses.load(Ordering::Relaxed)
    }

    fn ioapic(&self) -> std::sync::MutexGuard<'_, Ioapic> {
        self.ioapic.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BusDevice for IrqLinePort {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.ioapic().state().lines.to_le_bytes());
        } else {
            self.bad_accesses.fetch_add(1, Ordering::Relaxed);
            data.fill(0xff);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, &[v]) if usize::from(v & !IRQ_PORT_LEVEL) < IOAPIC_NUM_PINS => {
                self.ioapic()
                    .set_irq(v & !IRQ_PORT_LEVEL, v & IRQ_PORT_LEVEL != 0);
            }
            _ => {
                self.bad_accesses.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msi::RecordingMsiSink;

    #[test]
    fn drives_lines_and_refuses_bad_accesses() {
        let sink = Arc::new(RecordingMsiSink::default());
        let ioapic = Arc::new(Mutex::new(Ioapic::new(sink.clone())));
        ioapic.lock().unwrap().write_register(0x10 + 2 * 3, 0x31); // pin 3: edge, vector 0x31
        let port = IrqLinePort::new(ioapic.clone());
        port.write(0, &[IRQ_PORT_LEVEL | 3]);
        port.write(0, &[3]);
        port.write(0, &[IRQ_PORT_LEVEL | 3]);
        assert_eq!(sink.sent().len(), 2, "two rising edges");
        // Bad: pin 24, 2-byte write, offset 1, 1-byte read.
        port.write(0, &[IRQ_PORT_LEVEL | 24]);
        port.write(0, &[3, 0]);
        port.write(1, &[3]);
        let mut b = [0u8; 1];
        port.read(0, &mut b);
        assert_eq!(b, [0xff]);
        assert_eq!(port.bad_accesses(), 4);
        let mut lines = [0u8; 4];
        port.read(0, &mut lines);
        assert_eq!(u32::from_le_bytes(lines), 1 << 3);
        assert_eq!(ioapic.lock().unwrap().stats().bad_accesses, 0);
    }
}
