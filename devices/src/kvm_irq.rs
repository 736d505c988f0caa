//! KVM plumbing for interrupts: the split irqchip (local APICs in the kernel, the
//! [`Ioapic`](crate::ioapic::Ioapic) in userspace), the GSI routing table, `KVM_SIGNAL_MSI`, and
//! irqfds for MSI-X vectors.
//!
//! [`KvmIrqRouter`] owns the VM's whole GSI routing table (KVM_SET_GSI_ROUTING replaces it at
//! once, so there must be a single owner). GSIs `0..24` are the IOAPIC pins — their MSI routes
//! tell KVM which level-triggered vectors need a `KVM_EXIT_IOAPIC_EOI` — and GSIs from 24 on are
//! handed out for irqfds. As an [`MsiSink`] it delivers with `KVM_SIGNAL_MSI` and keeps routes.
//!
//! Wiring a VM (before creating vCPUs):
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! use vmkit_devices::ioapic::{Ioapic, IOAPIC_DEFAULT_BASE, IOAPIC_MMIO_SIZE};
//! use vmkit_devices::kvm_irq::{KvmIrqRouter, enable_split_irqchip, run_split_irqchip};
//! use vmkit_devices::IoBuses;
//! use vmkit_vcpu::{ExitStats, KvmVm, RunOutcome, StopHandle};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let vm = KvmVm::new()?;
//! enable_split_irqchip(&vm)?;
//! let router = KvmIrqRouter::new(&vm)?;
//! let ioapic = Arc::new(Mutex::new(Ioapic::new(router.clone())));
//! let buses = Arc::new(IoBuses::default());
//! buses.mmio.insert(IOAPIC_DEFAULT_BASE, IOAPIC_MMIO_SIZE, "ioapic", ioapic.clone())?;
//! let mut vcpu = vm.create_vcpu(0)?;
//! // MSI-X: `router.attach_msix(&msix)?` gives every vector an irqfd.
//! // ... load a guest, apply an entry state ...
//! let stop = StopHandle::new();
//! let mut stats = ExitStats::default();
//! // EOIs of level-triggered vectors go to the IOAPIC; kicks re-enter; a stop ends the loop.
//! match run_split_irqchip(&mut vcpu, &*buses, &stop, &mut stats, &*ioapic)? {
//!     RunOutcome::Stopped(status) => println!("stopped: {status}"),
//!     RunOutcome::Exit(exit) => println!("for the VMM to decide: {exit:?}"),
//! }
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI, KvmIrqRouting, kvm_enable_cap,
    kvm_irq_routing_entry, kvm_msi,
};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vmkit_vcpu::{Exit, ExitStats, IoHandler, KvmVm, RunOutcome, StopHandle, VcpuRun};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::interrupt::InterruptSource;
use crate::ioapic::{IOAPIC_NUM_PINS, Ioapic};
use crate::msi::{IrqfdControl, MsiDelivery, MsiMessage, MsiSink};
use crate::pci::Msix;

/// The first GSI [`KvmIrqRouter::allocate_gsi`] hands out (after the IOAPIC pins).
pub const FIRST_MSI_GSI: u32 = IOAPIC_NUM_PINS as u32;

