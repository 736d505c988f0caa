//! Interrupts as a handle: a device gets an [`InterruptSource`], never the VM.
//!
//! A KVM-backed source exposes its [`EventFd`] through [`InterruptSource::notifier`] so it can be
//! registered as an irqfd (the interrupt then reaches the guest without a userspace ioctl); tests
//! use [`RecordingInterrupt`].

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

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

#[cfg(test)]
mod tests {
    use super::*;

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
