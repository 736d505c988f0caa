//! The emulator on plain guest memory (no KVM): instruction bytes assembled with iced-x86,
//! results checked against the host CPU where it runs the same instruction, faults checked
//! against the SDM's error codes.

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_memory::paging::{PageSize, PageTableBuilder, flags};

use super::alu::oracle_tests as host;
use super::*;

const CODE: u64 = 0x40_0000;
const DATA: u64 = 0x50_0000;
/// Mapped read-only.
const RO: u64 = 0x51_0000;
/// Mapped user (for SMAP).
const USER: u64 = 0x52_0000;
/// Not mapped at all.
const UNMAPPED: u64 = 0x60_0000;

fn machine() -> (GuestMemoryMmap, CpuState) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    let mut pt = PageTableBuilder::new(&mem, 0x1000, 0x8000).unwrap();
    for i in 0..4 {
        pt.map(
            CODE + i * 4096,
            0x20_0000 + i * 4096,
            PageSize::Size4K,
            flags::USER,
        )
        .unwrap();
        pt.map(
            DATA + i * 4096,
            0x30_0000 + i * 4096,
            PageSize::Size4K,
            flags::WRITABLE,
        )
        .unwrap();
    }
    pt.map(RO, 0x31_0000, PageSize::Size4K, 0).unwrap();
    pt.map(
        USER,
        0x32_0000,
        PageSize::Size4K,
        flags::WRITABLE | flags::USER,
    )
    .unwrap();
    let cpu = CpuState {
        rip: CODE,
        rflags: 2,
        cr0: CR0_PG | 1 | (1 << 16), // PG, PE, WP
        cr3: pt.cr3(),
        cr4: (1 << 5) | CR4_OSXSAVE, // PAE, OSXSAVE
        efer: (1 << 8) | EFER_LMA | (1 << 11),
        long_mode: true,
        maxphyaddr: 46,
        xcr0: 3,
        xcr0_supported: 7,
        ..CpuState::default()
    };
    (mem, cpu)
}

/// Write the program at RIP and emulate one instruction.
fn run(
    mem: &GuestMemoryMmap,
    cpu: &mut CpuState,
    program: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> (Result<Outcome, EmulateError>, usize) {
    let mut a = CodeAssembler::new(64).unwrap();
    program(&mut a).unwrap();
    let code = a.assemble(cpu.rip).unwrap();
    mem.write_slice(&code, GuestAddress(0x20_0000 + (cpu.rip - CODE)))
        .unwrap();
    // Give the emulator only the first byte: the rest comes through the guest's paging.
    (Emulator::new().step(cpu, mem, &code[..1]), code.len())
}

/// A one-instruction program.
type Asm = fn(&mut CodeAssembler) -> Result<(), IcedError>;

fn emulated(r: Result<Outcome, EmulateError>) -> &'static str {
    match r {
        Ok(Outcome::Emulated { mnemonic }) => mnemonic,
        other => panic!("not emulated: {other:?}"),
    }
}