/// Errors of the KVM interrupt plumbing.
#[derive(Debug, Error)]
pub enum KvmIrqError {
    /// An ioctl failed.
    #[error("{op} failed")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Duplicating the VM fd or creating an eventfd failed.
    #[error("fd setup failed")]
    Io(#[source] io::Error),
    /// No GSI left (KVM allows 4096 routes here).
    #[error("no free GSI")]
    NoGsi,
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmIrqError {
    move |source| KvmIrqError::Kvm { op, source }
}

/// Enable `KVM_CAP_SPLIT_IRQCHIP` with [`IOAPIC_NUM_PINS`] routes reserved for the userspace
/// IOAPIC. Call before creating vCPUs. The LAPICs (and `hlt`) are then handled in the kernel.
pub fn enable_split_irqchip(vm: &KvmVm) -> Result<(), KvmIrqError> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    cap.args[0] = IOAPIC_NUM_PINS as u64;
    vm.fd()
        .enable_cap(&cap)
        .map_err(kvm("KVM_ENABLE_CAP(SPLIT_IRQCHIP)"))
}

/// A second, independently owned handle to `vm`'s VM fd (`dup`), for code that must issue VM
/// ioctls (irqfd, ioeventfd, routing) without borrowing the [`KvmVm`].
pub fn dup_vm_fd(vm: &KvmVm) -> Result<VmFd, KvmIrqError> {
    // SAFETY: the raw fd belongs to `vm`'s open `VmFd`, which outlives this borrow.
    let borrowed = unsafe { BorrowedFd::borrow_raw(vm.fd().as_raw_fd()) };
    let owned = borrowed.try_clone_to_owned().map_err(KvmIrqError::Io)?;
    // SAFETY: `owned` is a fresh duplicate of a live KVM VM fd; its ownership passes to the new
    // `VmFd`, which closes it on drop, and nothing else uses the raw number.
    unsafe { vm.kvm().create_vmfd_from_rawfd(owned.into_raw_fd()) }.map_err(kvm("dup VM fd"))
}

/// The VM's GSI routing table, `KVM_SIGNAL_MSI` and irqfd registration (see the module docs).
pub struct KvmIrqRouter {
    vm: VmFd,
    routes: Mutex<BTreeMap<u32, kvm_irq_routing_entry>>,
    next_gsi: AtomicU32,
}

impl KvmIrqRouter {
    /// A router for `vm`, holding its own duplicate of the VM fd (so it can live in devices
    /// while the VMM keeps the [`KvmVm`]).
    pub fn new(vm: &KvmVm) -> Result<Arc<Self>, KvmIrqError> {
        Ok(Arc::new(Self {
            vm: dup_vm_fd(vm)?,
            routes: Mutex::default(),
            next_gsi: AtomicU32::new(FIRST_MSI_GSI),
        }))
    }

    /// The router's VM fd (e.g. to register ioeventfds from a device thread).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// A GSI for an irqfd (from [`FIRST_MSI_GSI`] on).
    pub fn allocate_gsi(&self) -> Result<u32, KvmIrqError> {
        let gsi = self.next_gsi.fetch_add(1, Ordering::Relaxed);
        if gsi >= 4096 {
            return Err(KvmIrqError::NoGsi);
        }
        Ok(gsi)
    }

    /// A new non-blocking eventfd registered as the irqfd of `gsi`.
    pub fn irqfd(&self, gsi: u32) -> Result<EventFd, KvmIrqError> {
        let fd = EventFd::new(EFD_NONBLOCK).map_err(KvmIrqError::Io)?;
        self.vm.register_irqfd(&fd, gsi).map_err(kvm("KVM_IRQFD"))?;
        Ok(fd)
    }

    /// An interrupt that delivers `msg` through an irqfd on a fresh GSI routed to `msg`
    /// (no exit and no ioctl per interrupt).
    pub fn msi_irqfd(&self, msg: MsiMessage) -> Result<IrqfdInterrupt, KvmIrqError> {
        let gsi = self.allocate_gsi()?;
        self.set_route(gsi, Some(msg)).map_err(KvmIrqError::Io)?;
        Ok(IrqfdInterrupt {
            gsi,
            fd: self.irqfd(gsi)?,
        })
    }

    /// Give every vector of `msix` an irqfd on a fresh GSI ([`Msix::attach_irqfd`]); the table
    /// entries' messages then follow into the GSI routes, and `msix` attaches each irqfd to KVM
    /// only while its vector is unmasked ([`IrqfdControl`]). Call before taking
    /// [`Msix::vector`] handles.
    pub fn attach_msix(&self, msix: &Msix) -> Result<(), KvmIrqError> {
        for v in 0..msix.config().vectors {
            let gsi = self.allocate_gsi()?;
            let fd = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(KvmIrqError::Io)?);
            msix.attach_irqfd(v, gsi, fd).map_err(KvmIrqError::Io)?;
        }
        Ok(())
    }

    /// Deliver `msg` with `KVM_SIGNAL_MSI` and report KVM's answer: a positive return is
    /// [`MsiDelivery::Delivered`], 0 is [`MsiDelivery::Blocked`] (no APIC accepted it).
    ///
    /// # Errors
    /// [`KvmIrqError::Kvm`] when the ioctl fails (e.g. no in-kernel LAPIC).
    pub fn signal_msi(&self, msg: MsiMessage) -> Result<MsiDelivery, KvmIrqError> {
        let m = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        let accepted = self.vm.signal_msi(m).map_err(kvm("KVM_SIGNAL_MSI"))?;
        Ok(if accepted > 0 {
            MsiDelivery::Delivered
        } else {
            MsiDelivery::Blocked
        })
    }

