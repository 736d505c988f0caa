//! Notification path costs (what vhost's model saves):
//!
//! * **kick → device**: a tiny guest rings a virtio-mmio `QueueNotify` doorbell `KICKS` times in a
//!   loop. Trapped: every write is an MMIO exit to the VMM, dispatched through the bus and the
//!   transport to the device callback. ioeventfd: KVM signals an eventfd in the kernel and the
//!   guest continues; a `NotifyWorker` thread delivers the (coalesced) kicks. A third run
//!   stores to ordinary RAM in the same loop as a reference (on the software KVM of the build
//!   machines that loop is not cheaper than the ioeventfd one, so nothing is subtracted).
//! * **kick, VMM side only**: bus dispatch of one trapped doorbell (no KVM) vs. an eventfd
//!   write picked up by the worker thread (cross-thread wake-up), the part each path adds in
//!   userspace.
//! * **device → guest interrupt**: raising an MSI through an irqfd (eventfd write, KVM injects)
//!   vs. a `KVM_SIGNAL_MSI` ioctl, on a VM with the split irqchip.
//! * **virtio-pci INTx vs MSI-X**: one configuration-change notification of a virtio-pci
//!   function with MSI-X disabled and INTA# on a userspace I/O APIC level pin (ISR bit, line up,
//!   I/O APIC → `KVM_SIGNAL_MSI`) plus the driver's ISR read (line down) and the EOI the vCPU's
//!   EOI exit brings, vs. the same notification through an enabled MSI-X vector
//!   (`KVM_SIGNAL_MSI`).
//!
//! After the criterion runs, a paired measurement prints per-operation costs and the ratios.
//!
//! `cargo bench -p vmkit-virtio --bench notify`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use iced_x86::code_asm::*;
use kvm_bindings::kvm_regs;
use vm_memory::GuestMemoryMmap;
use vmkit_devices::debug_exit::DebugExit;
use vmkit_devices::interrupt::NoInterrupt;
use vmkit_devices::ioapic::{Ioapic, IoapicLine};
use vmkit_devices::kvm_irq::{KvmIrqRouter, SignalMsiInterrupt, enable_split_irqchip};
use vmkit_devices::msi::MsiMessage;
use vmkit_devices::pci::PciFunction;
use vmkit_devices::{InterruptSource, IoBuses, MutBusDevice};
use vmkit_vcpu::test_utils::TinyGuest;
use vmkit_vcpu::{ExitStats, KvmVm, RunOutcome, StopHandle, VcpuRegisters, run_until_exit};
use vmkit_virtio::mmio::{MMIO_WINDOW_SIZE, MmioTransport, VIRTIO_MMIO_QUEUE_NOTIFY};
use vmkit_virtio::notify::{NotifyWorker, QueueEventFd, register_ioeventfds};
use vmkit_virtio::pci::{ISR_CFG_OFFSET, MSIX_TABLE_OFFSET, VirtioPciTransport};
use vmkit_virtio::spec::*;
use vmkit_virtio::{Activation, DeviceError, VirtioDevice};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// Doorbell writes per guest run.
const KICKS: u32 = 64;
const MMIO_BASE: u64 = 0xd000_0000;
const RAM_TARGET: u64 = 0x30_0000;

/// A device whose queue callback only counts.
struct Counting(Arc<AtomicU64>);

impl VirtioDevice for Counting {
    fn device_type(&self) -> u32 {
        0x2a
    }
    fn device_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn activate(&mut self, _: Activation) -> Result<(), DeviceError> {
        Ok(())
    }
    fn queue_notify(&mut self, _: u16) -> Result<(), DeviceError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    fn reset(&mut self) {}
}

/// A virtio-mmio transport with its device activated (queue 0 in `mem` at 0x40_0000).
fn active_transport(mem: GuestMemoryMmap, count: Arc<AtomicU64>) -> MmioTransport<Counting> {
    let mut t = MmioTransport::new(Counting(count), mem, Arc::new(NoInterrupt));
    let w = |t: &mut MmioTransport<Counting>, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    w(&mut t, 0x70, 1);
    w(&mut t, 0x70, 3);
    w(&mut t, 0x24, 1);
    w(&mut t, 0x20, 1);
    w(&mut t, 0x70, 0xb);
    w(&mut t, 0x38, 16);
    w(&mut t, 0x80, 0x40_0000);
    w(&mut t, 0x90, 0x40_0100);
    w(&mut t, 0xa0, 0x40_0200);
    w(&mut t, 0x44, 1);
    w(&mut t, 0x70, 0xf);
    assert!(t.core().is_activated());
    t
}