/// Register-form instructions against the host: operands in the Intel order, every
/// register the instruction writes and every arithmetic flag.
#[test]
fn register_forms_match_the_host_cpu() {
    if !std::is_x86_feature_detected!("bmi2") || !std::is_x86_feature_detected!("lzcnt") {
        eprintln!("SKIPPED register_forms_match_the_host_cpu: host lacks BMI2/LZCNT");
        return;
    }
    let values = [
        0u64,
        1,
        0x8000_0000_0000_0000,
        u64::MAX,
        0x0123_4567_89ab_cdef,
        0xf0f0,
    ];
    type Host = fn(u64, u64, u64) -> (u64, u64);
    let binary: [(&str, Asm, Host); 6] = [
        ("andn", |a| a.andn(rax, rbx, rcx), host::h_andn64),
        ("bextr", |a| a.bextr(rax, rbx, rcx), host::h_bextr64),
        ("shlx", |a| a.shlx(rax, rbx, rcx), host::h_shlx64),
        ("sarx", |a| a.sarx(eax, ebx, ecx), host::h_sarx32),
        ("pdep", |a| a.pdep(rax, rbx, rcx), host::h_pdep64),
        ("pext", |a| a.pext(rax, rbx, rcx), host::h_pext64),
    ];
    for &(name, asm, host_fn) in &binary {
        for &b in &values {
            for &c in &values {
                let (mem, mut cpu) = machine();
                cpu.gpr[3] = b;
                cpu.gpr[1] = c;
                cpu.rflags = 2 | ARITH;
                let (r, len) = run(&mem, &mut cpu, asm);
                assert_eq!(emulated(r), name);
                let (want, wflags) = host_fn(b, c, ARITH);
                assert_eq!(cpu.gpr[0], want, "{name} {b:#x} {c:#x}");
                assert_eq!(cpu.rflags & ARITH, wflags, "{name} flags {b:#x} {c:#x}");
                assert_eq!(cpu.rip, CODE + len as u64);
            }
        }
    }
    type HostU = fn(u64, u64) -> (u64, u64);
    let unary: [(&str, Asm, HostU); 6] = [
        ("popcnt", |a| a.popcnt(rax, rbx), host::h_popcnt64),
        ("lzcnt", |a| a.lzcnt(eax, ebx), host::h_lzcnt32),
        ("tzcnt", |a| a.tzcnt(rax, rbx), host::h_tzcnt64),
        ("blsi", |a| a.blsi(rax, rbx), host::h_blsi64),
        ("blsr", |a| a.blsr(eax, ebx), host::h_blsr32),
        ("blsmsk", |a| a.blsmsk(rax, rbx), host::h_blsmsk64),
    ];
    for &(name, asm, host_fn) in &unary {
        for &b in &values {
            let (mem, mut cpu) = machine();
            cpu.gpr[0] = 0xdead_beef_dead_beef;
            cpu.gpr[3] = b;
            let (r, _) = run(&mem, &mut cpu, asm);
            assert_eq!(emulated(r), name);
            assert_eq!(
                (cpu.gpr[0], cpu.rflags & ARITH),
                host_fn(b, 0),
                "{name} {b:#x}"
            );
        }
    }
    // MULX: RDX times the source, high half to the first operand.
    let (mem, mut cpu) = machine();
    cpu.gpr[2] = 0x0123_4567_89ab_cdef;
    cpu.gpr[3] = u64::MAX;
    let (r, _) = run(&mem, &mut cpu, |a| a.mulx(rax, rcx, rbx));
    assert_eq!(emulated(r), "mulx");
    assert_eq!(
        (cpu.gpr[0], cpu.gpr[1]),
        host::h_mulx64(cpu.gpr[2], u64::MAX)
    );
    // RORX with an immediate.
    let (mem, mut cpu) = machine();
    cpu.gpr[3] = 0x0123_4567_89ab_cdef;
    let (r, _) = run(&mem, &mut cpu, |a| a.rorx(rax, rbx, 12));
    assert_eq!(emulated(r), "rorx");
    assert_eq!(cpu.gpr[0], 0x0123_4567_89ab_cdefu64.rotate_right(12));
}

#[test]
fn memory_operands_go_through_the_guest_page_tables() {
    let (mem, mut cpu) = machine();
    mem.write_obj(0xf0f0_f0f0_0000_0001u64, GuestAddress(0x30_0008))
        .unwrap();
    cpu.gpr[3] = DATA;
    let (r, _) = run(&mem, &mut cpu, |a| a.popcnt(rax, qword_ptr(rbx + 8)));
    assert_eq!(emulated(r), "popcnt");
    assert_eq!(cpu.gpr[0], 17);
    // RIP-relative: [rip + disp] resolves against the next instruction.
    let (mem, mut cpu) = machine();
    mem.write_obj(0x8000u64, GuestAddress(0x30_0000)).unwrap();
    let (r, _) = run(&mem, &mut cpu, |a| a.tzcnt(rax, qword_ptr(DATA)));
    assert_eq!(emulated(r), "tzcnt");
    assert_eq!(cpu.gpr[0], 15);
}