    fn commit(&self, routes: &BTreeMap<u32, kvm_irq_routing_entry>) -> io::Result<()> {
        let entries: Vec<_> = routes.values().copied().collect();
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.vm.set_gsi_routing(&table).map_err(io::Error::from)
    }
}

impl MsiSink for KvmIrqRouter {
    fn send(&self, msg: MsiMessage) -> io::Result<()> {
        self.deliver(msg).map(|_| ())
    }

    fn deliver(&self, msg: MsiMessage) -> io::Result<MsiDelivery> {
        self.signal_msi(msg).map_err(io::Error::other)
    }

    fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        match msg {
            Some(m) => {
                let mut e = kvm_irq_routing_entry {
                    gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                e.u.msi.address_lo = m.address as u32;
                e.u.msi.address_hi = (m.address >> 32) as u32;
                e.u.msi.data = m.data;
                routes.insert(gsi, e);
            }
            None => {
                routes.remove(&gsi);
            }
        }
        self.commit(&routes)
    }

    fn irqfd_control(&self) -> Option<&dyn IrqfdControl> {
        Some(self)
    }
}

impl IrqfdControl for KvmIrqRouter {
    fn register_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()> {
        self.vm.register_irqfd(fd, gsi).map_err(io::Error::from)
    }

    fn unregister_irqfd(&self, gsi: u32, fd: &EventFd) -> io::Result<()> {
        self.vm.unregister_irqfd(fd, gsi).map_err(io::Error::from)
    }
}

/// An MSI delivered through a KVM irqfd ([`KvmIrqRouter::msi_irqfd`]).
#[derive(Debug)]
pub struct IrqfdInterrupt {
    gsi: u32,
    fd: EventFd,
}

impl IrqfdInterrupt {
    /// The GSI the eventfd is registered for.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }
}

impl InterruptSource for IrqfdInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.fd.write(1)
    }
    fn notifier(&self) -> Option<&EventFd> {
        Some(&self.fd)
    }
}

/// An MSI delivered with a `KVM_SIGNAL_MSI` ioctl per trigger (the fallback without irqfd).
pub struct SignalMsiInterrupt {
    router: Arc<KvmIrqRouter>,
    msg: MsiMessage,
}

impl SignalMsiInterrupt {
    /// Deliver `msg` through `router`.
    pub fn new(router: Arc<KvmIrqRouter>, msg: MsiMessage) -> Self {
        Self { router, msg }
    }
}

impl InterruptSource for SignalMsiInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.router.send(self.msg)
    }
}

/// Where [`run_split_irqchip`] forwards `KVM_EXIT_IOAPIC_EOI`: the userspace IOAPIC (a
/// `Mutex<Ioapic>`, as it sits on the MMIO bus), or a wrapper around it that also observes.
pub trait EoiTarget {
    /// The guest's local APIC ended the level-triggered interrupt `vector`.
    fn end_of_interrupt(&self, vector: u8);
}

impl EoiTarget for Mutex<Ioapic> {
    fn end_of_interrupt(&self, vector: u8) {
        self.lock()
            .unwrap_or_else(|e| e.into_inner())
            .end_of_interrupt(vector);
    }
}

impl<T: EoiTarget + ?Sized> EoiTarget for Arc<T> {
    fn end_of_interrupt(&self, vector: u8) {
        (**self).end_of_interrupt(vector)
    }
}

