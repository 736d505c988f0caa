//! `paging-lab`: one scripted guest workload run through both ways a VMM virtualizes memory —
//! EPT (nested paging: the TLB misses into a two-dimensional walk, the guest handles its own page
//! faults) and shadow page tables (the TLB misses into the shadow tables; hidden page faults,
//! write-protected guest page tables, intercepted CR3 writes, INVLPG and #PF) — and prints what
//! each costs side by side.
//!
//! The workload: three processes sharing a kernel mapped with global 2 MiB pages; each demand-
//! faults a heap, maps a file-like region (page-table writes), context-switches round robin
//! (CR3 writes with PCIDs and NOFLUSH), unmaps with INVLPG, and one "forks" with copy-on-write.
//!
//! `cargo run -p vmkit-examples --bin paging_lab [rounds]`

use std::collections::HashMap;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_memory::PageSize;
use vmkit_memory::ept::{EptBuilder, EptConfig, eptf};
use vmkit_memory::nested::{self, NestedError, NestedSetup};
use vmkit_memory::paging::{PageTableBuilder, PhysReader, flags, walk_core};
use vmkit_memory::shadow::{ShadowError, ShadowMmu, SyncPolicy};
use vmkit_memory::tlb::{Tlb, TlbEntry};
use vmkit_memory::walk::{Access, AccessKind, PageFault, PagingMode, Perms, pfec};

/// Guest RAM (GPA = HPA: EPT identity-maps it; the EPT tables sit above it in host memory).
const RAM: u64 = 64 << 20;
const KERNEL_VA: u64 = 0xffff_8000_0000_0000;
const HEAP_VA: u64 = 0x10_0000_0000;
const FILE_VA: u64 = 0x20_0000_0000;
const VPID: u16 = 1;

/// One guest memory access of the script.
#[derive(Clone, Copy, Debug)]
enum Step {
    Access(usize, u64, Access),
    Switch(usize),
    Map(usize, u64, u64),
    Unmap(usize, u64),
    WriteProtect(usize, u64),
}

/// The guest kernel's view: page tables per process and a frame allocator.
struct Guest<'m> {
    mem: &'m GuestMemoryMmap,
    procs: Vec<PageTableBuilder<'m, GuestMemoryMmap>>,
    next_frame: u64,
    cow: HashMap<(usize, u64), u64>,
}

/// What a model reports back to the script.
#[derive(Default, Debug)]
struct Costs {
    accesses: u64,
    tlb_misses: u64,
    mem_refs: u64,
    exits: u64,
    guest_page_faults: u64,
    exit_kinds: Vec<(&'static str, u64)>,
}

/// A memory-virtualization model: translate for the current process, and hear about the guest's
/// CR3 writes, INVLPGs and page-table writes.
trait Model {
    fn name(&self) -> &'static str;
    fn translate(&mut self, mem: &GuestMemoryMmap, va: u64, a: Access) -> Result<u64, PageFault>;
    fn cr3(&mut self, cr3: u64);
    fn invlpg(&mut self, va: u64);
    fn pt_write(&mut self, gpa: u64);
    fn costs(&self) -> Costs;
}

struct EptModel {
    /// Stays 0 here: all guest RAM is mapped (a VMM would see MMIO and ballooned pages here).
    ept_violations: u64,
    setup: NestedSetup,
    cr3: u64,
    pcid: u16,
    tlb: Tlb,
    c: Costs,
}

impl Model for EptModel {
    fn name(&self) -> &'static str {
        "EPT"
    }
    fn translate(&mut self, mem: &GuestMemoryMmap, va: u64, a: Access) -> Result<u64, PageFault> {
        self.c.accesses += 1;
        if let Some(e) = self.tlb.lookup(VPID, self.pcid, va)
            && e.perms.check(a, &self.setup.mode).is_ok()
        {
            return Ok(e.frame | (va & (e.page_size.bytes() - 1)));
        }
        self.c.tlb_misses += 1;
        match nested::walk_2d(mem, &self.setup, self.cr3, va, a) {
            Ok(t) => {
                self.c.mem_refs += t.refs.len() as u64;
                let size = t.guest.page_size.min_with(t.ept.page_size);
                let frame = t.hpa & !(size.bytes() - 1);
                // A read leaves the guest dirty bit clear: the first write walks again to set it.
                let perms = Perms {
                    writable: t.guest.perms.writable && a.kind == AccessKind::Write,
                    ..t.guest.perms
                };
                let e = TlbEntry {
                    frame,
                    page_size: size,
                    perms,
                };
                self.tlb.insert(VPID, self.pcid, va, e);
                Ok(t.hpa)
            }
            // The guest's own #PF: delivered to the guest directly, no VM exit.
            Err(NestedError::Guest(pf)) => {
                self.c.guest_page_faults += 1;
                Err(pf)
            }
            Err(e) => panic!("the script never leaves guest RAM: {e}"),
        }
    }
    fn cr3(&mut self, cr3: u64) {
        self.cr3 = cr3 & !(1 << 63) & !0xfff;
        self.pcid = self.tlb.mov_cr3(VPID, cr3, true);
    }
    fn invlpg(&mut self, va: u64) {
        self.tlb.invlpg(VPID, self.pcid, va);
    }
    fn pt_write(&mut self, _gpa: u64) {}
    fn costs(&self) -> Costs {
        Costs {
            exits: self.ept_violations,
            exit_kinds: vec![("EPT violations", self.ept_violations)],
            ..self.c
        }
    }
}

