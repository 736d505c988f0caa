//! VMM-side cost of the interrupt and PCI configuration paths, against the exit that precedes
//! them: a PIO exit round trip (a tiny guest doing `out` in a loop, one `KVM_RUN` per
//! iteration), measured in the same run.
//!
//! * `cf8_config_read`: CONFIG_ADDRESS write + CONFIG_DATA read through the PIO bus (what two
//!   guest exits dispatch to), `ecam_config_read`: one ECAM read through the MMIO bus;
//! * `msix_signal`: an unmasked MSI-X vector into a counting sink; `ioapic_level_cycle`: assert,
//!   deliver, deassert, EOI of a level pin;
//! * `irqfd_trigger` vs `kvm_signal_msi`: the two ways an MSI reaches KVM (split irqchip VM).
//!
//! After the criterion runs, a paired measurement prints each one's cost and its ratio to the
//! PIO exit round trip. `cargo bench -p vmkit-devices --bench interrupts`

use std::hint::black_box;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use iced_x86::code_asm::*;
use vmkit_devices::interrupt::InterruptSource;
use vmkit_devices::ioapic::Ioapic;
use vmkit_devices::kvm_irq::{KvmIrqRouter, enable_split_irqchip};
use vmkit_devices::msi::{MsiMessage, MsiSink};
use vmkit_devices::pci::{BarKind, ConfigSpace, Msix, MsixConfig, PciFunction, PciHeader, PciRoot};
use vmkit_devices::{IoBuses, MutBusDevice};
use vmkit_vcpu::test_utils::TinyGuest;
use vmkit_vcpu::{KvmVm, VcpuRun};

#[derive(Default)]
struct Counting(AtomicU64);