#[test]
fn faults_are_the_architectural_page_faults() {
    use vmkit_memory::walk::pfec;
    // Read of a page that is not present: #PF, error code 0, CR2 the address; RIP unchanged.
    let (mem, mut cpu) = machine();
    cpu.gpr[3] = UNMAPPED + 0x10;
    let (r, _) = run(&mem, &mut cpu, |a| a.shlx(rax, qword_ptr(rbx), rcx));
    assert_eq!(
        r.unwrap(),
        Outcome::Exception(Exception::page_fault(0, UNMAPPED + 0x10))
    );
    assert_eq!(cpu.rip, CODE);
    // CMPXCHG16B on a read-only page (CR0.WP): a write fault, P | W/R.
    let (mem, mut cpu) = machine();
    cpu.gpr[3] = RO;
    let (r, _) = run(&mem, &mut cpu, |a| a.cmpxchg16b(xmmword_ptr(rbx)));
    assert_eq!(
        r.unwrap(),
        Outcome::Exception(Exception::page_fault(pfec::P | pfec::WR, RO))
    );
    // SMAP: a supervisor read of a user page faults unless EFLAGS.AC.
    let (mem, mut cpu) = machine();
    cpu.cr4 |= CR4_SMAP;
    cpu.gpr[3] = USER;
    let (r, _) = run(&mem, &mut cpu, |a| a.popcnt(rax, qword_ptr(rbx)));
    assert_eq!(
        r.unwrap(),
        Outcome::Exception(Exception::page_fault(pfec::P, USER))
    );
    cpu.rflags |= AC;
    let (r, _) = run(&mem, &mut cpu, |a| a.popcnt(rax, qword_ptr(rbx)));
    assert_eq!(emulated(r), "popcnt");
    // A user-mode (CPL 3) read of a supervisor page.
    let (mem, mut cpu) = machine();
    cpu.cpl = 3;
    cpu.gpr[3] = DATA;
    let (r, _) = run(&mem, &mut cpu, |a| a.popcnt(rax, qword_ptr(rbx)));
    assert_eq!(
        r.unwrap(),
        Outcome::Exception(Exception::page_fault(pfec::P | pfec::US, DATA))
    );
    // A non-canonical address: #GP(0).
    let (mem, mut cpu) = machine();
    cpu.gpr[3] = 0x8000_0000_0000_0000;
    let (r, _) = run(&mem, &mut cpu, |a| a.popcnt(rax, qword_ptr(rbx)));
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::gp(0)));
    // The instruction's own bytes cross into an unmapped page: a fetch fault.
    let (mem, mut cpu) = machine();
    cpu.rip = CODE + 4 * 4096 - 2;
    let code = [0xc4, 0xe2, 0xf1, 0xf7, 0xc3]; // shlx rax, rbx, rcx
    mem.write_slice(&code[..2], GuestAddress(0x20_0000 + 4 * 4096 - 2))
        .unwrap();
    let r = Emulator::new().step(&mut cpu, &mem, &[]);
    assert_eq!(
        r.unwrap(),
        Outcome::Exception(Exception::page_fault(pfec::ID, CODE + 4 * 4096))
    );
}

#[test]
fn cmpxchg8b_and_16b_compare_exchange_and_check_alignment() {
    let (mem, mut cpu) = machine();
    mem.write_obj(0x1111_2222_3333_4444u64, GuestAddress(0x30_0000))
        .unwrap();
    mem.write_obj(0x5555_6666_7777_8888u64, GuestAddress(0x30_0008))
        .unwrap();
    cpu.gpr[3] = DATA; // rbx is the new low half below, so address through rsi
    cpu.gpr[6] = DATA;
    // Mismatch: RDX:RAX loaded, ZF clear, memory unchanged.
    cpu.rflags |= ZF;
    let (r, _) = run(&mem, &mut cpu, |a| a.cmpxchg16b(xmmword_ptr(rsi)));
    assert_eq!(emulated(r), "cmpxchg16b");
    assert_eq!(
        (cpu.gpr[0], cpu.gpr[2]),
        (0x1111_2222_3333_4444, 0x5555_6666_7777_8888)
    );
    assert_eq!(cpu.rflags & ZF, 0);
    // Match: RCX:RBX stored, ZF set.
    cpu.rip = CODE;
    cpu.gpr[3] = 0xaaaa;
    cpu.gpr[1] = 0xbbbb;
    let (r, _) = run(&mem, &mut cpu, |a| a.cmpxchg16b(xmmword_ptr(rsi)));
    assert_eq!(emulated(r), "cmpxchg16b");
    assert_ne!(cpu.rflags & ZF, 0);
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(0x30_0000)).unwrap(),
        0xaaaa
    );
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(0x30_0008)).unwrap(),
        0xbbbb
    );
    // Misaligned CMPXCHG16B: #GP(0).
    cpu.rip = CODE;
    cpu.gpr[6] = DATA + 8;
    let (r, _) = run(&mem, &mut cpu, |a| a.cmpxchg16b(xmmword_ptr(rsi)));
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::gp(0)));
    // CMPXCHG8B across a page boundary (split: not naturally aligned).
    let (mem, mut cpu) = machine();
    mem.write_obj(0x0102_0304u32, GuestAddress(0x30_0ffc))
        .unwrap();
    mem.write_obj(0x0506_0708u32, GuestAddress(0x30_1000))
        .unwrap();
    cpu.gpr[6] = DATA + 0xffc;
    cpu.gpr[0] = 0x0102_0304;
    cpu.gpr[2] = 0x0506_0708;
    cpu.gpr[3] = 0x1;
    cpu.gpr[1] = 0x2;
    let (r, _) = run(&mem, &mut cpu, |a| a.cmpxchg8b(qword_ptr(rsi)));
    assert_eq!(emulated(r), "cmpxchg8b");
    assert_ne!(cpu.rflags & ZF, 0);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x30_0ffc)).unwrap(), 1);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x30_1000)).unwrap(), 2);
}