struct ShadowModel {
    mmu: ShadowMmu,
    pcid: u16,
    tlb: Tlb,
    c: Costs,
    cr3_exits: u64,
    invlpg_exits: u64,
}

impl Model for ShadowModel {
    fn name(&self) -> &'static str {
        "shadow"
    }
    fn translate(&mut self, mem: &GuestMemoryMmap, va: u64, a: Access) -> Result<u64, PageFault> {
        self.c.accesses += 1;
        let mode = *self.mmu.mode();
        if let Some(e) = self.tlb.lookup(VPID, self.pcid, va)
            && e.perms.check(a, &mode).is_ok()
        {
            return Ok(e.frame | (va & 0xfff));
        }
        self.c.tlb_misses += 1;
        // The hardware walks the 4-level shadow table.
        self.c.mem_refs += 4;
        match self.mmu.translate(mem, va, a) {
            Ok(hpa) => {
                // The TLB caches the shadow entry: its W bit may be withheld (write-protected
                // guest table, guest dirty bit not yet set), so writes fault until it is given.
                if let Some(s) = self.mmu.entry(va) {
                    let perms = Perms {
                        writable: s.writable,
                        ..s.perms
                    };
                    let e = TlbEntry {
                        frame: s.hpa_page,
                        page_size: PageSize::Size4K,
                        perms,
                    };
                    self.tlb.insert(VPID, self.pcid, va, e);
                }
                Ok(hpa)
            }
            Err(ShadowError::GuestFault(pf)) => Err(pf),
            Err(e) => panic!("the script never leaves guest RAM: {e}"),
        }
    }
    fn cr3(&mut self, cr3: u64) {
        self.cr3_exits += 1;
        self.mmu.set_cr3(cr3 & !(1 << 63) & !0xfff);
        self.pcid = self.tlb.mov_cr3(VPID, cr3, true);
    }
    fn invlpg(&mut self, va: u64) {
        self.invlpg_exits += 1;
        self.mmu.invlpg(va);
        self.tlb.invlpg(VPID, self.pcid, va);
    }
    fn pt_write(&mut self, gpa: u64) {
        self.mmu.guest_wrote(gpa);
    }
    fn costs(&self) -> Costs {
        let k = self.mmu.counters();
        // Every exit the shadow MMU takes (guest #PF are intercepted, then injected).
        let kinds = vec![
            ("hidden page faults (fill)", k.fills),
            ("protection faults (W/D)", k.protection_fills),
            ("guest #PF intercepted", k.guest_faults),
            ("page-table writes emulated", k.pt_write_emulations),
            ("CR3 writes", self.cr3_exits),
            ("INVLPG", self.invlpg_exits),
        ];
        Costs {
            exits: kinds.iter().map(|(_, n)| n).sum(),
            guest_page_faults: k.guest_faults,
            exit_kinds: kinds,
            ..self.c
        }
    }
}

trait MinSize {
    fn min_with(self, other: PageSize) -> PageSize;
}
impl MinSize for PageSize {
    fn min_with(self, other: PageSize) -> PageSize {
        if self.bytes() <= other.bytes() {
            self
        } else {
            other
        }
    }
}

