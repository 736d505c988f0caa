//! virtio-pci's legacy interrupt (INTx#): the ISR status byte and the level line behind it
//! (virtio 1.2 §4.1.4.5, §4.1.5.3, §4.1.5.4; PCI 3.0 §6.2.2, §6.2.3, §6.8.3.3).
//!
//! The function's INTx state is *pending* (the PCI status register's Interrupt Status bit): set
//! when a notification goes out as INTx (MSI-X disabled), cleared by a driver read of the ISR
//! (which also clears the ISR bits), by a device reset and by MSI-X becoming enabled (a
//! function enabled for MSI-X must not use its pin). The line is `pending && !Interrupt
//! Disable`: setting the command register's Interrupt Disable bit drops the line but keeps
//! pending, clearing it raises the line again if still pending. The line is driven only on a
//! change, under one lock with the ISR updates, so a notification racing an ISR read can never
//! leave the line high with the ISR empty.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmkit_devices::IrqLine;

#[derive(Default)]
struct State {
    line: Option<Arc<dyn IrqLine>>,
    /// PCI Interrupt Status.
    pending: bool,
    /// Command register Interrupt Disable.
    disabled: bool,
    /// What the line was last set to.
    level: bool,
}

/// The ISR status byte and the INTx line it drives (when one is wired).
#[derive(Default)]
pub(crate) struct Intx {
    isr: AtomicU8,
    /// A line is wired (checked without the lock on the MSI-X path).
    wired: AtomicBool,
    state: Mutex<State>,
}

impl Intx {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drive the line to `pending && !disabled` if that changed.
    fn sync(s: &mut State) {
        let want = s.pending && !s.disabled;
        if let Some(line) = &s.line
            && want != s.level
        {
            s.level = want;
            line.set_level(want);
        }
    }

    /// Wire `line` (replacing and deasserting a previous one); `intx_disabled` is the
    /// function's current Interrupt Disable bit.
    pub fn wire(&self, line: Arc<dyn IrqLine>, intx_disabled: bool) {
        let mut s = self.lock();
        if let Some(old) = s.line.take()
            && s.level
        {
            old.set_level(false);
        }
        s.level = false;
        s.line = Some(line);
        s.disabled = intx_disabled;
        self.wired.store(true, Ordering::Release);
        Self::sync(&mut s);
    }

    /// Whether a line is wired.
    pub fn wired(&self) -> bool {
        self.wired.load(Ordering::Acquire)
    }

    /// A notification with ISR bit `bit`: sets it; with a line wired and MSI-X disabled
    /// (`msix_enabled`, asked under the lock so an MSI-X enable cannot slip in between), the
    /// function becomes pending and the line rises (unless disabled). Returns whether it went
    /// out as INTx (otherwise the caller signals the MSI-X vector).
    pub fn notify(&self, bit: u8, msix_enabled: impl FnOnce() -> bool) -> bool {
        if !self.wired() {
            self.isr.fetch_or(bit, Ordering::AcqRel);
            return false;
        }
        let mut s = self.lock();
        self.isr.fetch_or(bit, Ordering::AcqRel);
        if msix_enabled() {
            return false;
        }
        s.pending = true;
        Self::sync(&mut s);
        true
    }

    /// A driver read of the ISR: returns and clears it, clears pending, drops the line.
    pub fn read_isr(&self) -> u8 {
        if !self.wired() {
            return self.isr.swap(0, Ordering::AcqRel);
        }
        let mut s = self.lock();
        let v = self.isr.swap(0, Ordering::AcqRel);
        s.pending = false;
        Self::sync(&mut s);
        v
    }

    /// The ISR without clearing it (not a driver access).
    pub fn peek_isr(&self) -> u8 {
        self.isr.load(Ordering::Acquire)
    }

    /// Device reset: ISR 0, not pending, line low.
    pub fn reset(&self) {
        let mut s = self.lock();
        self.isr.store(0, Ordering::Release);
        s.pending = false;
        Self::sync(&mut s);
    }

