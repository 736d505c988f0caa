//! PIO exit round trip: a guest looping on `out` N times, run
//! (a) through vmkit's run loop + PIO bus (with exit statistics on) and
//! (b) through a bare kvm-ioctls `run()` loop,
//! on the same VM and vCPU, in the same process. Prints the per-exit cost of each and the ratio.
//!
//! `cargo bench -p vmkit-benches --bench pio_exit`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use iced_x86::code_asm::*;
use kvm_bindings::kvm_regs;
use vmkit_devices::{BusDevice, IoBuses};
use vmkit_vcpu::test_utils::{CODE_ADDR, STACK_TOP, TinyGuest};
use vmkit_vcpu::{Exit, ExitStats, KvmVcpu, RunOutcome, StopHandle, VcpuRegisters, run_until_exit};

const PORT: u16 = 0x80;

/// A port device that does nothing (the cost measured is the VMM's, not a device's).
struct Null;
impl BusDevice for Null {
    fn read(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _: u64, data: &[u8]) {
        black_box(data);
    }
}

/// `rcx` iterations of `out PORT, al`, then `hlt`.
fn guest() -> TinyGuest {
    TinyGuest::new(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.out(PORT as u32, al)?;
        a.dec(rcx)?;
        a.jnz(top)?;
        a.hlt()
    })
    .expect("tiny guest")
}

fn rewind(vcpu: &mut KvmVcpu, n: u64) {
    let regs = kvm_regs {
        rip: CODE_ADDR,
        rsp: STACK_TOP,
        rflags: 2,
        rcx: n,
        ..Default::default()
    };
    vcpu.set_regs(&regs).expect("set regs");
}

fn run_vmkit(g: &mut TinyGuest, buses: &IoBuses, stats: &mut ExitStats, n: u64) -> Duration {
    rewind(&mut g.vcpu, n);
    let stop = StopHandle::new();
    let t = Instant::now();
    let out = run_until_exit(&mut g.vcpu, buses, &stop, stats).expect("run");
    let d = t.elapsed();
    assert_eq!(out, RunOutcome::Exit(Exit::Hlt));
    d
}

fn run_bare(g: &mut TinyGuest, n: u64) -> Duration {
    rewind(&mut g.vcpu, n);
    let t = Instant::now();
    loop {
        match g.vcpu.fd_mut().run().expect("KVM_RUN") {
            kvm_ioctls::VcpuExit::IoOut(port, data) => {
                black_box((port, data));
            }
            kvm_ioctls::VcpuExit::Hlt => break,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    t.elapsed()
}

fn setup() -> (TinyGuest, IoBuses) {
    let buses = IoBuses::default();
    buses
        .pio
        .insert(PORT as u64, 1, "null", Arc::new(Null))
        .expect("insert");
    (guest(), buses)
}

fn bench(c: &mut Criterion) {
    let (mut g, buses) = setup();
    let mut stats = ExitStats::default();
    let mut group = c.benchmark_group("pio_exit_round_trip");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    group.bench_function("bare_kvm_ioctls", |b| {
        b.iter_custom(|iters| run_bare(&mut g, iters))
    });
    group.bench_function("vmkit_run_loop_bus_stats", |b| {
        b.iter_custom(|iters| run_vmkit(&mut g, &buses, &mut stats, iters))
    });
    group.finish();
}

/// Paired measurement for the ratio: alternate the two loops in short batches (so drift and
/// other load hit both alike) and take the median of the per-round ratios.
fn ratio() {
    let (mut g, buses) = setup();
    let mut stats = ExitStats::default();
    const BATCH: u64 = 1_000;
    const ROUNDS: usize = 61;
    let (mut bare, mut vmkit, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Alternate which side goes first.
        let (b, v) = if round % 2 == 0 {
            let b = run_bare(&mut g, BATCH);
            (b, run_vmkit(&mut g, &buses, &mut stats, BATCH))
        } else {
            let v = run_vmkit(&mut g, &buses, &mut stats, BATCH);
            (run_bare(&mut g, BATCH), v)
        };
        bare.push(b.as_nanos() as f64 / BATCH as f64);
        vmkit.push(v.as_nanos() as f64 / BATCH as f64);
        ratios.push(v.as_secs_f64() / b.as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (b, v, r) = (median(&mut bare), median(&mut vmkit), median(&mut ratios));
    println!(
        "pio_exit_round_trip: bare kvm-ioctls {:.2} us/exit, vmkit run loop + bus + stats \
         {:.2} us/exit, median paired ratio {:.3}x ({} exits per side)",
        b / 1000.0,
        v / 1000.0,
        r,
        BATCH * ROUNDS as u64
    );
}

/// What the run loop adds per PIO exit, without KVM: bus lookup + device call + stats.
fn dispatch_cost(c: &mut Criterion) {
    let buses = IoBuses::default();
    buses
        .pio
        .insert(PORT as u64, 1, "null", Arc::new(Null))
        .expect("insert");
    let mut stats = ExitStats::default();
    c.bench_function("pio_bus_dispatch_no_kvm", |b| {
        b.iter(|| {
            stats.record(vmkit_vcpu::ExitKind::PioWrite);
            vmkit_vcpu::IoHandler::pio_write(&buses, black_box(PORT), black_box(&[0u8][..]));
        })
    });
}

criterion_group!(benches, bench, dispatch_cost);

fn main() {
    benches();
    ratio();
    Criterion::default().configure_from_args().final_summary();
}
