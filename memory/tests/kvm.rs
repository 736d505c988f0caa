//! Tests against the real /dev/kvm (names start with `kvm_`): the walker against KVM_TRANSLATE
//! (or a tiny guest reading through the mappings), and dirty tracking against guest writes.
//! vmkit-vcpu depends on this crate, so the VM is set up with kvm-ioctls directly.

use iced_x86::IcedError;
use iced_x86::code_asm::{CodeAssembler, al, eax, ecx, qword_ptr, rax, rbx, rsi};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmkit_memory::dirty::{self, BitmapSource, DirtyTracker, KvmDirtyLog, KvmDirtyRing, KvmSlot};
use vmkit_memory::paging::{PageSize, PageTableBuilder, flags};
use vmkit_memory::test_utils::Rng;
use vmkit_memory::walk::{self, Access, PagingMode};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const RAM: u64 = 32 << 20;
const CODE: u64 = 0x1_0000;
const GDT: u64 = 0x500;
const TABLES: u64 = 0x10_0000;

struct Vm {
    vm: VmFd,
    vcpu: Option<VcpuFd>,
    mem: Mem,
}

/// A VM with `RAM` bytes at GPA 0 in slot 0 (dirty logging on if `log`), optionally with the
/// dirty ring enabled before the vCPU is created.
fn vm(log: bool, ring: bool) -> (Vm, u32) {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let entries = if ring {
        dirty::enable_dirty_ring(&vm, 4096).expect("dirty ring")
    } else {
        0
    };
    let mem = Mem::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let region = mem.iter().next().unwrap();
    let host = region.get_host_address(MemoryRegionAddress(0)).unwrap();
    let slot = kvm_userspace_memory_region {
        slot: 0,
        flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: 0,
        memory_size: RAM,
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping is owned by `mem`, which lives in the returned struct next to (and is
    // dropped after) the VM fd that references it.
    unsafe { vm.set_user_memory_region(slot) }.unwrap();
    (
        Vm {
            vm,
            vcpu: None,
            mem,
        },
        entries,
    )
}

/// Put the vCPU in 64-bit mode at CPL 0 with `cr3`, running `code` at `CODE`.
fn start(v: &mut Vm, cr3: u64, code: &[u8]) {
    start_with_efer(v, cr3, code, 0x500)
}

/// [`start`] with an explicit IA32_EFER (LME | LMA, and NXE when `0x800` is set).
fn start_with_efer(v: &mut Vm, cr3: u64, code: &[u8], efer: u64) {
    v.mem.write_slice(code, GuestAddress(CODE)).unwrap();
    // GDT: null, 64-bit code (0x08), data (0x10).
    for (i, d) in [0u64, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
        .iter()
        .enumerate()
    {
        v.mem
            .write_obj(*d, GuestAddress(GDT + i as u64 * 8))
            .unwrap();
    }
    let vcpu = match v.vcpu.take() {
        Some(c) => c,
        None => new_vcpu(v),
    };
    let mut s = vcpu.get_sregs().unwrap();
    let code_seg = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        l: 0,
        db: 1,
        ..code_seg
    };
    s.cs = code_seg;
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.tr = kvm_segment {
        selector: 0x18,
        type_: 0xb,
        s: 0,
        l: 0,
        g: 0,
        limit: 0x67,
        ..code_seg
    };
    s.gdt.base = GDT;
    s.gdt.limit = 23;
    s.cr0 = 0x8000_0031; // PG | NE | ET | PE
    s.cr3 = cr3;
    s.cr4 = 0x20; // PAE
    s.efer = efer;
    vcpu.set_sregs(&s).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: CODE,
        rsp: 0x8000,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();
    v.vcpu = Some(vcpu);
}

fn new_vcpu(v: &Vm) -> VcpuFd {
    let vcpu = v.vm.create_vcpu(0).unwrap();
    let kvm = Kvm::new().unwrap();
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    vcpu
}

/// Run until `hlt`; collect 8-byte `out` values (from `out dx, eax` pairs on ports 0x80/0x81).
fn run(vcpu: &mut Option<VcpuFd>, max_exits: usize) -> (Vec<u64>, bool) {
    let vcpu = vcpu.as_mut().unwrap();
    let mut outs = Vec::new();
    let mut lo = 0u64;
    for _ in 0..max_exits {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::Hlt => return (outs, true),
            VcpuExit::IoOut(0x80, d) => {
                lo = u64::from(u32::from_le_bytes(d.try_into().unwrap()));
            }
            VcpuExit::IoOut(0x81, d) => {
                outs.push(lo | (u64::from(u32::from_le_bytes(d.try_into().unwrap())) << 32));
            }
            VcpuExit::IoOut(0x82, _) => return (outs, false),
            e => panic!("unexpected exit {e:?}"),
        }
    }
    panic!("guest did not halt");
}

fn assemble(f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(CODE).unwrap()
}

/// Mapped test ranges: (va, gpa, size, flags); the rest of the address space is holes.
const MAPS: &[(u64, u64, PageSize, u64)] = &[
    (0x4000_0000, 0x20_0000, PageSize::Size4K, flags::WRITABLE),
    (0x4000_2000, 0x20_5000, PageSize::Size4K, flags::USER),
    (0x4000_5000, 0x20_1000, PageSize::Size4K, flags::NO_EXECUTE),
    (0x4020_0000, 0x40_0000, PageSize::Size2M, flags::WRITABLE),
    (0x4060_0000, 0x60_0000, PageSize::Size2M, flags::USER),
    (0x80_0000_0000, 0, PageSize::Size1G, flags::WRITABLE),
    (
        0xffff_8000_0000_0000,
        0x80_0000,
        PageSize::Size2M,
        flags::WRITABLE,
    ),
    (0xffff_ffff_ffff_f000, 0x21_0000, PageSize::Size4K, 0),
];

fn build_tables(mem: &Mem) -> u64 {
    let mut pt = PageTableBuilder::new(mem, TABLES, 0x40000).unwrap();
    // The code, GDT and stack: identity-map the first 2 MiB with 4 KiB pages.
    for a in (0..0x20_0000).step_by(0x1000) {
        pt.map(
            a,
            a,
            PageSize::Size4K,
            flags::WRITABLE | flags::ACCESSED | flags::DIRTY,
        )
        .unwrap();
    }
    for &(va, gpa, size, f) in MAPS {
        pt.map(va, gpa, size, f | flags::ACCESSED | flags::DIRTY)
            .unwrap();
    }
    pt.cr3()
}

fn probes() -> Vec<u64> {
    let mut rng = Rng(7);
    let mut out = Vec::new();
    for &(va, _, size, _) in MAPS {
        for _ in 0..300 {
            // Inside the mapping, just around it (holes), and anywhere nearby.
            let r = rng.next_u64();
            out.push(va.wrapping_add(r % size.bytes()));
            out.push(va.wrapping_add(size.bytes()).wrapping_add(r % 0x4000));
            out.push(va.wrapping_sub(0x3000).wrapping_add(r % 0x2000));
        }
    }
    for _ in 0..1000 {
        let r = rng.next_u64() & 0x0000_7fff_ffff_ffff;
        out.push(r);
    }
    out
}

#[test]
fn kvm_translate_matches_walker() {
    // Without EFER.NXE the XD bit is reserved: KVM and the walker must both refuse those pages.
    // The guest gets KVM's supported CPUID. This host's KVM lacks Page1GB: PDPTEs with PS are
    // then reserved, and KVM and the walker must both reject the 1 GiB mapping. (Forcing the
    // CPUID bit does not change that here: KVM masks guest CPUID with its own capabilities.)
    for efer in [0x500, 0xD00] {
        translate_matches(efer);
    }
}

fn translate_matches(efer: u64) {
    let (mut v, _) = vm(false, false);
    let cr3 = build_tables(&v.mem);
    start_with_efer(&mut v, cr3, &assemble(|a| a.hlt()), efer);
    let vcpu = v.vcpu.as_ref().unwrap();
    let s = vcpu.get_sregs().unwrap();
    // Page1GB and MAXPHYADDR come from the CPUID the vCPU was given.
    let cpuid = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    let leaf = |f: u32| cpuid.as_slice().iter().find(|e| e.function == f).copied();
    let maxphyaddr = leaf(0x8000_0008).map_or(36, |e| (e.eax & 0xff) as u8);
    let mode = PagingMode {
        gbpages: leaf(0x8000_0001).is_some_and(|e| e.edx & (1 << 26) != 0),
        ..PagingMode::from_registers(s.cr0, s.cr4, s.efer, maxphyaddr)
    };
    println!("guest paging mode: {mode:?}");
    if !mode.gbpages {
        println!(
            "note: no Page1GB in the guest CPUID: 1 GiB leaves must fault (RSVD) on both sides"
        );
    }
    let addrs = probes();

    match vcpu.translate_gva(addrs[0]) {
        Ok(_) => {
            let (mut mapped, mut holes) = (0, 0);
            for &va in &addrs {
                let k = vcpu.translate_gva(va).expect("KVM_TRANSLATE");
                let w = walk::walk_guest(&v.mem, &mode, cr3, va, Access::read());
                match w {
                    Ok(t) => {
                        assert_eq!(k.valid, 1, "va {va:#x}: walker {:#x}, KVM invalid", t.gpa);
                        assert_eq!(k.physical_address, t.gpa, "va {va:#x}");
                        mapped += 1;
                    }
                    Err(e) => {
                        assert_eq!(k.valid, 0, "va {va:#x}: walker {e}, KVM {k:?}");
                        holes += 1;
                    }
                }
            }
            println!(
                "EFER {efer:#x}: KVM_TRANSLATE agrees with the walker on {} addresses \
                 ({mapped} mapped, {holes} holes or faults)",
                addrs.len()
            );
            assert!(mapped > 1000 && holes > 1000);
            // And a second oracle: the guest itself reads through the mappings.
            translate_by_guest_reads(v, cr3, &addrs, mode);
        }
        Err(e) => {
            println!(
                "KVM_TRANSLATE is not supported by this host's KVM ({e}); verifying with a guest \
                 reading through the mappings instead"
            );
            translate_by_guest_reads(v, cr3, &addrs, mode);
        }
    }
}

/// Fallback oracle: mark every walker-translated GPA with a unique value, let the guest read
/// each mapped address, and compare what it read.
fn translate_by_guest_reads(mut v: Vm, cr3: u64, addrs: &[u64], mode: PagingMode) {
    let mut reads = Vec::new();
    for &va in addrs {
        let va = va & !7;
        if let Ok(t) = walk::walk_guest(&v.mem, &mode, cr3, va, Access::read())
            && t.gpa < RAM
            && !(TABLES..TABLES + 0x40000).contains(&t.gpa)
            && t.gpa >= 0x2_0000
        {
            reads.push((va, t.gpa));
        }
    }
    reads.sort();
    reads.dedup_by_key(|r| r.1);
    reads.truncate(200); // the guest runs at ~1M instructions/s: keep it tiny
    for &(_, gpa) in &reads {
        v.mem
            .write_obj(gpa ^ 0x5a5a_0000_0000_0000, GuestAddress(gpa))
            .unwrap();
    }
    let list = 0x1_8000u64;
    for (i, &(va, _)) in reads.iter().enumerate() {
        v.mem
            .write_obj(va, GuestAddress(list + i as u64 * 8))
            .unwrap();
    }
    let n = reads.len() as u32;
    let code = assemble(|a| {
        let mut top = a.create_label();
        a.mov(rsi, list)?;
        a.mov(ecx, n)?;
        a.set_label(&mut top)?;
        a.mov(rbx, qword_ptr(rsi))?;
        a.mov(rax, qword_ptr(rbx))?;
        a.out(0x80, eax)?;
        a.shr(rax, 32)?;
        a.out(0x81, eax)?;
        a.add(rsi, 8)?;
        a.dec(ecx)?;
        a.jnz(top)?;
        a.hlt()
    });
    // The code page lies in the identity-mapped first 2 MiB; the vCPU is reused.
    start_with_efer(&mut v, cr3, &code, 0x500 | if mode.nxe { 0x800 } else { 0 });
    let (outs, halted) = run(&mut v.vcpu, 10 * reads.len() + 10);
    assert!(halted);
    let want: Vec<u64> = reads
        .iter()
        .map(|&(_, g)| g ^ 0x5a5a_0000_0000_0000)
        .collect();
    assert_eq!(outs, want);
    println!(
        "guest reads agree with the walker on {} mapped addresses",
        reads.len()
    );
}

/// Guest program: write one qword to each page in `pages`, `out 0x82` (a sync point), then
/// write to each page in `then`, and halt.
fn writer(pages: &[u64], then: &[u64]) -> Vec<u8> {
    assemble(|a| {
        for &p in pages {
            a.mov(rax, p)?;
            a.mov(qword_ptr(rax + 0x10), rax)?;
        }
        a.out(0x82, al)?;
        for &p in then {
            a.mov(rax, p)?;
            a.mov(qword_ptr(rax + 0x18), rax)?;
        }
        a.hlt()
    })
}

fn identity_tables(mem: &Mem) -> u64 {
    let mut pt = PageTableBuilder::new(mem, TABLES, 0x40000).unwrap();
    // A and D preset everywhere: the walks of the guest write nothing to the tables.
    pt.identity_map(
        0,
        RAM,
        PageSize::Size2M,
        flags::WRITABLE | flags::ACCESSED | flags::DIRTY,
    )
    .unwrap();
    // The builder leaves A clear in the PML4E and PDPTE; the guest's first walk would set it.
    for table in [pt.cr3(), pt.cr3() + 0x1000] {
        let e: u64 = mem.read_obj(GuestAddress(table)).unwrap();
        mem.write_obj(e | flags::ACCESSED, GuestAddress(table))
            .unwrap();
    }
    pt.cr3()
}

fn check_dirty(ring: bool) {
    let (mut v, entries) = vm(true, ring);
    let cr3 = identity_tables(&v.mem);
    let first = [0x30_0000u64, 0x30_1000, 0x45_6000, 0x1ff_f000];
    let second = [0x30_0000u64, 0x77_7000];
    start(&mut v, cr3, &writer(&first, &second));
    let slots = vec![KvmSlot {
        slot: 0,
        gpa: 0,
        size: RAM,
    }];
    let mem = v.mem.clone();
    let mut tracker = DirtyTracker::new();
    if ring {
        let r = KvmDirtyRing::new(&v.vm, v.vcpu.as_ref().unwrap(), entries, slots).unwrap();
        tracker.add(r);
    } else {
        tracker.add(KvmDirtyLog::new(&v.vm, slots));
    }
    tracker.add(BitmapSource::new(&mem));
    // Setting the guest up wrote through vm-memory: the bitmap reports those pages; drop them.
    let setup: Vec<u64> = tracker.sync().unwrap().collect();
    assert!(!setup.is_empty());
    // Run to the sync point; meanwhile the VMM (a device) writes one page too.
    let (_, halted) = run(&mut v.vcpu, 10);
    assert!(!halted);
    mem.write_obj(1u64, GuestAddress(0x12_3008)).unwrap();
    let got: Vec<u64> = tracker.sync().unwrap().collect();
    let mut want = first.to_vec();
    want.push(0x12_3000);
    want.sort();
    assert_eq!(got, want, "first interval");
    let (_, halted) = run(&mut v.vcpu, 10);
    assert!(halted);
    let got: Vec<u64> = tracker.sync().unwrap().collect();
    assert_eq!(got, second.to_vec(), "second interval");
    assert_eq!(tracker.sync().unwrap().count(), 0);
}

#[test]
fn kvm_dirty_pages_exact() {
    check_dirty(false);
}

#[test]
fn kvm_dirty_ring_pages_exact() {
    check_dirty(true);
}
