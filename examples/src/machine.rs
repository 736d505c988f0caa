//! Host side shared by the PCI example VMMs: one VM with a virtio function on a PCI root bus.
//!
//! [`PciMachine::new`] builds what every PCI example needs: guest memory with identity page
//! tables (2 MiB pages over the low 4 GiB), an IDT whose [`VECTOR`] gate leads to
//! [`interrupt_handler`], a VM with the split irqchip (in-kernel LAPIC, so MSIs arrive without
//! exits), a [`KvmIrqRouter`], vmkit's userspace IOAPIC at its default base, a PCI root bus behind ports 0xCF8..0xCFF, a 16550 on COM1
//! printing to stdout and a debug-exit port. [`PciMachine::add_virtio`] puts a virtio device
//! behind a `VirtioPciTransport` at 00:[`PCI_SLOT`].0 with irqfds on its MSI-X vectors and
//! ioeventfd doorbells (served by a `NotifyWorker`) at the BAR address the example guests
//! program ([`BAR`]). [`PciMachine::run`] loads a guest program and runs it to the debug exit.
//!
//! ```no_run
//! use vmkit_examples::guest::GuestAsm;
//! use vmkit_examples::machine::PciMachine;
//! use vmkit_virtio::rng::Rng;
//!
//! let mut m = PciMachine::new()?;
//! let rng = m.add_virtio("virtio-rng", Rng::default())?;
//! let mut g = GuestAsm::new()?;
//! g.exit(0)?;
//! let (status, exits) = m.run(&g.assemble()?)?;
//! let transport = rng.stop();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_devices::ioapic::{IOAPIC_DEFAULT_BASE, IOAPIC_MMIO_SIZE, Ioapic};
use vmkit_devices::kvm_irq::{KvmIrqRouter, enable_split_irqchip, run_split_irqchip};
use vmkit_devices::pci::{PciFunction, PciRoot, cap_id};
use vmkit_devices::{IoBuses, debug_exit::DebugExit, interrupt::NoInterrupt, serial::Serial};
use vmkit_memory::{GuestLayout, PageSize, PageTableBuilder, paging::flags};
use vmkit_vcpu::{ExitStats, KvmVcpu, KvmVm, LongModeState, RunOutcome, StopHandle};
use vmkit_virtio::VirtioDevice;
use vmkit_virtio::notify::{NotifyWorker, register_ioeventfds};
use vmkit_virtio::pci::VirtioPciTransport;
use vmm_sys_util::eventfd::EventFd;

use crate::guest::{
    BAR, CODE, COM1, DEBUG_EXIT, HANDLER, IDT, IDTR, PAGE_TABLES, PCI_SLOT, STACK_TOP, VECTOR,
    interrupt_handler,
};

/// Errors of the example machine (examples only print them).
pub type Error = Box<dyn std::error::Error>;

/// Guest RAM.
pub const RAM_SIZE: u64 = 32 << 20;

/// A VM with a PCI root bus, serial console and debug-exit port, ready for one virtio function.
pub struct PciMachine {
    mem: GuestMemoryMmap,
    vm: KvmVm,
    router: Arc<KvmIrqRouter>,
    buses: Arc<IoBuses>,
    root: Arc<PciRoot>,
    ioapic: Arc<Mutex<Ioapic>>,
    stop: StopHandle,
    cr3: u64,
}

/// A virtio function on the machine's bus, its doorbells served by a notify worker.
pub struct VirtioFunction<D> {
    transport: Arc<Mutex<VirtioPciTransport<D>>>,
    msix_cap: u16,
    worker: NotifyWorker,
}

impl<D> VirtioFunction<D> {
    /// Where the MSI-X capability is in configuration space (the guest enables MSI-X there).
    pub fn msix_cap(&self) -> u16 {
        self.msix_cap
    }

    /// Stop the notify worker and hand back the transport (to read its metrics).
    pub fn stop(self) -> Arc<Mutex<VirtioPciTransport<D>>> {
        drop(self.worker.stop());
        self.transport
    }
}