    /// The configuration space changed: the new MSI-X enable and Interrupt Disable bits.
    /// MSI-X enabled ends INTx use (PCI 3.0 §6.8.3.3): pending clears, the line drops.
    pub fn config_changed(&self, msix_enabled: bool, intx_disabled: bool) {
        if !self.wired() {
            return;
        }
        let mut s = self.lock();
        s.disabled = intx_disabled;
        if msix_enabled {
            s.pending = false;
        }
        Self::sync(&mut s);
    }

    /// The PCI status register's Interrupt Status: pending, whether or not Interrupt Disable
    /// masks the line (PCI 3.0 §6.2.3).
    pub fn pending(&self) -> bool {
        self.wired() && self.lock().pending
    }

    /// Whether the line is asserted.
    pub fn level(&self) -> bool {
        self.wired() && self.lock().level
    }
}

#[cfg(test)]
mod tests {
    use vmkit_devices::interrupt::RecordingIrqLine;

    use super::*;

    fn wired() -> (Intx, Arc<RecordingIrqLine>) {
        let line = Arc::new(RecordingIrqLine::default());
        let i = Intx::default();
        i.wire(line.clone(), false);
        (i, line)
    }

    #[test]
    fn unwired_is_only_the_isr() {
        let i = Intx::default();
        assert!(!i.notify(1, || false));
        assert!(!i.notify(2, || false));
        assert!(!i.pending() && !i.level());
        assert_eq!(i.peek_isr(), 3);
        assert_eq!(i.read_isr(), 3);
        assert_eq!(i.read_isr(), 0);
        i.config_changed(false, true);
        i.notify(1, || false);
        i.reset();
        assert_eq!(i.peek_isr(), 0);
    }

    #[test]
    fn notify_asserts_once_and_isr_read_deasserts() {
        let (i, line) = wired();
        assert!(i.notify(1, || false));
        assert!(i.notify(2, || false));
        assert!(line.level() && i.pending() && i.level());
        assert_eq!((line.asserts(), line.calls()), (1, 1));
        assert_eq!(i.read_isr(), 3);
        assert!(!line.level() && !i.pending());
        assert_eq!(i.read_isr(), 0);
        assert_eq!((line.asserts(), line.deasserts(), line.calls()), (1, 1, 2));
    }

    #[test]
    fn interrupt_disable_masks_the_line_not_pending() {
        let (i, line) = wired();
        i.config_changed(false, true);
        i.notify(1, || false);
        assert!(i.pending() && !line.level());
        i.config_changed(false, false);
        assert!(line.level());
        i.config_changed(false, true);
        assert!(!line.level() && i.pending());
        // Acknowledged while masked: unmasking raises nothing.
        assert_eq!(i.read_isr(), 1);
        i.config_changed(false, false);
        assert!(!line.level());
        assert_eq!((line.asserts(), line.deasserts()), (1, 1));
    }

    #[test]
    fn msix_enable_ends_intx_use() {
        let (i, line) = wired();
        i.notify(1, || false);
        i.config_changed(true, false);
        assert!(!line.level() && !i.pending());
        assert!(!i.notify(1, || true)); // MSI-X path: ISR bit only
        assert!(!line.level());
        i.config_changed(false, false);
        assert!(!line.level(), "stale ISR bits raise nothing");
        assert_eq!(i.read_isr(), 1);
        assert!(i.notify(2, || false));
        assert!(line.level());
    }

    #[test]
    fn reset_and_rewire_deassert() {
        let (i, line) = wired();
        i.notify(1, || false);
        i.reset();
        assert!(!line.level() && !i.pending());
        assert_eq!(i.peek_isr(), 0);
        i.notify(1, || false);
        let other = Arc::new(RecordingIrqLine::default());
        i.wire(other.clone(), false);
        assert!(!line.level(), "the old line is released low");
        assert!(other.level(), "still pending: the new line rises");
    }
}