/// Two threads (two "vCPUs") increment one 128-bit counter through emulated CMPXCHG16B
/// loops: no update is lost.
#[test]
fn cmpxchg16b_is_atomic_between_vcpus() {
    let (mem, cpu0) = machine();
    let mut a = CodeAssembler::new(64).unwrap();
    a.cmpxchg16b(xmmword_ptr(rsi)).unwrap();
    let code = a.assemble(CODE).unwrap();
    mem.write_slice(&code, GuestAddress(0x20_0000)).unwrap();
    const N: u64 = 20_000;
    std::thread::scope(|s| {
        for _ in 0..2 {
            let (mem, mut cpu, code) = (&mem, cpu0.clone(), &code);
            s.spawn(move || {
                let mut emu = Emulator::new();
                cpu.gpr[6] = DATA;
                let mut done = 0;
                let (mut lo, mut hi) = (0u64, 0u64);
                while done < N {
                    cpu.rip = CODE;
                    cpu.gpr[0] = lo;
                    cpu.gpr[2] = hi;
                    let (nlo, carry) = lo.overflowing_add(1);
                    cpu.gpr[3] = nlo;
                    cpu.gpr[1] = hi + u64::from(carry);
                    emu.step(&mut cpu, mem, code).unwrap();
                    if cpu.rflags & ZF != 0 {
                        done += 1;
                        (lo, hi) = (nlo, hi + u64::from(carry));
                    } else {
                        (lo, hi) = (cpu.gpr[0], cpu.gpr[2]);
                    }
                }
            });
        }
    });
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x30_0000)).unwrap(), 2 * N);
}