impl PciMachine {
    /// Memory, page tables, IDT and handler, the VM, the PCI root bus, COM1 and debug-exit.
    pub fn new() -> Result<Self, Error> {
        let mem: GuestMemoryMmap = GuestLayout::builder()
            .ram_size(RAM_SIZE)
            .build()?
            .create_memory()?;
        let mut tables = PageTableBuilder::new(&mem, PAGE_TABLES, 0x7000)?;
        tables.identity_map(0, 4 << 30, PageSize::Size2M, flags::WRITABLE)?;
        // One 64-bit interrupt gate (SDM Vol. 3 §6.14.1): selector 0x08, present, DPL 0.
        let gate_lo =
            (HANDLER & 0xffff) | 0x08 << 16 | 0x8e00 << 32 | ((HANDLER >> 16) & 0xffff) << 48;
        mem.write_obj(gate_lo, GuestAddress(IDT + 16 * VECTOR as u64))?;
        mem.write_obj(HANDLER >> 32, GuestAddress(IDT + 16 * VECTOR as u64 + 8))?;
        mem.write_obj(256u16 * 16 - 1, GuestAddress(IDTR))?;
        mem.write_obj(IDT, GuestAddress(IDTR + 2))?;
        mem.write_slice(&interrupt_handler()?, GuestAddress(HANDLER))?;

        // The VM: split irqchip before the vCPU, so MSIs reach an in-kernel LAPIC.
        let mut vm = KvmVm::new()?;
        enable_split_irqchip(&vm)?;
        vm.register_memory(&mem)?;
        let router = KvmIrqRouter::new(&vm)?;

        let buses = Arc::new(IoBuses::default());
        let root = PciRoot::new(&buses);
        buses.pio.insert(0xcf8, 8, "pci", root.config_io())?;
        let ioapic = Arc::new(Mutex::new(Ioapic::new(router.clone())));
        buses.mmio.insert(
            IOAPIC_DEFAULT_BASE,
            IOAPIC_MMIO_SIZE,
            "ioapic",
            ioapic.clone(),
        )?;
        let stop = StopHandle::new();
        add_console(&buses, &stop)?;
        Ok(Self {
            cr3: tables.cr3(),
            mem,
            vm,
            router,
            buses,
            root,
            ioapic,
            stop,
        })
    }

    /// Guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The userspace IOAPIC (at [`IOAPIC_DEFAULT_BASE`]), e.g. for a device's INTx line.
    pub fn ioapic(&self) -> &Arc<Mutex<Ioapic>> {
        &self.ioapic
    }

    /// Put `device` on the bus at 00:[`PCI_SLOT`].0 behind virtio-pci: irqfds on its MSI-X
    /// vectors, ioeventfds on its doorbells at [`BAR`], a notify worker serving them.
    pub fn add_virtio<D>(&mut self, name: &str, device: D) -> Result<VirtioFunction<D>, Error>
    where
        D: VirtioDevice<GuestMemoryMmap> + 'static,
    {
        self.add_virtio_waking(name, device, Vec::new())
    }

    /// [`PciMachine::add_virtio`], and the notify worker also runs queue `q` when a `(q, fd)`
    /// of `wakeups` fires (e.g. vmkit-block's io_uring completion eventfds).
    pub fn add_virtio_waking<D>(
        &mut self,
        name: &str,
        device: D,
        wakeups: Vec<(u16, EventFd)>,
    ) -> Result<VirtioFunction<D>, Error>
    where
        D: VirtioDevice<GuestMemoryMmap> + 'static,
    {
        // Its MSI-X vectors get irqfds before the transport takes them.
        let msix = VirtioPciTransport::<D>::msix_for(&device, self.router.clone())?;
        self.router.attach_msix(&msix)?;
        let function = VirtioPciTransport::new(device, self.mem.clone(), msix)?;
        let msix_cap = msix_cap(&function).ok_or("no MSI-X capability")?;
        let doorbells = function.notify_addresses(BAR);
        let transport = Arc::new(Mutex::new(function));
        self.root.add(PCI_SLOT, 0, name, transport.clone())?;
        // Doorbells through ioeventfd at the BAR address the example guests program.
        let fds = register_ioeventfds(self.vm.fd(), &doorbells)?;
        let worker = NotifyWorker::spawn_with_wakeups(transport.clone(), fds, wakeups)?;
        Ok(VirtioFunction {
            transport,
            msix_cap,
            worker,
        })
    }