/// The run loop of a split-irqchip VMM: [`vmkit_vcpu::run_until_exit`] (guest I/O to `io`,
/// every exit counted in `stats`) plus what every such VMM needs around it — an
/// `IoapicEoi { vector }` exit is forwarded to `eoi` (which redelivers a level line that is
/// still asserted), an interrupted run (`Exit::Interrupted`: a signal or a kick) is re-entered
/// after `stop` is checked again, and a [`StopHandle`] request ends the loop. Any other exit
/// is returned for the caller to decide.
///
/// # Errors
/// The vCPU backend fails (`KVM_RUN` with an error other than EINTR/EAGAIN).
pub fn run_split_irqchip<V, H, E>(
    vcpu: &mut V,
    io: &H,
    stop: &StopHandle,
    stats: &mut ExitStats,
    eoi: &E,
) -> Result<RunOutcome, vmkit_vcpu::Error>
where
    V: VcpuRun + ?Sized,
    H: IoHandler + ?Sized,
    E: EoiTarget + ?Sized,
{
    loop {
        match vmkit_vcpu::run_until_exit(vcpu, io, stop, stats)? {
            RunOutcome::Exit(Exit::IoapicEoi { vector }) => eoi.end_of_interrupt(vector),
            RunOutcome::Exit(Exit::Interrupted) => {}
            outcome => return Ok(outcome),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use vmkit_vcpu::{ExitKind, VcpuExit};

    /// A vCPU replaying exits; after the script it reports `Hlt`.
    struct Script(Vec<Exit>);

    impl VcpuRun for Script {
        fn run(&mut self) -> Result<VcpuExit<'_>, vmkit_vcpu::Error> {
            Ok(VcpuExit::Other(if self.0.is_empty() {
                Exit::Hlt
            } else {
                self.0.remove(0)
            }))
        }
    }

    struct NoIo;
    impl IoHandler for NoIo {
        fn pio_read(&self, _: u16, data: &mut [u8]) {
            data.fill(0xff)
        }
        fn pio_write(&self, _: u16, _: &[u8]) {}
        fn mmio_read(&self, _: u64, data: &mut [u8]) {
            data.fill(0xff)
        }
        fn mmio_write(&self, _: u64, _: &[u8]) {}
    }

    #[derive(Default)]
    struct Eois(RefCell<Vec<u8>>, Option<StopHandle>);
    impl EoiTarget for Eois {
        fn end_of_interrupt(&self, vector: u8) {
            self.0.borrow_mut().push(vector);
            if let Some(stop) = &self.1 {
                stop.request(9);
            }
        }
    }

    #[test]
    fn eois_are_forwarded_and_interrupted_runs_reentered() {
        let mut v = Script(vec![
            Exit::IoapicEoi { vector: 0x30 },
            Exit::Interrupted,
            Exit::IoapicEoi { vector: 0x31 },
            Exit::Shutdown,
        ]);
        let eois = Eois::default();
        let mut stats = ExitStats::default();
        let out = run_split_irqchip(&mut v, &NoIo, &StopHandle::new(), &mut stats, &eois);
        assert_eq!(out.unwrap(), RunOutcome::Exit(Exit::Shutdown));
        assert_eq!(*eois.0.borrow(), [0x30, 0x31]);
        assert_eq!(stats.get(ExitKind::IoapicEoi), 2);
        assert_eq!(stats.total(), 4);
    }

    #[test]
    fn a_stop_requested_while_handling_an_eoi_ends_the_loop() {
        let stop = StopHandle::new();
        let mut v = Script(vec![Exit::IoapicEoi { vector: 0x30 }, Exit::Interrupted]);
        let eois = Eois(RefCell::default(), Some(stop.clone()));
        let mut stats = ExitStats::default();
        let out = run_split_irqchip(&mut v, &NoIo, &stop, &mut stats, &eois).unwrap();
        assert_eq!(out, RunOutcome::Stopped(9));
        assert_eq!(stats.total(), 1);
    }

    #[test]
    fn the_ioapic_redelivers_on_eoi() {
        use crate::msi::{MsiEvent, RecordingMsiSink};
        let sink = Arc::new(RecordingMsiSink::default());
        let ioapic = Mutex::new(Ioapic::new(sink.clone()));
        {
            let mut io = ioapic.lock().unwrap();
            io.write_register(0x10 + 2 * 3, 0x8000 | 0x30); // pin 3: level, vector 0x30
            io.set_irq(3, true);
        }
        let mut v = Script(vec![Exit::IoapicEoi { vector: 0x30 }]);
        let mut stats = ExitStats::default();
        run_split_irqchip(&mut v, &NoIo, &StopHandle::new(), &mut stats, &ioapic).unwrap();
        let sent = sink
            .events()
            .iter()
            .filter(|e| matches!(e, MsiEvent::Sent(_)))
            .count();
        assert_eq!(sent, 2, "delivered, then redelivered after the EOI");
        assert_eq!(ioapic.lock().unwrap().stats().eois, 1);
    }
}