#[test]
fn system_instructions_and_software_events() {
    // CLAC/STAC: #UD without CR4.SMAP or at CPL 3; else AC changes.
    let (mem, mut cpu) = machine();
    let (r, _) = run(&mem, &mut cpu, |a| a.stac());
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::ud()));
    cpu.cr4 |= CR4_SMAP;
    let (r, _) = run(&mem, &mut cpu, |a| a.stac());
    assert_eq!(emulated(r), "stac");
    assert_ne!(cpu.rflags & AC, 0);
    let (r, _) = run(&mem, &mut cpu, |a| a.clac());
    assert_eq!(emulated(r), "clac");
    assert_eq!(cpu.rflags & AC, 0);
    cpu.cpl = 3;
    let (r, _) = run(&mem, &mut cpu, |a| a.clac());
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::ud()));

    // INT3, INT n: software events at RIP with the instruction's length; INTO, invalid in
    // 64-bit mode, #UD.
    let (mem, mut cpu) = machine();
    let mut emu = Emulator::new();
    mem.write_slice(&[0xcc, 0xcd, 0x80, 0xce], GuestAddress(0x20_0000))
        .unwrap();
    let soft = |vector, kind, len| {
        Outcome::Exception(Exception {
            vector,
            error_code: None,
            cr2: None,
            kind,
            instruction_len: len,
        })
    };
    assert_eq!(
        emu.step(&mut cpu, &mem, &[0xcc]).unwrap(),
        soft(BP, EventKind::SoftwareException, 1)
    );
    assert_eq!(cpu.rip, CODE);
    cpu.rip = CODE + 1;
    assert_eq!(
        emu.step(&mut cpu, &mem, &[]).unwrap(),
        soft(0x80, EventKind::SoftwareInterrupt, 2)
    );
    cpu.rip = CODE + 3;
    assert_eq!(
        emu.step(&mut cpu, &mem, &[]).unwrap(),
        Outcome::Exception(Exception::ud())
    );
    assert_eq!(emu.stats().emulated.get("int3"), Some(&1));
    assert_eq!(emu.stats().emulated.get("int"), Some(&1));

    // RDTSCP and RDPID.
    let (mem, mut cpu) = machine();
    cpu.tsc = 0x1234_5678_9abc_def0;
    cpu.tsc_aux = 7;
    let (r, _) = run(&mem, &mut cpu, |a| a.rdtscp());
    assert_eq!(emulated(r), "rdtscp");
    assert_eq!(
        (cpu.gpr[0], cpu.gpr[2], cpu.gpr[1]),
        (0x9abc_def0, 0x1234_5678, 7)
    );
    let (r, _) = run(&mem, &mut cpu, |a| a.rdpid(r9));
    assert_eq!(emulated(r), "rdpid");
    assert_eq!(cpu.gpr[9], 7);
    cpu.cr4 |= CR4_TSD;
    cpu.cpl = 3;
    let (r, _) = run(&mem, &mut cpu, |a| a.rdtscp());
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::gp(0)));

    // XGETBV / XSETBV.
    let (mem, mut cpu) = machine();
    cpu.gpr[1] = 0;
    let (r, _) = run(&mem, &mut cpu, |a| a.xgetbv());
    assert_eq!(emulated(r), "xgetbv");
    assert_eq!((cpu.gpr[0], cpu.gpr[2]), (3, 0));
    for (value, ok) in [
        (7u64, true),
        (1, true),
        (0, false),
        (5, false),
        (0xf, false),
    ] {
        cpu.gpr[0] = value;
        cpu.gpr[2] = 0;
        cpu.gpr[1] = 0;
        let (r, _) = run(&mem, &mut cpu, |a| a.xsetbv());
        match ok {
            true => assert_eq!((emulated(r), cpu.xcr0), ("xsetbv", value)),
            false => assert_eq!(r.unwrap(), Outcome::Exception(Exception::gp(0)), "{value}"),
        }
    }
    cpu.cr4 &= !CR4_OSXSAVE;
    let (r, _) = run(&mem, &mut cpu, |a| a.xgetbv());
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::ud()));

    // FWAIT: nothing; #NM with CR0.MP and TS; #MF with a pending unmasked x87 error and NE.
    let (mem, mut cpu) = machine();
    cpu.xsave = vec![0u8; 4096];
    let (r, _) = run(&mem, &mut cpu, |a| a.wait());
    assert_eq!(emulated(r), "fwait");
    cpu.cr0 |= 0b1010;
    let (r, _) = run(&mem, &mut cpu, |a| a.wait());
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::fault(NM)));
    cpu.cr0 &= !0b1000;
    cpu.cr0 |= 1 << 5;
    cpu.xsave[2] = 0x80;
    let (r, _) = run(&mem, &mut cpu, |a| a.wait());
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::fault(MF)));
}