    /// Load `program` at [`CODE`] and run one vCPU in 64-bit mode until the guest writes the
    /// debug-exit port: its status and the exits taken.
    pub fn run(&mut self, program: &[u8]) -> Result<(u32, ExitStats), Error> {
        self.mem.write_slice(program, GuestAddress(CODE))?;
        let mut vcpu = self.vm.create_vcpu(0)?;
        let cpu = LongModeState::flat_64(self.cr3, CODE, STACK_TOP);
        cpu.write_gdt(&self.mem)?;
        cpu.apply(&mut vcpu)?;
        run_to_debug_exit(&mut vcpu, &self.buses, &self.stop, &self.ioapic)
    }
}

/// Put the examples' console on `buses`: a 16550 on [`COM1`] printing to stdout, and the
/// debug-exit port [`DEBUG_EXIT`] that stops the run loop through `stop`.
pub fn add_console(buses: &IoBuses, stop: &StopHandle) -> Result<(), Error> {
    let serial = Serial::new(Arc::new(NoInterrupt), std::io::stdout());
    buses.pio.insert(COM1 as u64, 8, "com1", Arc::new(serial))?;
    let exit = DebugExit::new(stop.clone());
    buses
        .pio
        .insert(DEBUG_EXIT as u64, 1, "debug-exit", Arc::new(exit))?;
    Ok(())
}

/// Run `vcpu` through the split-irqchip loop ([`run_split_irqchip`]: IOAPIC EOIs forwarded to
/// `ioapic`, interrupted runs re-entered) until the guest writes the debug-exit port: its status
/// and the exits taken. Any other exit the loop hands back is an error for these examples.
pub fn run_to_debug_exit(
    vcpu: &mut KvmVcpu,
    buses: &IoBuses,
    stop: &StopHandle,
    ioapic: &Mutex<Ioapic>,
) -> Result<(u32, ExitStats), Error> {
    let mut stats = ExitStats::default();
    match run_split_irqchip(vcpu, buses, stop, &mut stats, ioapic)? {
        RunOutcome::Stopped(status) => Ok((status, stats)),
        RunOutcome::Exit(exit) => Err(format!("unexpected exit: {exit:?}").into()),
    }
}

/// Print the transport, MSI-X and exit counters the way every PCI example does; `device` is
/// the device's own line(s).
pub fn print_report<D>(
    status: u32,
    transport: &VirtioPciTransport<D>,
    device: &str,
    exits: &ExitStats,
) where
    D: VirtioDevice<GuestMemoryMmap>,
{
    println!("--- guest stopped with status {status}");
    println!("transport: {:?}", transport.metrics());
    println!("device:    {device}");
    println!("msi-x:     {:?}", transport.msix().stats());
    println!("{exits}");
}

/// The process exit code of an example VMM: the guest's status (its low byte), or 255 after
/// printing `name: error: cause: …` on stderr.
pub fn exit_code(name: &str, result: Result<u32, Error>) -> ExitCode {
    match result {
        Ok(status) => ExitCode::from(status as u8),
        Err(e) => {
            let mut msg = format!("{name}: {e}");
            let mut cause = e.source();
            while let Some(c) = cause {
                msg.push_str(&format!(": {c}"));
                cause = c.source();
            }
            eprintln!("{msg}");
            ExitCode::from(255)
        }
    }
}

/// Where `f`'s MSI-X capability is (walking its capability list as a guest would).
fn msix_cap(f: &impl PciFunction) -> Option<u16> {
    let caps = f.config_space().capabilities();
    caps.into_iter()
        .find_map(|(id, at)| (id == cap_id::MSIX).then_some(at))
}
