//! A 16550A UART on the PIO bus (the register model is vm-superio's), writing guest output to any
//! `io::Write` and raising its interrupt through an [`InterruptSource`].

use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use vm_superio::{Trigger, serial::NoEvents};

use crate::{BusDevice, InterruptSource};

/// Number of byte registers a 16550 decodes (register it with this length).
pub const SERIAL_PORT_LEN: u64 = 8;

/// vm-superio's interrupt hook, forwarding to an [`InterruptSource`].
pub struct SerialTrigger(Arc<dyn InterruptSource>);

impl Trigger for SerialTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// A 16550A UART as a bus device. Multi-byte accesses are split into byte accesses to
/// consecutive registers; a failing writer or interrupt never reaches the guest as an error.
pub struct Serial<W: Write + Send> {
    inner: Mutex<vm_superio::Serial<SerialTrigger, NoEvents, W>>,
}

impl<W: Write + Send> Serial<W> {
    /// A UART that writes transmitted bytes to `out` and raises `irq`.
    pub fn new(irq: Arc<dyn InterruptSource>, out: W) -> Self {
        Self {
            inner: Mutex::new(vm_superio::Serial::new(SerialTrigger(irq), out)),
        }
    }

    /// Queue bytes for the guest to receive (RBR); returns how many fit in the FIFO.
    pub fn enqueue_input(&self, bytes: &[u8]) -> usize {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = bytes.len().min(s.fifo_capacity());
        s.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }

    /// Run `f` on the output writer (e.g. to collect what a test guest printed).
    pub fn with_writer<R>(&self, f: impl FnOnce(&mut W) -> R) -> R {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(s.writer_mut())
    }
}

impl<W: Write + Send> BusDevice for Serial<W> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in data.iter_mut().enumerate() {
            *b = match u8::try_from(offset.saturating_add(i as u64)) {
                Ok(reg) if (reg as u64) < SERIAL_PORT_LEN => s.read(reg),
                _ => 0xff,
            };
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (i, &b) in data.iter().enumerate() {
            if let Ok(reg) = u8::try_from(offset.saturating_add(i as u64))
                && (reg as u64) < SERIAL_PORT_LEN
            {
                // A host-side write or interrupt failure is not the guest's business.
                let _ = s.write(reg, b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::RecordingInterrupt;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn transmits_and_raises_thr_empty_interrupt() {
        let irq = Arc::new(RecordingInterrupt::default());
        let s = Serial::new(irq.clone(), Vec::new());
        s.write(IER, &[0x02]); // enable THR-empty interrupt
        s.write(THR, b"h");
        s.write(THR, b"i");
        s.write(THR, b"!");
        assert_eq!(s.with_writer(|w| w.clone()), b"hi!");
        // A 2-byte access covers THR and IER, like `out dx, ax` on real hardware.
        s.write(THR, &[b'?', 0x02]);
        assert_eq!(s.with_writer(|w| w.clone()), b"hi!?");
        assert!(irq.count() > 0, "THR-empty interrupt raised");
        let mut lsr = [0u8];
        s.read(LSR, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }

    #[test]
    fn receives_queued_input_and_ignores_out_of_range() {
        let s = Serial::new(Arc::new(crate::interrupt::NoInterrupt), io::sink());
        assert_eq!(s.enqueue_input(b"ok"), 2);
        let mut b = [0u8; 1];
        s.read(THR, &mut b);
        assert_eq!(&b, b"o");
        let mut wide = [0u8; 4];
        s.read(6, &mut wide); // registers 6, 7 then two bytes past the UART
        assert_eq!(&wide[2..], &[0xff, 0xff]);
        s.write(u64::MAX, &[1, 2]);
    }
}