#[test]
fn xsave_and_xrstor_round_trip_the_vcpu_area() {
    let (mem, mut cpu) = machine();
    // A vCPU area: FCW 0x27f, MXCSR 0x1f80 (mask 0xffff), XMM0 a pattern; x87 and SSE in use.
    let mut area = vec![0u8; 4096];
    area[0..2].copy_from_slice(&0x027fu16.to_le_bytes());
    area[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    area[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    area[160..176].copy_from_slice(&[0xab; 16]);
    area[512..520].copy_from_slice(&3u64.to_le_bytes());
    cpu.xsave = area.clone();
    cpu.gpr[0] = 3; // RFBM = x87 | SSE
    cpu.gpr[2] = 0;
    cpu.gpr[6] = DATA;
    let (r, _) = run(&mem, &mut cpu, |a| a.xsave64(ptr(rsi)));
    assert_eq!(emulated(r), "xsave");
    let mut img = vec![0u8; 576];
    mem.read_slice(&mut img, GuestAddress(0x30_0000)).unwrap();
    assert_eq!(&img[0..2], &0x027fu16.to_le_bytes());
    assert_eq!(&img[160..176], &[0xab; 16]);
    assert_eq!(&img[512..520], &3u64.to_le_bytes());
    // XRSTOR of the saved image after the vCPU area was clobbered restores it; a header with
    // XSTATE_BV[1] clear initialises XMM instead.
    cpu.xsave[160..176].fill(0);
    cpu.xsave[0..2].fill(0);
    let (r, _) = run(&mem, &mut cpu, |a| a.xrstor64(ptr(rsi)));
    assert_eq!(emulated(r), "xrstor");
    assert_eq!(cpu.xsave[..576], area[..576]);
    assert!(cpu.extended_state_dirty);
    mem.write_obj(1u64, GuestAddress(0x30_0000 + 512)).unwrap();
    let (r, _) = run(&mem, &mut cpu, |a| a.xrstor64(ptr(rsi)));
    assert_eq!(emulated(r), "xrstor");
    assert_eq!(&cpu.xsave[160..176], &[0u8; 16]);
    // Bad headers and alignment: #GP(0), the area unchanged.
    let before = cpu.xsave.clone();
    mem.write_obj(1u64 << 63, GuestAddress(0x30_0000 + 520))
        .unwrap();
    let (r, _) = run(&mem, &mut cpu, |a| a.xrstor64(ptr(rsi)));
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::gp(0)));
    mem.write_obj(0u64, GuestAddress(0x30_0000 + 520)).unwrap();
    mem.write_obj(0xffff_0000u32, GuestAddress(0x30_0000 + 24))
        .unwrap(); // MXCSR reserved
    let (r, _) = run(&mem, &mut cpu, |a| a.xrstor64(ptr(rsi)));
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::gp(0)));
    cpu.gpr[6] = DATA + 32;
    let (r, _) = run(&mem, &mut cpu, |a| a.xsave64(ptr(rsi)));
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::gp(0)));
    assert_eq!(cpu.xsave, before);
}

/// The compacted forms (XSAVEC, XSAVES, and XRSTOR/XRSTORS of a compacted area), which a
/// Linux kernel uses once it finds XSAVEC/XSAVES, and LDMXCSR/STMXCSR.
#[test]
fn compacted_areas_and_mxcsr() {
    let (mem, mut cpu) = machine();
    let (avx_off, avx_size) = {
        let r = std::arch::x86_64::__cpuid_count(0xd, 2);
        (r.ebx as usize, r.eax as usize)
    };
    if avx_size == 0 || avx_off + avx_size > 4096 {
        eprintln!("SKIPPED compacted_areas_and_mxcsr: the host has no AVX XSAVE component");
        return;
    }
    cpu.xcr0 = 7;
    let mut area = vec![0u8; 4096];
    area[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
    area[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    area[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    area[160..176].copy_from_slice(&[0x11; 16]);
    area[avx_off..avx_off + 16].copy_from_slice(&[0x22; 16]);
    area[512..520].copy_from_slice(&6u64.to_le_bytes()); // SSE and AVX in use, x87 initial
    cpu.xsave = area.clone();
    cpu.gpr[0] = 7;
    cpu.gpr[2] = 0;
    cpu.gpr[6] = DATA;
    let (r, _) = run(&mem, &mut cpu, |a| a.xsavec64(ptr(rsi)));
    assert_eq!(emulated(r), "xsavec");
    let mut hdr = [0u8; 16];
    mem.read_slice(&mut hdr, GuestAddress(0x30_0000 + 512))
        .unwrap();
    assert_eq!(u64::from_le_bytes(hdr[0..8].try_into().unwrap()), 6);
    assert_eq!(
        u64::from_le_bytes(hdr[8..16].try_into().unwrap()),
        7 | 1 << 63
    );
    let mut ymm = [0u8; 16];
    mem.read_slice(&mut ymm, GuestAddress(0x30_0000 + 576))
        .unwrap();
    assert_eq!(ymm, [0x22; 16], "AVX at its compacted offset, 576");
    // Restore the compacted image into a clobbered area.
    cpu.xsave[160..176].fill(0);
    cpu.xsave[avx_off..avx_off + 16].fill(0);
    let (r, _) = run(&mem, &mut cpu, |a| a.xrstor64(ptr(rsi)));
    assert_eq!(emulated(r), "xrstor");
    assert_eq!(&cpu.xsave[160..176], &[0x11; 16]);
    assert_eq!(&cpu.xsave[avx_off..avx_off + 16], &[0x22; 16]);
    // XSAVES/XRSTORS are CPL 0 only; XRSTORS refuses a standard-format area.
    cpu.cpl = 3;
    let (r, _) = run(&mem, &mut cpu, |a| a.xrstors64(ptr(rsi)));
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::gp(0)));
    cpu.cpl = 0;
    let (r, _) = run(&mem, &mut cpu, |a| a.xsaves64(ptr(rsi)));
    assert_eq!(emulated(r), "xsaves");
    mem.write_obj(0u64, GuestAddress(0x30_0000 + 520)).unwrap();
    let (r, _) = run(&mem, &mut cpu, |a| a.xrstors64(ptr(rsi)));
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::gp(0)));
    // XSTATE_BV naming a component XCOMP_BV lacks: #GP.
    mem.write_obj(1u64 << 63 | 3, GuestAddress(0x30_0000 + 520))
        .unwrap();
    mem.write_obj(7u64, GuestAddress(0x30_0000 + 512)).unwrap();
    let (r, _) = run(&mem, &mut cpu, |a| a.xrstor64(ptr(rsi)));
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::gp(0)));

    // LDMXCSR / STMXCSR (CR4.OSFXSR needed).
    cpu.cr4 |= 1 << 9;
    mem.write_obj(0x1f00u32, GuestAddress(0x30_0100)).unwrap();
    cpu.gpr[6] = DATA + 0x100;
    let (r, _) = run(&mem, &mut cpu, |a| a.ldmxcsr(dword_ptr(rsi)));
    assert_eq!(emulated(r), "ldmxcsr");
    assert_eq!(&cpu.xsave[24..28], &0x1f00u32.to_le_bytes());
    cpu.gpr[6] = DATA + 0x104;
    let (r, _) = run(&mem, &mut cpu, |a| a.stmxcsr(dword_ptr(rsi)));
    assert_eq!(emulated(r), "stmxcsr");
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x30_0104)).unwrap(),
        0x1f00
    );
    mem.write_obj(0x1_0000u32, GuestAddress(0x30_0100)).unwrap(); // bit 16: reserved
    cpu.gpr[6] = DATA + 0x100;
    let (r, _) = run(&mem, &mut cpu, |a| a.ldmxcsr(dword_ptr(rsi)));
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::gp(0)));
    cpu.cr4 &= !(1 << 9);
    let (r, _) = run(&mem, &mut cpu, |a| a.ldmxcsr(dword_ptr(rsi)));
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::ud()));
}