impl<'m> Guest<'m> {
    fn new(mem: &'m GuestMemoryMmap, nprocs: usize) -> Self {
        let mut procs = Vec::new();
        for p in 0..nprocs as u64 {
            let mut pt = PageTableBuilder::new(mem, 0x10_0000 + p * 0x40_0000, 0x40_0000).unwrap();
            // The kernel: 16 MiB of global, supervisor 2 MiB pages.
            for i in 0..8 {
                let f = flags::WRITABLE | flags::GLOBAL | flags::ACCESSED | flags::DIRTY;
                pt.map(
                    KERNEL_VA + i * (2 << 20),
                    i * (2 << 20),
                    PageSize::Size2M,
                    f,
                )
                .unwrap();
            }
            procs.push(pt);
        }
        Self {
            mem,
            procs,
            next_frame: 0x200_0000,
            cow: HashMap::new(),
        }
    }

    fn cr3(&self, p: usize) -> u64 {
        self.procs[p].cr3() | (p as u64 + 1) | (1 << 63)
    }

    fn entries(&self, p: usize, va: u64) -> Vec<(u64, u64)> {
        let w = walk_core(
            &mut PhysReader(self.mem),
            &PagingMode::default(),
            self.procs[p].cr3(),
            va,
        )
        .unwrap();
        w.entries().iter().map(|s| (s.entry_gpa, s.entry)).collect()
    }

    /// Map `va` (user, `flags`) and report the page-table entries written.
    fn map(&mut self, p: usize, va: u64, f: u64, model: &mut dyn Model) {
        let before = self.entries(p, va);
        let frame = self.next_frame;
        self.next_frame += 0x1000;
        self.procs[p]
            .map(va, frame, PageSize::Size4K, f | flags::USER)
            .unwrap();
        for (gpa, e) in self.entries(p, va) {
            if !before.contains(&(gpa, e)) {
                model.pt_write(gpa);
            }
        }
    }

    fn set_pte(&mut self, p: usize, va: u64, f: impl Fn(u64) -> u64, model: &mut dyn Model) {
        if let Some(&(gpa, e)) = self.entries(p, va).last() {
            self.mem.write_obj(f(e), GuestAddress(gpa)).unwrap();
            model.pt_write(gpa);
        }
    }

    /// The guest kernel's #PF handler: demand-map, or copy-on-write. Returns whether to retry.
    fn page_fault(&mut self, p: usize, pf: PageFault, model: &mut dyn Model) -> bool {
        let va = pf.cr2 & !0xfff;
        if pf.error_code & pfec::P == 0 {
            self.map(p, va, flags::WRITABLE, model);
            return true;
        }
        if pf.error_code & pfec::WR != 0 && self.cow.remove(&(p, va)).is_some() {
            // Copy-on-write break: a fresh frame, writable.
            let frame = self.next_frame;
            self.next_frame += 0x1000;
            self.set_pte(
                p,
                va,
                |e| (e & !flags::ADDR_MASK) | frame | flags::WRITABLE,
                model,
            );
            model.invlpg(va);
            return true;
        }
        false
    }

    /// Run the script; returns the host address of every completed access.
    fn run(&mut self, script: &[Step], model: &mut dyn Model) -> Vec<u64> {
        let mut out = Vec::new();
        let mut cur = 0;
        model.cr3(self.cr3(0));
        for &s in script {
            match s {
                Step::Switch(p) => {
                    cur = p;
                    model.cr3(self.cr3(p));
                }
                Step::Access(p, va, a) => {
                    debug_assert_eq!(p, cur);
                    for _ in 0..3 {
                        match model.translate(self.mem, va, a) {
                            Ok(hpa) => {
                                out.push(hpa);
                                break;
                            }
                            Err(pf) if self.page_fault(p, pf, model) => continue,
                            Err(pf) => panic!("unexpected guest fault {pf:?}"),
                        }
                    }
                }
                Step::Map(p, va, n) => {
                    for i in 0..n {
                        self.map(p, va + i * 0x1000, flags::WRITABLE, model);
                    }
                }
                Step::Unmap(p, va) => {
                    self.set_pte(p, va, |_| 0, model);
                    model.invlpg(va);
                }
                Step::WriteProtect(p, va) => {
                    self.set_pte(p, va, |e| e & !flags::WRITABLE, model);
                    self.cow.insert((p, va), 0);
                    model.invlpg(va);
                }
            }
        }
        out
    }
}