/// A guest writing `target` `KICKS` times, then ending through port 0xf4.
struct KickGuest {
    g: TinyGuest,
    regs: kvm_regs,
    buses: IoBuses,
    stop: StopHandle,
    count: Arc<AtomicU64>,
    _worker: Option<NotifyWorker>,
}

impl KickGuest {
    fn new(target: u64, ioeventfd: bool) -> Self {
        let g = TinyGuest::new(|a| {
            let mut lp = a.create_label();
            a.mov(rbx, target)?;
            a.mov(ecx, KICKS)?;
            a.set_label(&mut lp)?;
            a.mov(dword_ptr(rbx), 0u32)?; // queue 0
            a.dec(ecx)?;
            a.jnz(lp)?;
            a.out(0xf4, al)
        })
        .unwrap();
        let regs = g.vcpu.regs().unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let t = Arc::new(Mutex::new(active_transport(g.mem.clone(), count.clone())));
        let buses = IoBuses::default();
        let stop = StopHandle::new();
        buses
            .mmio
            .insert(MMIO_BASE, MMIO_WINDOW_SIZE, "virtio", t.clone())
            .unwrap();
        buses
            .pio
            .insert(0xf4, 1, "exit", Arc::new(DebugExit::new(stop.clone())))
            .unwrap();
        let worker = ioeventfd.then(|| {
            let addrs = t.lock().unwrap().notify_addresses(MMIO_BASE);
            let fds = register_ioeventfds(g.vm.fd(), &addrs).unwrap();
            NotifyWorker::spawn(t.clone(), fds).unwrap()
        });
        Self {
            g,
            regs,
            buses,
            stop,
            count,
            _worker: worker,
        }
    }

    fn run(&mut self) {
        self.stop.clear();
        self.g.vcpu.set_regs(&self.regs).unwrap();
        let mut stats = ExitStats::default();
        let r = run_until_exit(&mut self.g.vcpu, &self.buses, &self.stop, &mut stats).unwrap();
        assert!(matches!(r, RunOutcome::Stopped(_)));
    }
}

/// The worker path without KVM: an eventfd write the worker turns into a device callback.
struct WorkerPath {
    fd: EventFd,
    count: Arc<AtomicU64>,
    _worker: NotifyWorker,
}

impl WorkerPath {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 8 << 20)]).unwrap();
        let count = Arc::new(AtomicU64::new(0));
        let t = Arc::new(Mutex::new(active_transport(mem, count.clone())));
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let q = QueueEventFd {
            queue: 0,
            addr: 0,
            fd: fd.try_clone().unwrap(),
        };
        let worker = NotifyWorker::spawn(t, vec![q]).unwrap();
        Self {
            fd,
            count,
            _worker: worker,
        }
    }
    /// Signal and wait until the callback ran.
    fn kick(&self) {
        let before = self.count.load(Ordering::Acquire);
        self.fd.write(1).unwrap();
        while self.count.load(Ordering::Acquire) == before {
            std::hint::spin_loop();
        }
    }
}

fn trapped_dispatch() -> (IoBuses, Arc<AtomicU64>) {
    let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 8 << 20)]).unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let t = Arc::new(Mutex::new(active_transport(mem, count.clone())));
    let buses = IoBuses::default();
    buses
        .mmio
        .insert(MMIO_BASE, MMIO_WINDOW_SIZE, "virtio", t)
        .unwrap();
    (buses, count)
}

/// A VM with the split irqchip and one vCPU (its LAPIC receives the MSIs).
fn msi_paths() -> (
    KvmVm,
    vmkit_vcpu::KvmVcpu,
    impl InterruptSource,
    SignalMsiInterrupt,
) {
    let vm = KvmVm::new().unwrap();
    enable_split_irqchip(&vm).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let router = KvmIrqRouter::new(&vm).unwrap();
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };
    let irqfd = router.msi_irqfd(msg).unwrap();
    let signal = SignalMsiInterrupt::new(router, msg);
    (vm, vcpu, irqfd, signal)
}

