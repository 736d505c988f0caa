//! Doorbell ioeventfds that follow their BAR: one observer of the PCI root bus's events.
//!
//! A [`DoorbellBinding`] holds KVM registrations for a function's doorbells at
//! `BAR base + offset`. Registered with [`PciRoot::observe`](vmkit_devices::pci::PciRoot::observe),
//! it learns from the root's [`PciEvent`]s when the guest maps, moves or unmaps that BAR (or the
//! function is unplugged) and moves the registrations with it, so kicks keep bypassing
//! userspace wherever the guest puts the BAR. The transport knows nothing of KVM.

use std::sync::{Mutex, PoisonError};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmkit_devices::pci::{PciEvent, PciObserver, RequesterId};
use vmm_sys_util::eventfd::EventFd;

use crate::notify::{NotifyError, QueueEventFd};

#[derive(Debug)]
struct Doors {
    /// (offset from the BAR base, eventfd, queue).
    doors: Vec<(u64, EventFd, u16)>,
    base: Option<u64>,
    failures: u64,
}

/// The doorbell ioeventfds of BAR `bar` of the function at `rid`, following the BAR.
///
/// The eventfds are duplicates of the ones a `NotifyWorker` waits on; KVM identifies an
/// ioeventfd by its eventfd, not the fd number.
#[derive(Debug)]
pub struct DoorbellBinding {
    vm: VmFd,
    rid: RequesterId,
    bar: u8,
    state: Mutex<Doors>,
}

impl DoorbellBinding {
    /// Take over `fds`, registered (by `register_ioeventfds`, without datamatch) for BAR `bar`
    /// of `rid` at `base`; `vm` is an owned handle to the VM fd (e.g.
    /// `vmkit_devices::kvm_irq::dup_vm_fd`).
    ///
    /// # Errors
    ///
    /// A doorbell below `base`, or duplicating an eventfd failed.
    pub fn new(
        vm: VmFd,
        rid: RequesterId,
        bar: u8,
        fds: &[QueueEventFd],
        base: u64,
    ) -> Result<Self, NotifyError> {
        let mut doors = Vec::with_capacity(fds.len());
        for q in fds {
            let offset = q.addr.checked_sub(base).ok_or(NotifyError::Ioeventfd {
                addr: q.addr,
                source: vmm_sys_util::errno::Error::new(libc::EINVAL),
            })?;
            doors.push((offset, q.fd.try_clone().map_err(NotifyError::Io)?, q.queue));
        }
        Ok(Self {
            vm,
            rid,
            bar,
            state: Mutex::new(Doors {
                doors,
                base: Some(base),
                failures: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Doors> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where the doorbells are registered now (`None` while the BAR is not decoded).
    pub fn base(&self) -> Option<u64> {
        self.lock().base
    }

    /// Registrations that could not be moved (those doorbells then trap, which still works).
    pub fn failures(&self) -> u64 {
        self.lock().failures
    }

    /// Move the registrations to a BAR at `base` (`None`: unregister them).
    pub fn rebind(&self, base: Option<u64>) {
        let mut st = self.lock();
        if base == st.base {
            return;
        }
        let mut failures = 0;
        for (offset, fd, _) in &st.doors {
            if let Some(old) = st.base {
                let a = IoEventAddress::Mmio(old.wrapping_add(*offset));
                if self.vm.unregister_ioevent(fd, &a, NoDatamatch).is_err() {
                    failures += 1;
                }
            }
            if let Some(new) = base {
                let a = IoEventAddress::Mmio(new.wrapping_add(*offset));
                if self.vm.register_ioevent(fd, &a, NoDatamatch).is_err() {
                    failures += 1;
                }
            }
        }
        st.failures += failures;
        st.base = base;
    }
}

impl PciObserver for DoorbellBinding {
    fn pci_event(&self, event: &PciEvent) {
        match event.bar_address(self.rid, self.bar) {
            Some(base) => self.rebind(base),
            None if *event == PciEvent::FunctionRemoved(self.rid) => self.rebind(None),
            None => {}
        }
    }
}
