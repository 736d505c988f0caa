//! The userspace emulator behind real KVM: tiny 64-bit CPL-0 guests execute instructions this
//! machine's software KVM rejects (PLATFORM.md: BMI2 `shlx`, `cmpxchg16b`, `int3`, `clac`,
//! `popcnt`, …); each emulation-failure exit is handed to `emulate_exit` and the guest goes on.
//! The guest reports results through `out` to port 0x10, which the host records.

use std::cell::RefCell;

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};
use vmkit_vcpu::emulate::{Emulator, kvm::emulate_exit};
use vmkit_vcpu::test_utils::{DATA_ADDR, HANDLER_ADDR, TinyGuest};
use vmkit_vcpu::{
    Exit, ExitStats, IoHandler, KvmVcpu, RunOutcome, StopHandle, VcpuSpecialRegisters,
    run_until_exit,
};

/// Where the guest writes its results.
const REPORT: u16 = 0x10;

#[derive(Default)]
struct Ports(RefCell<Vec<u32>>);

impl IoHandler for Ports {
    fn pio_read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if port == REPORT {
            let mut w = [0u8; 4];
            let n = data.len().min(4);
            w[..n].copy_from_slice(&data[..n]);
            self.0.borrow_mut().push(u32::from_le_bytes(w));
        }
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn mmio_write(&self, _addr: u64, _data: &[u8]) {}
}