impl MsiSink for Counting {
    fn send(&self, _: MsiMessage) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

struct Func(ConfigSpace);

impl PciFunction for Func {
    fn config_space(&self) -> &ConfigSpace {
        &self.0
    }
    fn config_space_mut(&mut self) -> &mut ConfigSpace {
        &mut self.0
    }
    fn bar_read(&mut self, _: u8, _: u64, data: &mut [u8]) {
        data.fill(0)
    }
    fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
}

type Op = Box<dyn FnMut()>;

fn ops() -> Vec<(&'static str, Op)> {
    let mut out: Vec<(&'static str, Op)> = Vec::new();

    // PCI configuration through the buses.
    let buses = Arc::new(IoBuses::default());
    let root = PciRoot::new(&buses);
    let mut cfg = ConfigSpace::new(&PciHeader {
        vendor_id: 0x1af4,
        device_id: 0x1044,
        ..Default::default()
    });
    cfg.add_bar(
        0,
        BarKind::Memory64 {
            prefetchable: false,
        },
        0x4000,
    )
    .unwrap();
    root.add(1, 0, "f", Arc::new(Mutex::new(Func(cfg))))
        .unwrap();
    buses.pio.insert(0xcf8, 8, "cf8", root.config_io()).unwrap();
    buses
        .mmio
        .insert(0xb000_0000, 1 << 20, "ecam", root.ecam())
        .unwrap();
    let b = buses.clone();
    out.push((
        "cf8_config_read",
        Box::new(move || {
            b.pio.write(0xcf8, &0x8000_0800u32.to_le_bytes());
            let mut d = [0u8; 4];
            b.pio.read(0xcfc, &mut d);
            black_box(d);
        }),
    ));
    out.push((
        "ecam_config_read",
        Box::new(move || {
            let mut d = [0u8; 4];
            buses.mmio.read(0xb000_8000, &mut d);
            black_box(d);
        }),
    ));

    // MSI-X signal, enabled and unmasked.
    let sink = Arc::new(Counting::default());
    let msix = Msix::new(MsixConfig::in_bar(0, 4, 0), sink.clone()).unwrap();
    msix.set_control(1 << 15);
    msix.bar_write(0, 0, &0xfee0_0000u32.to_le_bytes());
    msix.bar_write(0, 8, &0x40u32.to_le_bytes());
    msix.bar_write(0, 12, &0u32.to_le_bytes());
    let v = msix.vector(0);
    out.push(("msix_signal", Box::new(move || v.trigger().unwrap())));

    // IOAPIC level cycle.
    let mut io = Ioapic::new(sink);
    io.write(0, &[0x10 + 2 * 5]);
    io.write(0x10, &0x8030u32.to_le_bytes());
    out.push((
        "ioapic_level_cycle",
        Box::new(move || {
            io.set_irq(5, true);
            io.set_irq(5, false);
            io.end_of_interrupt(0x30);
        }),
    ));

    // KVM: irqfd vs KVM_SIGNAL_MSI, and the PIO exit reference.
    match kvm_ops() {
        Ok(k) => out.extend(k),
        Err(e) => eprintln!("KVM parts skipped: {e}"),
    }
    out
}

fn kvm_ops() -> Result<Vec<(&'static str, Op)>, vmkit_vcpu::test_utils::HarnessError> {
    let vm = KvmVm::new()?;
    enable_split_irqchip(&vm)?;
    let vcpu = vm.create_vcpu(0)?;
    let router = KvmIrqRouter::new(&vm)?;
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x40,
    };
    let irqfd = router.msi_irqfd(msg)?;
    let r = router.clone();
    // MSI-X vectors whose irqfds the Msix detaches while masked: a guest mask + unmask of the
    // vector table entry (KVM_IRQFD deassign, a fold read of the eventfd, KVM_IRQFD assign),
    // and the same with an eventfd write held while masked (folded, then delivered once).
    let msix = Msix::new(MsixConfig::in_bar(0, 2, 0), router.clone())?;
    router.attach_msix(&msix)?;
    msix.set_control(1 << 15);
    for at in [0u64, 16] {
        msix.bar_write(0, at, &0xfee0_0000u32.to_le_bytes());
        msix.bar_write(0, at + 8, &0x41u32.to_le_bytes());
    }
    let m1 = msix.clone();
    let fd = msix.vector(1).notifier().ok_or("no irqfd")?.try_clone()?;
    let keep = Arc::new((vm, vcpu));
    let keep2 = keep.clone();
    let mut g = TinyGuest::new(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.out(0x80, al)?;
        a.jmp(top)
    })?;
    Ok(vec![
        (
            "irqfd_trigger",
            Box::new(move || {
                let _ = &keep;
                irqfd.trigger().unwrap()
            }),
        ),
        (
            "msix_irqfd_mask_unmask",
            Box::new(move || {
                msix.bar_write(0, 12, &1u32.to_le_bytes());
                msix.bar_write(0, 12, &0u32.to_le_bytes());
            }),
        ),
        (
            "msix_masked_write_unmask",
            Box::new(move || {
                m1.bar_write(0, 28, &1u32.to_le_bytes());
                fd.write(1).unwrap();
                m1.bar_write(0, 28, &0u32.to_le_bytes());
            }),
        ),
        (
            "kvm_signal_msi",
            Box::new(move || {
                let _ = &keep2;
                r.send(msg).unwrap()
            }),
        ),
        (
            "pio_exit_round_trip",
            Box::new(move || {
                let e = g.vcpu.run().unwrap();
                black_box(e.kind());
            }),
        ),
    ])
}

fn benches(c: &mut Criterion) {
    for (name, mut op) in ops() {
        c.bench_function(name, |b| b.iter(&mut op));
    }
}

/// Best-of-5 batches per operation; prints ns/op and the ratio to the PIO exit round trip.
fn ratios() {
    let mut ops = ops();
    let batch = 2_000u32;
    let mut best = vec![Duration::MAX; ops.len()];
    for _ in 0..5 {
        for (i, (_, op)) in ops.iter_mut().enumerate() {
            let t = Instant::now();
            for _ in 0..batch {
                op();
            }
            best[i] = best[i].min(t.elapsed());
        }
    }
    let per = |d: Duration| d.as_secs_f64() * 1e9 / batch as f64;
    let exit = ops
        .iter()
        .position(|(n, _)| *n == "pio_exit_round_trip")
        .map(|i| per(best[i]));
    println!("\nper operation (best of 5 x {batch}), ratio to one PIO exit round trip:");
    for (i, (name, _)) in ops.iter().enumerate() {
        let ns = per(best[i]);
        match exit {
            Some(x) => println!("  {name:<26} {ns:10.1} ns  {:8.4}x", ns / x),
            None => println!("  {name:<26} {ns:10.1} ns"),
        }
    }
}

criterion_group! {
    name = benches_group;
    config = Criterion::default().measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = benches
}

fn main() {
    benches_group();
    ratios();
    Criterion::default().configure_from_args().final_summary();
}