#[test]
fn what_is_not_emulated_is_refused_with_its_disassembly() {
    let (mem, mut cpu) = machine();
    let (r, _) = run(&mem, &mut cpu, |a| a.vaddps(ymm0, ymm1, ymm2));
    match r {
        Err(EmulateError::Unsupported { disassembly }) => {
            assert!(disassembly.contains("vaddps"), "{disassembly}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(cpu.rip, CODE, "a refusal changes nothing");
    // Bytes that are no instruction.
    let (mem, mut cpu) = machine();
    mem.write_slice(&[0x0f, 0x0b], GuestAddress(0x20_0000))
        .unwrap(); // ud2: valid, refused
    assert!(matches!(
        Emulator::new().step(&mut cpu, &mem, &[]),
        Err(EmulateError::Unsupported { .. })
    ));
    // Not an instruction in 64-bit mode (AAA, 0x37): #UD, as the CPU raises it.
    mem.write_slice(&[0x37], GuestAddress(0x20_0000)).unwrap();
    assert_eq!(
        Emulator::new().step(&mut cpu, &mem, &[0x37]).unwrap(),
        Outcome::Exception(Exception::ud())
    );
    // Too few bytes, and no more to fetch (the next page is not RAM): a decode error.
    let (mem, mut cpu) = machine();
    cpu.cr0 &= !CR0_PG;
    cpu.rip = (8 << 20) - 2;
    mem.write_slice(&[0xc4, 0xe2], GuestAddress(cpu.rip))
        .unwrap();
    assert!(matches!(
        Emulator::new().step(&mut cpu, &mem, &[]),
        Err(EmulateError::NotRam { .. } | EmulateError::Decode { .. })
    ));
}

/// Vector moves: memory → register → memory through the XSAVE area; the legacy form keeps the
/// upper YMM half, the VEX.128 form zeroes it; the aligned forms want alignment (#GP(0)).
#[test]
fn vector_moves_go_through_the_xsave_area() {
    let avx_off = std::arch::x86_64::__cpuid_count(0xd, 2).ebx as usize;
    if avx_off == 0 {
        eprintln!("SKIPPED vector_moves_go_through_the_xsave_area: no AVX XSAVE component");
        return;
    }
    let (mem, mut cpu) = machine();
    cpu.cr4 |= 1 << 9; // OSFXSR
    cpu.xcr0 = 7;
    cpu.xsave = vec![0u8; 4096];
    let pattern: Vec<u8> = (0..32u8).collect();
    mem.write_slice(&pattern, GuestAddress(0x30_0000)).unwrap();
    cpu.gpr[6] = DATA;
    cpu.gpr[7] = DATA + 0x100;
    let (r, _) = run(&mem, &mut cpu, |a| a.vmovdqu(ymm3, ptr(rsi)));
    assert_eq!(emulated(r), "vmovdqu");
    assert_eq!(&cpu.xsave[160 + 48..160 + 64], &pattern[..16]);
    assert_eq!(&cpu.xsave[avx_off + 48..avx_off + 64], &pattern[16..]);
    let (r, _) = run(&mem, &mut cpu, |a| a.vmovdqu(ptr(rdi), ymm3));
    assert_eq!(emulated(r), "vmovdqu");
    let mut back = [0u8; 32];
    mem.read_slice(&mut back, GuestAddress(0x30_0100)).unwrap();
    assert_eq!(&back[..], &pattern[..]);
    // Legacy MOVDQU xmm3 keeps YMM3's upper half; VEX.128 zeroes it.
    let (r, _) = run(&mem, &mut cpu, |a| a.movdqu(xmm3, ptr(rdi)));
    assert_eq!(emulated(r), "movdqu");
    assert_eq!(&cpu.xsave[avx_off + 48..avx_off + 64], &pattern[16..]);
    let (r, _) = run(&mem, &mut cpu, |a| a.vmovdqu(xmm3, ptr(rdi)));
    assert_eq!(emulated(r), "vmovdqu");
    assert_eq!(&cpu.xsave[avx_off + 48..avx_off + 64], &[0u8; 16]);
    // With AVX-512 on, a VEX write also zeroes bits 511:256 (the ZMM_Hi256 component).
    let zmm = std::arch::x86_64::__cpuid_count(0xd, 6);
    let (z_off, z_size) = (zmm.ebx as usize, zmm.eax as usize);
    if z_size == 512 && z_off + z_size <= 4096 {
        cpu.xcr0 = 0xe7;
        cpu.xsave[z_off + 96..z_off + 128].fill(0xee);
        let (r, _) = run(&mem, &mut cpu, |a| a.vmovdqu(ymm3, ptr(rsi)));
        assert_eq!(emulated(r), "vmovdqu");
        assert_eq!(&cpu.xsave[z_off + 96..z_off + 128], &[0u8; 32]);
        cpu.xcr0 = 7;
    }
    // Register to register.
    let (r, _) = run(&mem, &mut cpu, |a| a.movaps(xmm5, xmm3));
    assert_eq!(emulated(r), "movaps");
    assert_eq!(&cpu.xsave[160 + 80..160 + 96], &pattern[..16]);
    // MOVDQA on a misaligned address: #GP(0); without OSFXSR: #UD.
    cpu.gpr[6] = DATA + 8;
    let (r, _) = run(&mem, &mut cpu, |a| a.movdqa(xmm1, ptr(rsi)));
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::gp(0)));
    cpu.cr4 &= !(1 << 9);
    let (r, _) = run(&mem, &mut cpu, |a| a.movdqu(xmm1, ptr(rsi)));
    assert_eq!(r.unwrap(), Outcome::Exception(Exception::ud()));
}

/// XRSTOR of an area at the top of the linear address space: the header's address wraps to
/// the bottom (a fuzz finding, an overflow panic before), where nothing is mapped: #PF there.
#[test]
fn xrstor_at_the_top_of_the_address_space_faults_not_panics() {
    let (mem, mut cpu) = machine();
    cpu.xsave = vec![0u8; 4096];
    cpu.gpr[0] = 3;
    cpu.gpr[6] = 0xffff_ffff_ffff_ffc0;
    let (r, _) = run(&mem, &mut cpu, |a| a.xrstor64(ptr(rsi)));
    assert_eq!(
        r.unwrap(),
        Outcome::Exception(Exception::page_fault(0, 0x1c0))
    );
}