/// Whether this is the software KVM of PLATFORM.md, whose in-kernel emulator rejects the
/// instructions below (on a VT-x host most run natively and need no emulation).
fn software_kvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Run `vcpu` until it halts, emulating whatever KVM gives up on; the reports and the
/// emulator.
fn run(vcpu: &mut KvmVcpu, mem: &vm_memory::GuestMemoryMmap) -> (Vec<u32>, Emulator) {
    let ports = Ports::default();
    let mut emu = Emulator::new();
    let mut stats = ExitStats::default();
    for _ in 0..10_000 {
        match run_until_exit(vcpu, &ports, &StopHandle::new(), &mut stats).unwrap() {
            RunOutcome::Exit(e @ Exit::InternalError { .. }) => {
                if let Err(err) = emulate_exit(vcpu, mem, &mut emu, &e) {
                    panic!("{err}: {:?}", std::error::Error::source(&err));
                }
            }
            RunOutcome::Exit(Exit::Hlt) => return (ports.0.into_inner(), emu),
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("the guest did not halt");
}

fn report(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, REPORT as u32)?;
    a.out(dx, eax)
}

/// RFLAGS.AC into EAX.
fn read_ac(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.pushfq()?;
    a.pop(rax)?;
    a.shr(rax, 18)?;
    a.and(eax, 1)
}

#[test]
fn kvm_rejected_instructions_are_emulated_and_the_guest_continues() {
    let mut g = TinyGuest::new(|a| {
        // BMI2 and POPCNT.
        a.mov(rbx, 5u64)?;
        a.mov(rcx, 3u64)?;
        a.shlx(rax, rbx, rcx)?;
        report(a)?; // 40
        a.mov(rbx, 0xf0f0u64)?;
        a.popcnt(rax, rbx)?;
        report(a)?; // 8
        // CMPXCHG16B on the data page: (0, 0) → (7, 9).
        a.mov(rsi, DATA_ADDR)?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.mov(ebx, 7u32)?;
        a.mov(ecx, 9u32)?;
        a.lock().cmpxchg16b(xmmword_ptr(rsi))?;
        a.setz(al)?;
        a.movzx(eax, al)?;
        report(a)?; // 1
        a.mov(eax, dword_ptr(rsi + 8))?;
        report(a)?; // 9
        // INT3 through the IDT: the handler reports 0xbb and returns after the int3.
        a.int3()?;
        a.mov(eax, 0x1234u32)?;
        report(a)?;
        // STAC then CLAC (CR4.SMAP is set by the host): AC read back through PUSHFQ.
        a.stac()?;
        read_ac(a)?;
        report(a)?; // 1
        a.clac()?;
        read_ac(a)?;
        report(a)?; // 0
        a.hlt()
    })
    .unwrap();
    g.load(HANDLER_ADDR, |a| {
        a.mov(eax, 0xbbu32)?;
        report(a)?;
        a.iretq()
    })
    .unwrap();
    g.install_idt(&[(3, HANDLER_ADDR)]).unwrap();
    let mut s = g.vcpu.sregs().unwrap();
    s.cr4 |= 1 << 21; // SMAP
    g.vcpu
        .set_sregs(&s)
        .expect("KVM refused CR4.SMAP (the guest's CPUID lacks SMAP?)");
    let (out, emu) = run(&mut g.vcpu, &g.mem);
    eprintln!("emulated: {:?}", emu.stats().emulated);
    assert_eq!(out, vec![40, 8, 1, 9, 0xbb, 0x1234, 1, 0]);
    if software_kvm() {
        for m in ["shlx", "popcnt", "cmpxchg16b", "int3", "stac", "clac"] {
            assert!(
                emu.stats().emulated.contains_key(m),
                "{m} was not emulated: {:?}",
                emu.stats()
            );
        }
    } else {
        eprintln!("not the software KVM: instructions may run natively; results checked only");
    }
}

/// A memory operand on a page that is not present: the emulator injects the architectural
/// #PF; the guest's handler reports the error code and CR2.
#[test]
fn kvm_emulated_memory_operand_faults_with_cr2_and_error_code() {
    const NOT_MAPPED: u64 = 0x1_2345_6000; // above the 4 GiB the harness maps
    let mut g = TinyGuest::new(|a| {
        a.mov(rbx, NOT_MAPPED + 0x18)?;
        a.mov(rcx, 1u64)?;
        a.shlx(rax, qword_ptr(rbx), rcx)?;
        a.mov(eax, 0xdeadu32)?; // not reached
        report(a)?;
        a.hlt()
    })
    .unwrap();
    g.load(HANDLER_ADDR, |a| {
        a.pop(rax)?; // the error code
        report(a)?;
        a.mov(rax, cr2)?;
        report(a)?;
        a.shr(rax, 32)?;
        report(a)?;
        a.hlt()
    })
    .unwrap();
    g.install_idt(&[(14, HANDLER_ADDR)]).unwrap();
    let (out, emu) = run(&mut g.vcpu, &g.mem);
    eprintln!(
        "emulated: {:?}, exceptions {:?}",
        emu.stats().emulated,
        emu.stats().exceptions
    );
    // Not present, a supervisor read: error code 0; CR2 the operand's address.
    assert_eq!(out, vec![0, 0x2345_6018, 1]);
}

/// Two vCPUs increment one 128-bit counter with `lock cmpxchg16b` loops: no update is lost,
/// whether KVM or the emulator (a host atomic on the guest page) executes them.
#[test]
fn kvm_cmpxchg16b_race_between_two_vcpus_loses_no_update() {
    const N: u32 = 150;
    let program = |a: &mut CodeAssembler| -> Result<(), IcedError> {
        a.mov(rsi, DATA_ADDR)?;
        a.mov(edi, N)?;
        let mut next = a.create_label();
        let mut retry = a.create_label();
        a.set_label(&mut next)?;
        a.mov(rax, qword_ptr(rsi))?;
        a.mov(rdx, qword_ptr(rsi + 8))?;
        a.set_label(&mut retry)?;
        a.mov(rbx, rax)?;
        a.mov(rcx, rdx)?;
        a.add(rbx, 1)?;
        a.adc(rcx, 0)?;
        a.lock().cmpxchg16b(xmmword_ptr(rsi))?;
        a.jnz(retry)?;
        a.dec(edi)?;
        a.jnz(next)?;
        a.hlt()
    };
    let mut g = TinyGuest::new(program).unwrap();
    let mut second = g.vm.create_vcpu(1).unwrap();
    g.state.apply(&mut second).unwrap();
    let mem = g.mem.clone();
    std::thread::scope(|s| {
        let t = s.spawn(|| run(&mut second, &mem).1);
        let (_, emu0) = run(&mut g.vcpu, &g.mem);
        let emu1 = t.join().unwrap();
        eprintln!(
            "vcpu 0 emulated {:?}, vcpu 1 {:?}",
            emu0.stats().emulated,
            emu1.stats().emulated
        );
    });
    let lo: u64 = g.mem.read_obj(GuestAddress(DATA_ADDR)).unwrap();
    let hi: u64 = g.mem.read_obj(GuestAddress(DATA_ADDR + 8)).unwrap();
    assert_eq!((lo, hi), (2 * u64::from(N), 0));
}