fn script(rounds: u64) -> Vec<Step> {
    let user = |k: AccessKind| Access::new(k).user();
    let mut s = Vec::new();
    for r in 0..rounds {
        for p in 0..3usize {
            s.push(Step::Switch(p));
            // The kernel runs (global pages survive the switch).
            for i in 0..8 {
                s.push(Step::Access(p, KERNEL_VA + i * 0x3_0000, Access::fetch()));
            }
            // Heap: demand-faulted on first touch, then reused.
            for i in 0..32 {
                let va = HEAP_VA + i * 0x1000 + r * 8;
                s.push(Step::Access(p, va, user(AccessKind::Read)));
                s.push(Step::Access(p, va, user(AccessKind::Write)));
            }
            // A file mapping: page-table writes, reads, then unmap with INVLPG.
            let file = FILE_VA + r * 0x10_0000;
            s.push(Step::Map(p, file, 8));
            for i in 0..8 {
                s.push(Step::Access(p, file + i * 0x1000, user(AccessKind::Read)));
            }
            for i in 0..8 {
                s.push(Step::Unmap(p, file + i * 0x1000));
            }
            // Process 0 "forks" every round: its heap goes copy-on-write.
            if p == 0 {
                for i in 0..4 {
                    s.push(Step::WriteProtect(0, HEAP_VA + i * 0x1000));
                    s.push(Step::Access(
                        0,
                        HEAP_VA + i * 0x1000,
                        user(AccessKind::Write),
                    ));
                }
            }
        }
    }
    s
}

fn main() {
    let rounds: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let script = script(rounds);
    let mut results = Vec::new();
    for shadow in [false, true] {
        // Host memory: guest RAM at 0 (identity-mapped by EPT), EPT tables above it.
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (RAM + (1 << 20)) as usize)]).unwrap();
        let mut ept = EptBuilder::new(&mem, RAM, 1 << 20).unwrap();
        ept.map_range(0, 0, RAM, PageSize::Size2M, eptf::RWX | eptf::MT_WB)
            .unwrap();
        let setup = NestedSetup {
            mode: PagingMode {
                pcide: true,
                update_ad: true,
                ..PagingMode::default()
            },
            ept: EptConfig::default(),
            eptp: ept.eptp(),
        };
        let mut guest = Guest::new(&mem, 3);
        let mut model: Box<dyn Model> = if shadow {
            Box::new(ShadowModel {
                mmu: ShadowMmu::new(setup, SyncPolicy::Unsync, guest.procs[0].cr3()),
                pcid: 0,
                tlb: Tlb::default(),
                c: Costs::default(),
                cr3_exits: 0,
                invlpg_exits: 0,
            })
        } else {
            Box::new(EptModel {
                ept_violations: 0,
                setup,
                cr3: guest.procs[0].cr3(),
                pcid: 0,
                tlb: Tlb::default(),
                c: Costs::default(),
            })
        };
        let hpas = guest.run(&script, model.as_mut());
        results.push((model.name(), model.costs(), hpas));
    }
    let same = results[0].2 == results[1].2;
    println!(
        "paging-lab: {} steps, {rounds} rounds, 3 processes\n",
        script.len()
    );
    println!(
        "both models put all {} completed accesses at the same host addresses: {}\n",
        results[0].2.len(),
        if same { "yes" } else { "NO" }
    );
    println!("{:<34} {:>12} {:>12}", "", results[0].0, results[1].0);
    let row = |name: &str, f: &dyn Fn(&Costs) -> u64| {
        println!(
            "{name:<34} {:>12} {:>12}",
            f(&results[0].1),
            f(&results[1].1)
        );
    };
    row("guest memory accesses", &|c| c.accesses);
    row("TLB misses", &|c| c.tlb_misses);
    row("memory references on TLB misses", &|c| c.mem_refs);
    row("guest page faults", &|c| c.guest_page_faults);
    row("VM exits (total)", &|c| c.exits);
    let kinds = results
        .iter()
        .flat_map(|(_, c, _)| c.exit_kinds.iter().map(|k| k.0));
    for kind in kinds.collect::<Vec<_>>() {
        let get = |c: &Costs| {
            c.exit_kinds
                .iter()
                .find(|k| k.0 == kind)
                .map_or("-".to_string(), |k| k.1.to_string())
        };
        println!(
            "{:<34} {:>12} {:>12}",
            format!("  {kind}"),
            get(&results[0].1),
            get(&results[1].1)
        );
    }
    if !same {
        std::process::exit(1);
    }
}
