//! KVM tests of exits (hypercall, debug, internal error, shutdown), pause/resume and the CPU
//! cap (tiny guests; names start with `kvm_`).

use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

use crate::control::{ExecutionCap, RunControl, run_controlled, thread_cpu_time};
use crate::kvm_ext::KVM_HC_MAP_GPA_RANGE;
use crate::kvm_map::exit_information;
use crate::kvm_tests_vmcs::Ports;
use crate::test_utils::{DATA_ADDR, TinyGuest};
use crate::vmcs::{ExitReason, InterruptionInfo, InterruptionType};
use crate::{Error, Exit, ExitStats, RunOutcome, StopHandle, VcpuExit, run_until_exit};

fn run(g: &mut TinyGuest, io: &Ports) -> RunOutcome {
    let mut stats = ExitStats::default();
    run_until_exit(&mut g.vcpu, io, &StopHandle::new(), &mut stats).unwrap()
}

/// Run `g` under [`run_controlled`] with a watchdog that stops it after `after`.
fn run_with_watchdog(g: &mut TinyGuest, io: &Ports, after: Duration) -> (RunOutcome, ExitStats) {
    let mut ctl = RunControl::new().unwrap();
    let handle = g.vcpu.handle().unwrap();
    let stop = StopHandle::new();
    let stop2 = stop.clone();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(after);
        stop2.request(0xdead);
        handle.kick();
    });
    let mut stats = ExitStats::default();
    let out = run_controlled(&mut g.vcpu, io, &stop, &mut stats, &mut ctl).unwrap();
    watchdog.join().unwrap();
    (out, stats)
}