/// Two virtio-pci functions on one split-irqchip VM: `intx` with MSI-X disabled and INTA# on
/// I/O APIC pin 10 (level, vector 0x31), `msix` with MSI-X enabled and its config vector
/// unmasked; both deliver with `KVM_SIGNAL_MSI`.
struct PciPaths {
    _vm: KvmVm,
    _vcpu: vmkit_vcpu::KvmVcpu,
    intx: VirtioPciTransport<Counting>,
    msix: VirtioPciTransport<Counting>,
    ioapic: Arc<Mutex<Ioapic>>,
}

impl PciPaths {
    const VECTOR: u8 = 0x31;

    fn new() -> Self {
        let vm = KvmVm::new().unwrap();
        enable_split_irqchip(&vm).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let router = KvmIrqRouter::new(&vm).unwrap();
        let ioapic = Arc::new(Mutex::new(Ioapic::new(router.clone())));
        ioapic
            .lock()
            .unwrap()
            .write_register(0x10 + 2 * 10, 0x8000 | Self::VECTOR as u32);
        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        let function = |intx: bool| {
            let dev = Counting(Arc::default());
            let msix = VirtioPciTransport::msix_for(&dev, router.clone()).unwrap();
            let t = VirtioPciTransport::new(dev, mem.clone(), msix).unwrap();
            if intx {
                t.with_intx(Arc::new(IoapicLine::new(ioapic.clone(), 10).unwrap()))
            } else {
                t
            }
        };
        let intx = function(true);
        let mut msix = function(false);
        // MSI-X on; vector 0 → 0x41, unmasked; config_msix_vector = 0.
        let cap = msix
            .config_space()
            .capabilities()
            .into_iter()
            .find(|c| c.0 == vmkit_devices::pci::cap_id::MSIX)
            .unwrap()
            .1;
        msix.config_write(cap + 2, &0x8000u16.to_le_bytes());
        for (off, v) in [(0, 0xfee0_0000u32), (4, 0), (8, 0x41), (12, 0)] {
            msix.bar_write(0, MSIX_TABLE_OFFSET as u64 + off, &v.to_le_bytes());
        }
        msix.bar_write(0, 0x10, &0u16.to_le_bytes());
        Self {
            _vm: vm,
            _vcpu: vcpu,
            intx,
            msix,
            ioapic,
        }
    }

    /// INTx: notify (line up, delivered), the driver's ISR read (line down), the EOI.
    fn intx_cycle(&mut self) {
        self.intx.core_mut().config_changed();
        let mut isr = [0u8];
        self.intx.bar_read(0, ISR_CFG_OFFSET, &mut isr);
        self.ioapic.lock().unwrap().end_of_interrupt(Self::VECTOR);
        black_box(isr);
    }

    /// MSI-X: notify through the config vector.
    fn msix_signal(&mut self) {
        self.msix.core_mut().config_changed();
    }
}

fn bench(c: &mut Criterion) {
    let mut ram = KickGuest::new(RAM_TARGET, false);
    let mut trapped = KickGuest::new(MMIO_BASE + VIRTIO_MMIO_QUEUE_NOTIFY, false);
    let mut evfd = KickGuest::new(MMIO_BASE + VIRTIO_MMIO_QUEUE_NOTIFY, true);
    let mut g = c.benchmark_group("kick_guest_64");
    g.bench_function("ram_baseline", |b| b.iter(|| ram.run()));
    g.bench_function("trapped_mmio", |b| b.iter(|| trapped.run()));
    g.bench_function("ioeventfd", |b| b.iter(|| evfd.run()));
    g.finish();

    let (buses, _count) = trapped_dispatch();
    let worker = WorkerPath::new();
    let mut g = c.benchmark_group("kick_vmm_side");
    g.bench_function("trapped_dispatch", |b| {
        b.iter(|| {
            buses
                .mmio
                .write(black_box(MMIO_BASE + VIRTIO_MMIO_QUEUE_NOTIFY), &[0; 4])
        })
    });
    g.bench_function("eventfd_to_worker", |b| b.iter(|| worker.kick()));
    g.finish();

    let (_vm, _vcpu, irqfd, signal) = msi_paths();
    let mut g = c.benchmark_group("interrupt");
    g.bench_function("irqfd", |b| b.iter(|| irqfd.trigger().unwrap()));
    g.bench_function("kvm_signal_msi", |b| b.iter(|| signal.trigger().unwrap()));
    g.finish();

    let mut pci = PciPaths::new();
    let mut g = c.benchmark_group("virtio_pci_interrupt");
    g.bench_function("intx_notify_isr_read_eoi", |b| b.iter(|| pci.intx_cycle()));
    g.bench_function("msix_notify", |b| b.iter(|| pci.msix_signal()));
    g.finish();
}

