//! Exit dispatch cost through vmkit's run loops (statistics on) vs a bare kvm-ioctls loop, the
//! cost of applying a `Vmcs` to KVM, and of injecting a software interrupt with the IDT-gate
//! checks vs without. Prints the ratios at the end of the run.
//!
//! The guest is `loop { out 0x80, al }`: every iteration is one PIO exit, so the time per exit
//! is the KVM_RUN round trip plus the VMM's dispatch. Guest execution time (3 instructions per
//! exit on an emulating KVM) is part of both sides.

use std::cell::Cell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use iced_x86::code_asm::*;
use vmkit_vcpu::control::{RunControl, run_controlled};
use vmkit_vcpu::kvm_ext::{read_guest_state, write_guest_state};
use vmkit_vcpu::test_utils::TinyGuest;
use vmkit_vcpu::{ExitStats, IoHandler, KvmVcpu, StopHandle, Vmcs, run_until_exit};

struct Counter {
    left: Cell<u64>,
    stop: StopHandle,
}

impl IoHandler for Counter {
    fn pio_read(&self, _: u16, d: &mut [u8]) {
        d.fill(0xff)
    }
    fn pio_write(&self, _: u16, _: &[u8]) {
        let n = self.left.get() - 1;
        self.left.set(n);
        if n == 0 {
            self.stop.request(0);
        }
    }
    fn mmio_read(&self, _: u64, d: &mut [u8]) {
        d.fill(0xff)
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

fn out_loop() -> TinyGuest {
    TinyGuest::new(|a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.out(0x80, al)?;
        a.jmp(top)
    })
    .expect("KVM guest")
}

fn bare(vcpu: &mut KvmVcpu, n: u64) -> Duration {
    let t = Instant::now();
    for _ in 0..n {
        match vcpu.fd_mut().run() {
            Ok(kvm_ioctls::VcpuExit::IoOut(port, data)) => {
                black_box((port, data));
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
    t.elapsed()
}

fn vmkit(vcpu: &mut KvmVcpu, stats: &mut ExitStats, n: u64) -> Duration {
    let io = Counter {
        left: Cell::new(n),
        stop: StopHandle::new(),
    };
    let t = Instant::now();
    run_until_exit(vcpu, &io, &io.stop, stats).expect("run");
    t.elapsed()
}

fn controlled(vcpu: &mut KvmVcpu, ctl: &mut RunControl, stats: &mut ExitStats, n: u64) -> Duration {
    let io = Counter {
        left: Cell::new(n),
        stop: StopHandle::new(),
    };
    let t = Instant::now();
    run_controlled(vcpu, &io, &io.stop, stats, ctl).expect("run");
    t.elapsed()
}

/// A vCPU that "exits" with a PIO write at once: the VMM-side dispatch cost alone.
struct Synthetic {
    buf: [u8; 4],
}

impl vmkit_vcpu::VcpuRun for Synthetic {
    #[inline]
    fn run(&mut self) -> Result<vmkit_vcpu::VcpuExit<'_>, vmkit_vcpu::Error> {
        Ok(vmkit_vcpu::VcpuExit::PioWrite {
            port: 0x80,
            size: 1,
            data: &self.buf[..1],
        })
    }
}

impl vmkit_vcpu::VcpuInterruptWindow for Synthetic {
    fn interrupt_window_open(&mut self) -> bool {
        false
    }
    fn request_interrupt_window(&mut self, _: bool) {}
    fn inject_external_interrupt(&mut self, _: u8) -> Result<(), vmkit_vcpu::Error> {
        Ok(())
    }
}

impl vmkit_vcpu::control::VcpuKick for Synthetic {
    fn handle(&self) -> Result<vmkit_vcpu::VcpuHandle, vmkit_vcpu::Error> {
        Ok(vmkit_vcpu::VcpuHandle::detached())
    }
}

fn synthetic(c: &mut Criterion) {
    let mut v = Synthetic { buf: [0; 4] };
    let mut stats = ExitStats::default();
    let mut ctl = RunControl::new().expect("control");
    let mut group = c.benchmark_group("dispatch_no_kvm");
    group.bench_function("bare_match", |b| {
        b.iter_custom(|n| {
            let t = Instant::now();
            for _ in 0..n {
                if let Ok(vmkit_vcpu::VcpuExit::PioWrite { port, data, .. }) =
                    vmkit_vcpu::VcpuRun::run(black_box(&mut v))
                {
                    black_box((port, data));
                }
            }
            t.elapsed()
        })
    });
    group.bench_function("run_until_exit_with_stats", |b| {
        b.iter_custom(|n| {
            let io = Counter {
                left: Cell::new(n),
                stop: StopHandle::new(),
            };
            let t = Instant::now();
            run_until_exit(black_box(&mut v), &io, &io.stop, &mut stats).expect("run");
            t.elapsed()
        })
    });
    group.bench_function("run_controlled_with_stats", |b| {
        b.iter_custom(|n| {
            let io = Counter {
                left: Cell::new(n),
                stop: StopHandle::new(),
            };
            let t = Instant::now();
            run_controlled(black_box(&mut v), &io, &io.stop, &mut stats, &mut ctl).expect("run");
            t.elapsed()
        })
    });
    group.finish();
}

fn per_exit(d: Duration, n: u64) -> f64 {
    d.as_secs_f64() * 1e9 / n as f64
}

fn benches(c: &mut Criterion) {
    let mut g = out_loop();
    let mut stats = ExitStats::default();
    let mut ctl = RunControl::new().expect("control");
    let mut group = c.benchmark_group("exit_dispatch");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4));
    group.bench_function("bare_kvm_ioctls", |b| {
        b.iter_custom(|n| bare(&mut g.vcpu, n))
    });
    group.bench_function("vmkit_run_until_exit", |b| {
        b.iter_custom(|n| vmkit(&mut g.vcpu, &mut stats, n))
    });
    group.bench_function("vmkit_run_controlled", |b| {
        b.iter_custom(|n| controlled(&mut g.vcpu, &mut ctl, &mut stats, n))
    });
    group.finish();

    // Same-run ratio: interleaved rounds, best per-exit time of each.
    const N: u64 = 20_000;
    let (mut tb, mut tv, mut tc) = (f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..5 {
        tb = tb.min(per_exit(bare(&mut g.vcpu, N), N));
        tv = tv.min(per_exit(vmkit(&mut g.vcpu, &mut stats, N), N));
        tc = tc.min(per_exit(
            controlled(&mut g.vcpu, &mut ctl, &mut stats, N),
            N,
        ));
    }
    eprintln!(
        "exit dispatch per PIO exit: bare {tb:.0} ns, run_until_exit {tv:.0} ns (ratio {:.3}), \
         run_controlled {tc:.0} ns (ratio {:.3}); limit 1.05",
        tv / tb,
        tc / tb
    );

    // Vmcs -> KVM.
    let vmcs = Vmcs::from_long_mode(&g.state);
    let k = vmcs.to_kvm().expect("valid");
    let mut group = c.benchmark_group("vmcs_apply");
    group.bench_function("check_and_map", |b| b.iter(|| black_box(&vmcs).to_kvm()));
    group.bench_function("raw_ioctls_write_guest_state", |b| {
        b.iter(|| write_guest_state(&mut g.vcpu, black_box(&k)))
    });
    group.bench_function("vmcs_apply", |b| {
        b.iter(|| black_box(&vmcs).apply(&mut g.vcpu))
    });
    group.bench_function("vmcs_read_from", |b| b.iter(|| Vmcs::read_from(&g.vcpu)));
    group.finish();
    const M: u32 = 2000;
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        for _ in 0..M {
            f();
        }
        t.elapsed().as_secs_f64() * 1e9 / M as f64
    };
    let (mut map, mut raw, mut apply) = (f64::MAX, f64::MAX, f64::MAX);
    for _ in 0..3 {
        map = map.min(time(&mut || {
            black_box(black_box(&vmcs).to_kvm().expect("valid"));
        }));
        raw = raw.min(time(&mut || {
            write_guest_state(&mut g.vcpu, &k).expect("set")
        }));
        apply = apply.min(time(&mut || vmcs.apply(&mut g.vcpu).expect("apply")));
    }
    let _ = read_guest_state(&g.vcpu);
    eprintln!(
        "Vmcs apply: check+map {map:.0} ns, raw ioctls {raw:.0} ns, Vmcs::apply {apply:.0} ns \
         (ratio {:.3})",
        apply / raw
    );
}

/// `INT 0x30` injected with `events::inject` (unchecked) vs `events::inject_through_idt`
/// (gate read through KVM_TRANSLATE + the checks), and the checks alone.
fn injection(c: &mut Criterion) {
    use vmkit_vcpu::events::{inject, inject_through_idt};
    use vmkit_vcpu::test_utils::HANDLER_ADDR;
    use vmkit_vcpu::vmcs::InterruptionInfo;
    use vmkit_vcpu::vmcs::delivery::{DeliveryContext, IdtMode, software_event_delivery};
    let mut g = TinyGuest::new(|a| a.hlt()).expect("KVM guest");
    g.install_idt(&[(0x30, HANDLER_ADDR)]).expect("idt");
    let mem = g.mem.clone();
    let int = InterruptionInfo::software_interrupt(0x30);
    let mut unchecked = || inject(&mut g.vcpu, int, 0, 2).expect("inject");
    let mut group = c.benchmark_group("software_interrupt_injection");
    group.bench_function("inject_unchecked", |b| b.iter(&mut unchecked));
    let mut checked = || {
        inject_through_idt(&mut g.vcpu, int, 0, 2, |v, a, buf| {
            v.read_guest_linear(&mem, a, buf)
        })
        .expect("inject")
    };
    group.bench_function("inject_through_idt", |b| b.iter(&mut checked));
    let ctx = DeliveryContext::new(
        IdtMode::Long,
        3,
        vmkit_vcpu::vmcs::DescriptorTable {
            base: 0x1000,
            limit: 0xfff,
        },
    );
    let mut gate = [0u8; 16];
    gate[5] = 0xee;
    group.bench_function("gate_checks_only", |b| {
        b.iter(|| {
            software_event_delivery(black_box(int), black_box(&ctx), |_, buf| {
                buf.copy_from_slice(&gate);
                true
            })
        })
    });
    group.finish();
    const M: u32 = 2000;
    let (mut tu, mut tc) = (f64::MAX, f64::MAX);
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..M {
            inject(&mut g.vcpu, int, 0, 2).expect("inject");
        }
        tu = tu.min(t.elapsed().as_secs_f64() * 1e9 / M as f64);
        let t = Instant::now();
        for _ in 0..M {
            inject_through_idt(&mut g.vcpu, int, 0, 2, |v, a, buf| {
                v.read_guest_linear(&mem, a, buf)
            })
            .expect("inject");
        }
        tc = tc.min(t.elapsed().as_secs_f64() * 1e9 / M as f64);
    }
    eprintln!(
        "software interrupt injection: events::inject {tu:.0} ns, inject_through_idt {tc:.0} ns \
         (ratio {:.3})",
        tc / tu
    );
}

criterion_group!(exit, synthetic, benches, injection);
criterion_main!(exit);