#[test]
fn kvm_hypercall_exits_through_cap_exit_hypercall() {
    let mut g = TinyGuest::new(|a| {
        a.mov(eax, KVM_HC_MAP_GPA_RANGE as u32)?;
        a.mov(ebx, DATA_ADDR as u32)?; // page-aligned GPA
        a.mov(ecx, 1u32)?; // one page
        a.xor(edx, edx)?; // attributes
        a.vmcall()?; // at CODE_ADDR + 0x11
        a.out(0x80, eax)?;
        a.hlt()
    })
    .unwrap();
    g.vm.enable_exit_hypercall(1 << KVM_HC_MAP_GPA_RANGE)
        .unwrap();
    let io = Ports::default();
    let (out, stats) = run_with_watchdog(&mut g, &io, Duration::from_secs(1));
    match out {
        RunOutcome::Exit(Exit::Hypercall { nr, args }) => {
            // VMX/SVM hosts: KVM forwards the hypercall.
            assert_eq!((nr, args[0], args[1]), (KVM_HC_MAP_GPA_RANGE, DATA_ADDR, 1));
            let info = exit_information(&VcpuExit::Other(Exit::Hypercall { nr, args })).unwrap();
            assert_eq!(info.reason, ExitReason::Vmcall);
            g.vcpu.set_hypercall_result(0x55).unwrap();
            assert_eq!(run(&mut g, &io), RunOutcome::Exit(Exit::Hlt));
            assert_eq!(*io.log.borrow(), [(0x80, 0x55)]);
        }
        RunOutcome::Stopped(0xdead) => {
            // This software KVM (PVM) never completes `vmcall` (nor `vmmcall`) from a 64-bit
            // CPL 0 guest: KVM_RUN spins on the instruction until a signal interrupts it, with
            // no exit, RIP still at the vmcall and RAX untouched. KVM_CAP_EXIT_HYPERCALL is
            // accepted but can never fire here.
            let r = crate::VcpuRegisters::regs(&g.vcpu).unwrap();
            assert_eq!(r.rip, crate::test_utils::CODE_ADDR + 0x11);
            assert_eq!(r.rax, KVM_HC_MAP_GPA_RANGE);
            assert_eq!(
                stats.total(),
                stats.get(crate::ExitKind::Interrupted),
                "{stats}"
            );
            assert!(io.log.borrow().is_empty());
            eprintln!("PVM: vmcall spins in KVM_RUN; no KVM_EXIT_HYPERCALL ({stats})");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn kvm_exception_bitmap_db_intercepts_single_step() {
    let mut g = TinyGuest::new(|a| {
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x100)?; // TF
        a.popfq()?;
        a.nop()?; // #DB after this instruction
        a.nop()?;
        a.hlt()
    })
    .unwrap();
    g.install_idt(&[]).unwrap(); // IDT limit 0x0fff, all gates not present
    g.vcpu.set_exception_bitmap(1 << 1).unwrap();
    let io = Ports::default();
    match run(&mut g, &io) {
        RunOutcome::Exit(e @ Exit::Debug { exception: 1, .. }) => {
            // VMX hosts: KVM_GUESTDBG_USE_HW_BP puts #DB in the exception bitmap.
            let info = exit_information(&VcpuExit::Other(e)).unwrap();
            assert_eq!(info.reason, ExitReason::ExceptionOrNmi);
            let i = InterruptionInfo::from_raw(info.interruption_info).unwrap();
            assert_eq!((i.vector, i.kind), (1, InterruptionType::HardwareException));
        }
        RunOutcome::Exit(Exit::Shutdown) => {
            // This software KVM (PVM) ignores KVM_GUESTDBG_USE_HW_BP: the single-step #DB is
            // delivered to the guest, whose IDT has no gate for it (#NP → #DF → triple fault).
            // Exception-bitmap interception cannot be expressed on this KVM.
            eprintln!("PVM: #DB not intercepted by KVM_SET_GUEST_DEBUG; guest triple-faulted");
        }
        other => panic!("unexpected {other:?}"),
    }
    // Vectors KVM cannot intercept are refused, not silently ignored.
    assert!(matches!(
        g.vcpu.set_exception_bitmap(1 << 13),
        Err(Error::UnsupportedExceptionBitmap(0x2000))
    ));
}

#[test]
fn kvm_internal_error_carries_instruction_bytes() {
    // This KVM's emulator rejects `int3` in 64-bit CPL 0 (see PLATFORM.md).
    let mut g = TinyGuest::new(|a| {
        a.int3()?;
        a.hlt()
    })
    .unwrap();
    let io = Ports::default();
    let out = run(&mut g, &io);
    let RunOutcome::Exit(e @ Exit::InternalError { .. }) = out else {
        panic!("expected an internal error, got {out:?}");
    };
    // KVM reports the bytes it fetched at RIP (up to 15): `int3; hlt` first.
    let bytes = e.instruction_bytes().unwrap();
    assert_eq!(bytes[..2], [0xcc, 0xf4], "{e:x?}");
    assert!(exit_information(&VcpuExit::Other(e)).is_none());
}

#[test]
fn kvm_triple_fault_is_a_shutdown_exit() {
    let mut g = TinyGuest::new(|a| {
        a.ud2()?; // #UD with an empty IDT → #GP → #DF → triple fault
        a.hlt()
    })
    .unwrap();
    g.install_idt(&[]).unwrap();
    let mut sregs = crate::VcpuSpecialRegisters::sregs(&g.vcpu).unwrap();
    sregs.idt.limit = 0;
    crate::VcpuSpecialRegisters::set_sregs(&mut g.vcpu, &sregs).unwrap();
    let io = Ports::default();
    let out = run(&mut g, &io);
    assert_eq!(out, RunOutcome::Exit(Exit::Shutdown));
    let info = exit_information(&VcpuExit::Other(Exit::Shutdown)).unwrap();
    assert_eq!(info.reason, ExitReason::TripleFault);
}

/// A guest that counts forever in DATA_ADDR.
fn counter_guest() -> TinyGuest {
    TinyGuest::new(|a| {
        let mut top = a.create_label();
        a.mov(rbx, DATA_ADDR)?;
        a.set_label(&mut top)?;
        a.inc(qword_ptr(rbx))?;
        a.jmp(top)
    })
    .unwrap()
}

#[test]
fn kvm_paused_vcpu_stops_and_resumes() {
    let (tx, rx) = std::sync::mpsc::channel();
    let stop = StopHandle::new();
    let stop2 = stop.clone();
    let vcpu_thread = std::thread::spawn(move || {
        let mut g = counter_guest();
        let mut ctl = RunControl::new().unwrap();
        tx.send((g.vcpu.handle().unwrap(), g.mem.clone())).unwrap();
        let mut stats = ExitStats::default();
        let out = run_controlled(&mut g.vcpu, &Ports::default(), &stop2, &mut stats, &mut ctl);
        (out.unwrap(), stats)
    });
    let (handle, mem) = rx.recv().unwrap();
    let count = || mem.read_obj::<u64>(GuestAddress(DATA_ADDR)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count() < 1000 {
        assert!(Instant::now() < deadline, "guest never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.pause();
    assert!(
        handle.wait_paused(Duration::from_secs(5)),
        "vCPU did not park"
    );
    let frozen = count();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(count(), frozen, "paused guest kept running");
    handle.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count() <= frozen {
        assert!(Instant::now() < deadline, "guest did not resume");
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.request(0);
    handle.kick();
    let (out, stats) = vcpu_thread.join().unwrap();
    assert_eq!(out, RunOutcome::Stopped(0));
    assert!(stats.get(crate::ExitKind::Interrupted) >= 2, "{stats}");
}

#[test]
fn kvm_capped_vcpu_uses_roughly_its_budget() {
    const FRACTION: f64 = 0.25;
    const SPIN: Duration = Duration::from_secs(2);
    let stop = StopHandle::new();
    let stop2 = stop.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    let vcpu_thread = std::thread::spawn(move || {
        let mut g = counter_guest();
        let mut ctl = RunControl::new()
            .unwrap()
            .with_cap(ExecutionCap::new(FRACTION, Duration::from_millis(20)));
        tx.send(g.vcpu.handle().unwrap()).unwrap();
        let cpu0 = thread_cpu_time();
        let wall0 = Instant::now();
        let mut stats = ExitStats::default();
        let out = run_controlled(&mut g.vcpu, &Ports::default(), &stop2, &mut stats, &mut ctl);
        (
            out.unwrap(),
            thread_cpu_time() - cpu0,
            wall0.elapsed(),
            ctl.throttled(),
        )
    });
    let handle = rx.recv().unwrap();
    std::thread::sleep(SPIN);
    stop.request(0);
    handle.kick();
    let (out, cpu, wall, throttled) = vcpu_thread.join().unwrap();
    assert_eq!(out, RunOutcome::Stopped(0));
    let share = cpu.as_secs_f64() / wall.as_secs_f64();
    eprintln!(
        "capped vCPU: {:.3} s CPU in {:.3} s wall = {:.1} % (budget {:.0} %), throttled {:.3} s",
        cpu.as_secs_f64(),
        wall.as_secs_f64(),
        share * 100.0,
        FRACTION * 100.0,
        throttled.as_secs_f64()
    );
    // Generous: the budget is a ceiling; a busy 2-core CI machine may give less.
    assert!(share < FRACTION * 1.6, "over budget: {share}");
    // Lower bound only shows the vCPU ran; a loaded machine decides how much it actually got.
    assert!(share > FRACTION * 0.2, "far under budget: {share}");
}

/// Collects port 0x80 writes; stops at `stop_after` of them or at a write to 0xf4.
struct Recorder {
    out: std::cell::RefCell<Vec<u32>>,
    stop: StopHandle,
    stop_after: usize,
}

impl crate::IoHandler for Recorder {
    fn pio_read(&self, _: u16, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if port == 0xf4 {
            self.stop.request(1);
        } else if port == 0x80 {
            let mut v = [0u8; 4];
            v[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
            let mut out = self.out.borrow_mut();
            out.push(u32::from_le_bytes(v));
            if out.len() == self.stop_after {
                self.stop.request(2);
            }
        }
    }
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

fn sequence_guest() -> TinyGuest {
    // x ← 3x + 1 (mod 2^32), ten times, kept in an SSE register (XSAVE state), each step
    // written to port 0x80; then port 0xf4 ends the run (with an irqchip, `hlt` stays in KVM).
    TinyGuest::with_irqchip(|a| {
        let mut top = a.create_label();
        a.mov(rax, cr4)?;
        a.or(rax, 0x200)?; // CR4.OSFXSR: SSE on
        a.mov(cr4, rax)?;
        a.mov(eax, 1u32)?;
        a.mov(ecx, 10u32)?;
        a.mov(rbx, DATA_ADDR)?;
        a.mov(dword_ptr(rbx), eax)?;
        a.movdqu(xmm1, xmmword_ptr(rbx))?;
        a.set_label(&mut top)?;
        // The value lives in XMM1 across loop iterations (the KVM emulator handles MOVDQU).
        a.movdqu(xmmword_ptr(rbx), xmm1)?;
        a.mov(eax, dword_ptr(rbx))?;
        a.imul_3(eax, eax, 3)?;
        a.inc(eax)?;
        a.mov(dword_ptr(rbx), eax)?;
        a.movdqu(xmm1, xmmword_ptr(rbx))?;
        a.mov(dword_ptr(rbx), 0u32)?;
        a.out(0x80, eax)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.out(0xf4, al)?;
        a.hlt()
    })
    .unwrap()
}

#[test]
fn kvm_saved_vcpu_continues_in_a_new_vm() {
    use crate::snapshot::VcpuState;
    // Reference: one uninterrupted run.
    let mut a = sequence_guest();
    let rec = Recorder {
        out: Default::default(),
        stop: StopHandle::new(),
        stop_after: usize::MAX,
    };
    let mut stats = ExitStats::default();
    let out = run_until_exit(&mut a.vcpu, &rec, &rec.stop, &mut stats).unwrap();
    assert_eq!(out, RunOutcome::Stopped(1));
    let reference = rec.out.into_inner();
    assert_eq!(reference.len(), 10);

    // Run 4 steps, save, and continue in a fresh VM with a copy of the memory.
    let mut b = sequence_guest();
    let rec = Recorder {
        out: Default::default(),
        stop: StopHandle::new(),
        stop_after: 4,
    };
    let out = run_until_exit(&mut b.vcpu, &rec, &rec.stop, &mut stats).unwrap();
    assert_eq!(out, RunOutcome::Stopped(2));
    let state = VcpuState::save(&mut b.vcpu, &[0xc000_0103], true).unwrap();
    let json = serde_json::to_string(&state).unwrap();
    let state: VcpuState = serde_json::from_str(&json).unwrap();
    assert!(state.lapic.is_some());

    let mut c = sequence_guest();
    let mut buf = vec![0u8; crate::test_utils::DEFAULT_RAM as usize];
    b.mem.read_slice(&mut buf, GuestAddress(0)).unwrap();
    c.mem.write_slice(&buf, GuestAddress(0)).unwrap();
    state.restore(&mut c.vcpu).unwrap();
    let rec2 = Recorder {
        out: Default::default(),
        stop: StopHandle::new(),
        stop_after: usize::MAX,
    };
    let out = run_until_exit(&mut c.vcpu, &rec2, &rec2.stop, &mut stats).unwrap();
    assert_eq!(out, RunOutcome::Stopped(1));
    let mut combined = rec.out.into_inner();
    combined.extend(rec2.out.into_inner());
    assert_eq!(combined, reference);

    // A state from a future format is refused before anything is written.
    let mut future = state.clone();
    future.version = 99;
    assert!(matches!(
        future.restore(&mut c.vcpu),
        Err(Error::StateVersion(99))
    ));
}

/// The vCPU's own handle works under a plain `run_until_exit` loop (no `run_controlled`): a
/// kick before the run is reported by the next run without entering the guest; another
/// thread reads a spinning guest's registers (pausing and resuming it); pause parks the vCPU
/// at its next entry; a stop request plus a kick ends the loop.
#[test]
fn kvm_handle_kicks_pauses_and_reads_registers_under_run_until_exit() {
    let (tx, rx) = std::sync::mpsc::channel();
    let stop = StopHandle::new();
    let stop2 = stop.clone();
    let vcpu_thread = std::thread::spawn(move || {
        let mut g = counter_guest();
        let handle = g.vcpu.handle().unwrap();
        handle.kick();
        let first = run(&mut g, &Ports::default());
        let count0 = g.mem.read_obj::<u64>(GuestAddress(DATA_ADDR)).unwrap();
        tx.send((handle, g.mem.clone())).unwrap();
        let mut interrupted = 0;
        let mut stats = ExitStats::default();
        loop {
            match run_until_exit(&mut g.vcpu, &Ports::default(), &stop2, &mut stats).unwrap() {
                RunOutcome::Stopped(s) => break (first, count0, interrupted, s),
                RunOutcome::Exit(Exit::Interrupted) => interrupted += 1,
                RunOutcome::Exit(other) => panic!("unexpected exit {other:?}"),
            }
        }
    });
    let (handle, mem) = rx.recv().unwrap();
    let count = || mem.read_obj::<u64>(GuestAddress(DATA_ADDR)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count() < 1000 {
        assert!(Instant::now() < deadline, "guest never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The guest is `mov rbx, DATA_ADDR; top: inc qword [rbx]; jmp top`.
    let regs = handle.general_registers(Duration::from_secs(5)).unwrap();
    assert_eq!(regs.rbx, DATA_ADDR);
    let code = crate::test_utils::CODE_ADDR;
    assert!(
        (code..code + 0x20).contains(&regs.rip),
        "rip {:#x}",
        regs.rip
    );
    let sregs = handle.sregs(Duration::from_secs(5)).unwrap();
    assert_eq!(sregs.cs.selector, 0x08);
    // Resumed after the read: the guest counts on.
    let after_read = count();
    let deadline = Instant::now() + Duration::from_secs(10);
    while count() <= after_read {
        assert!(
            Instant::now() < deadline,
            "guest not resumed after the register read"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.pause();
    assert!(
        handle.wait_paused(Duration::from_secs(5)),
        "vCPU did not pause"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !handle.is_parked() {
        assert!(
            Instant::now() < deadline,
            "vCPU did not park at its next entry"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let frozen = count();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(count(), frozen, "paused guest kept running");
    stop.request(5);
    handle.resume();
    handle.kick();
    let (first, count0, interrupted, status) = vcpu_thread.join().unwrap();
    assert_eq!(first, RunOutcome::Exit(Exit::Interrupted));
    assert_eq!(
        count0, 0,
        "a pending kick is reported before the guest runs"
    );
    assert!(
        interrupted >= 2,
        "the read and the pause each interrupted a run"
    );
    assert_eq!(status, 5);
    assert!(
        crate::VcpuHandle::detached()
            .general_registers(Duration::ZERO)
            .is_err()
    );
}