/// Best-of-`rounds` time per call of `f` over `batch` calls.
fn best(rounds: usize, batch: u32, mut f: impl FnMut()) -> f64 {
    let mut best = Duration::MAX;
    for _ in 0..rounds {
        let t = Instant::now();
        for _ in 0..batch {
            f();
        }
        best = best.min(t.elapsed());
    }
    best.as_secs_f64() * 1e9 / batch as f64
}

fn ratios() {
    let mut ram = KickGuest::new(RAM_TARGET, false);
    let mut trapped = KickGuest::new(MMIO_BASE + VIRTIO_MMIO_QUEUE_NOTIFY, false);
    let mut evfd = KickGuest::new(MMIO_BASE + VIRTIO_MMIO_QUEUE_NOTIFY, true);
    let base = best(5, 20, || ram.run());
    let t = best(5, 20, || trapped.run());
    let e = best(5, 20, || evfd.run());
    let per = |x: f64| x / KICKS as f64;
    println!("\npaired measurement (best of 5):");
    println!(
        "  guest loop, {KICKS} RAM stores    {:10.0} ns/store (reference: same loop, no doorbell)",
        per(base)
    );
    println!("  guest loop, trapped MMIO kicks  {:10.0} ns/kick", per(t));
    println!("  guest loop, ioeventfd kicks     {:10.0} ns/kick", per(e));
    println!("  trapped / ioeventfd             {:10.2}x", t / e);
    assert!(trapped.count.load(Ordering::Relaxed) > 0);
    println!(
        "  callbacks: trapped {} (one per kick), ioeventfd {} (coalesced)",
        trapped.count.load(Ordering::Relaxed),
        evfd.count.load(Ordering::Relaxed)
    );

    let (buses, _) = trapped_dispatch();
    let worker = WorkerPath::new();
    let d = best(5, 10_000, || {
        buses
            .mmio
            .write(black_box(MMIO_BASE + VIRTIO_MMIO_QUEUE_NOTIFY), &[0; 4]);
    });
    let w = best(5, 2_000, || worker.kick());
    println!(
        "  VMM side: trapped bus dispatch   {d:10.0} ns, eventfd->worker callback {w:.0} ns ({:.1}x)",
        w / d
    );

    let (_vm, _vcpu, irqfd, signal) = msi_paths();
    let i = best(5, 10_000, || irqfd.trigger().unwrap());
    let s = best(5, 10_000, || signal.trigger().unwrap());
    println!(
        "  interrupt: irqfd {i:.0} ns, KVM_SIGNAL_MSI {s:.0} ns, signal_msi / irqfd {:.2}x",
        s / i
    );

    let mut pci = PciPaths::new();
    let x = best(5, 10_000, || pci.intx_cycle());
    let m = best(5, 10_000, || pci.msix_signal());
    let delivered = pci.ioapic.lock().unwrap().stats().delivered;
    assert!(delivered > 0 && !pci.intx.intx_asserted());
    assert!(pci.msix.msix().stats().delivered > 0);
    println!(
        "  virtio-pci: INTx notify + ISR read + EOI {x:.0} ns, MSI-X notify {m:.0} ns, intx / msix {:.2}x",
        x / m
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: these need /dev/kvm and
    // time real guests, so they only run under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("notify: KVM bench; run it with `cargo bench -p vmkit-virtio --bench notify`");
        return;
    }
    benches();
    ratios();
    Criterion::default().configure_from_args().final_summary();
}
