//! Interrupts as a handle: a device gets an [`InterruptSource`], never the VM.
//!
//! A KVM-backed source exposes its [`EventFd`] through [`InterruptSource::notifier`] so it can be
//! registered as an irqfd (the interrupt then reaches the guest without a userspace ioctl); tests
//! use [`RecordingInterrupt`].
//!
//! A level-triggered line (PCI INTx#, an I/O APIC input) is an [`IrqLine`]: the device holds it
//! asserted while it has an interrupt pending and deasserts it when the driver acknowledges.
//! [`IoapicLine`](crate::ioapic::IoapicLine) drives a userspace I/O APIC pin; tests use
//! [`RecordingIrqLine`].

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Something a device can raise.
pub trait InterruptSource: Send + Sync {
    /// Raise the interrupt (edge: one event; level: assert).
    fn trigger(&self) -> io::Result<()>;

    /// The eventfd behind the interrupt, if it has one (for KVM irqfd registration).
    fn notifier(&self) -> Option<&EventFd> {
        None
    }
}

/// An interrupt that goes nowhere (for devices whose interrupt the VMM does not wire).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoInterrupt;

impl InterruptSource for NoInterrupt {
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Counts triggers; for tests and the examples' statistics.
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    count: AtomicU64,
}

impl RecordingInterrupt {
    /// Triggers so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }
}

impl InterruptSource for RecordingInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.count.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// An interrupt backed by an eventfd (register it with KVM as an irqfd for a GSI).
#[derive(Debug)]
pub struct EventFdInterrupt(EventFd);

impl EventFdInterrupt {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self(EventFd::new(libc_efd_nonblock())?))
    }

    /// Wrap an existing eventfd.
    pub fn from_eventfd(fd: EventFd) -> Self {
        Self(fd)
    }
}

fn libc_efd_nonblock() -> i32 {
    vmm_sys_util::eventfd::EFD_NONBLOCK
}

impl InterruptSource for EventFdInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
    fn notifier(&self) -> Option<&EventFd> {
        Some(&self.0)
    }
}

/// A level-triggered interrupt line a device drives (PCI 3.0 §2.2.6 INTx#, an I/O APIC pin).
///
/// ```
/// use vmkit_devices::interrupt::{IrqLine, RecordingIrqLine};
///
/// let line = RecordingIrqLine::default();
/// line.set_level(true);
/// line.set_level(true); // already high: no new edge
/// line.set_level(false);
/// assert_eq!((line.level(), line.asserts(), line.deasserts(), line.calls()), (false, 1, 1, 3));
/// ```
pub trait IrqLine: Send + Sync {
    /// Assert (`true`) or deassert the line. Setting the level it already has is allowed and
    /// changes nothing.
    fn set_level(&self, asserted: bool);
}

/// Records a line's level and its transitions; for tests.
#[derive(Debug, Default)]
pub struct RecordingIrqLine {
    level: AtomicBool,
    asserts: AtomicU64,
    deasserts: AtomicU64,
    calls: AtomicU64,
}

impl RecordingIrqLine {
    /// Whether the line is asserted now.
    pub fn level(&self) -> bool {
        self.level.load(Ordering::Acquire)
    }

    /// Rising edges (low to high) so far.
    pub fn asserts(&self) -> u64 {
        self.asserts.load(Ordering::Acquire)
    }

    /// Falling edges (high to low) so far.
    pub fn deasserts(&self) -> u64 {
        self.deasserts.load(Ordering::Acquire)
    }

    /// [`IrqLine::set_level`] calls so far, including ones that kept the level.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Acquire)
    }
}

impl IrqLine for RecordingIrqLine {
    fn set_level(&self, asserted: bool) {
        self.calls.fetch_add(1, Ordering::AcqRel);
        let was = self.level.swap(asserted, Ordering::AcqRel);
        match (was, asserted) {
            (false, true) => self.asserts.fetch_add(1, Ordering::AcqRel),
            (true, false) => self.deasserts.fetch_add(1, Ordering::AcqRel),
            _ => 0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_irq_line_counts_edges_not_calls() {
        let l = RecordingIrqLine::default();
        assert!(!l.level());
        l.set_level(false); // already low
        assert_eq!((l.asserts(), l.deasserts(), l.calls()), (0, 0, 1));
        for _ in 0..2 {
            l.set_level(true);
            l.set_level(true);
            assert!(l.level());
            l.set_level(false);
        }
        assert_eq!(
            (l.level(), l.asserts(), l.deasserts(), l.calls()),
            (false, 2, 2, 7)
        );
        let dynamic: &dyn IrqLine = &l;
        dynamic.set_level(true);
        assert!(l.level());
    }

    #[test]
    fn recording_and_eventfd_sources() {
        let r = RecordingInterrupt::default();
        r.trigger().unwrap();
        r.trigger().unwrap();
        assert_eq!(r.count(), 2);
        assert!(r.notifier().is_none());
        let e = EventFdInterrupt::new().unwrap();
        e.trigger().unwrap();
        e.trigger().unwrap();
        assert_eq!(e.notifier().unwrap().read().unwrap(), 2);
    }
}
