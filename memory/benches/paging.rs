//! Walks per second: guest walk (4 KiB and 2 MiB leaves), EPT translate, two-dimensional walk,
//! shadow-MMU hit, against a `HashMap<u64, u64>` lookup as the reference. After the criterion
//! runs, a paired measurement prints each one's cost and its ratio to the lookup (target for the
//! shadow hit: ≤ 1.5×).
//!
//! `cargo bench -p vmkit-memory --bench paging`

use std::collections::HashMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_memory::PageSize;
use vmkit_memory::ept::{self, EptAccess, EptBuilder, EptConfig, eptf};
use vmkit_memory::nested::{self, NestedSetup};
use vmkit_memory::paging::{PageTableBuilder, flags};
use vmkit_memory::shadow::{ShadowMmu, SyncPolicy};
use vmkit_memory::walk::{self, Access, AccessKind, PagingMode};

/// Pages in each working set.
const N: u64 = 512;
const VA_4K: u64 = 0x4000_0000;
const VA_2M: u64 = 0x80_0000_0000;

struct Setup {
    /// Host memory: guest RAM identity-mapped (GPA = HPA) by 4 KiB EPT pages.
    mem: GuestMemoryMmap,
    cr3: u64,
    nested: NestedSetup,
    mode: PagingMode,
}

fn setup() -> Setup {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let mut e = EptBuilder::new(&mem, 0x300_0000, 0x10_0000).unwrap();
    e.map_range(0, 0, 48 << 20, PageSize::Size4K, eptf::RWX | eptf::MT_WB)
        .unwrap();
    let mut pt = PageTableBuilder::new(&mem, 0x1000, 0xF_F000).unwrap();
    for i in 0..N {
        pt.map(
            VA_4K + i * 0x1000,
            0x100_0000 + i * 0x1000,
            PageSize::Size4K,
            flags::WRITABLE,
        )
        .unwrap();
    }
    for i in 0..8 {
        pt.map(
            VA_2M + i * (2 << 20),
            0x100_0000 + i * (2 << 20),
            PageSize::Size2M,
            flags::WRITABLE,
        )
        .unwrap();
    }
    let mode = PagingMode::default();
    let nested = NestedSetup {
        mode,
        ept: EptConfig::default(),
        eptp: e.eptp(),
    };
    Setup {
        cr3: pt.cr3(),
        mem,
        nested,
        mode,
    }
}

/// The addresses each benchmark cycles through.
fn addrs_4k() -> Vec<u64> {
    (0..N)
        .map(|i| VA_4K + ((i * 263) % N) * 0x1000 + 0x18)
        .collect()
}

fn addrs_2m() -> Vec<u64> {
    (0..N)
        .map(|i| VA_2M + ((i * 263) % N) * 0x8_0000 + 0x18)
        .collect()
}

type Case<'a> = (&'static str, Box<dyn FnMut(u64) -> u64 + 'a>, Vec<u64>);

fn cases(s: &Setup) -> Vec<Case<'_>> {
    let read = Access::read();
    let mut mmu = ShadowMmu::new(s.nested, SyncPolicy::WriteProtect, s.cr3);
    for va in addrs_4k() {
        mmu.translate(&s.mem, va, read).unwrap();
    }
    let map: HashMap<u64, u64> = addrs_4k()
        .iter()
        .map(|&va| (va >> 12, mmu.translate(&s.mem, va, read).unwrap() >> 12))
        .collect();
    let gpas: Vec<u64> = addrs_4k()
        .iter()
        .map(|&va| {
            walk::walk_guest(&s.mem, &s.mode, s.cr3, va, read)
                .unwrap()
                .gpa
        })
        .collect();
    let cfg = EptConfig::default();
    vec![
        (
            "hashmap_lookup",
            Box::new(move |va| map.get(&(va >> 12)).map_or(0, |f| (f << 12) | (va & 0xfff))),
            addrs_4k(),
        ),
        (
            "shadow_hit",
            Box::new(move |va| mmu.translate(&s.mem, va, read).unwrap_or(0)),
            addrs_4k(),
        ),
        (
            "guest_walk_4k",
            Box::new(move |va| {
                walk::walk_guest(&s.mem, &s.mode, s.cr3, va, read).map_or(0, |t| t.gpa)
            }),
            addrs_4k(),
        ),
        (
            "guest_walk_2m",
            Box::new(move |va| {
                walk::walk_guest(&s.mem, &s.mode, s.cr3, va, read).map_or(0, |t| t.gpa)
            }),
            addrs_2m(),
        ),
        (
            "ept_translate_4k",
            Box::new(move |gpa| {
                ept::translate_phys(
                    &s.mem,
                    &cfg,
                    s.nested.eptp,
                    gpa,
                    EptAccess::new(AccessKind::Read),
                )
                .map_or(0, |t| t.hpa)
            }),
            gpas,
        ),
        (
            "walk_2d_4k_4k",
            Box::new(move |va| {
                nested::walk_2d(&s.mem, &s.nested, s.cr3, va, read).map_or(0, |t| t.hpa)
            }),
            addrs_4k(),
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let s = setup();
    let mut g = c.benchmark_group("paging");
    for (name, mut f, addrs) in cases(&s) {
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 1) % addrs.len();
                black_box(f(black_box(addrs[i])))
            })
        });
    }
    g.finish();
    // The reference data layout must not be optimized into the benchmark.
    black_box(s.mem.read_obj::<u64>(GuestAddress(0)).ok());
}

/// Paired measurement: every case runs the same address stream in alternating batches, so
/// drift hits all alike; prints ns per walk, walks/s and the ratio to the hash-map lookup.
fn ratios() {
    let s = setup();
    let mut cs = cases(&s);
    let rounds = 40;
    let batch = 50_000usize;
    let mut best = vec![Duration::MAX; cs.len()];
    for _ in 0..rounds {
        for (k, (_, f, addrs)) in cs.iter_mut().enumerate() {
            let t = Instant::now();
            let mut acc = 0u64;
            for i in 0..batch {
                acc = acc.wrapping_add(f(addrs[i % addrs.len()]));
            }
            black_box(acc);
            best[k] = best[k].min(t.elapsed());
        }
    }
    let per = |d: Duration| d.as_secs_f64() * 1e9 / batch as f64;
    let base = per(best[0]);
    println!("\npaired measurement (best of {rounds} batches of {batch} walks):");
    for (k, (name, _, _)) in cs.iter().enumerate() {
        let ns = per(best[k]);
        println!(
            "  {name:<16} {ns:8.1} ns/walk {:>12.0} walks/s  ratio to hashmap_lookup {:6.2}x",
            1e9 / ns,
            ns / base
        );
    }
    let shadow = per(best[1]) / base;
    println!(
        "shadow hit / HashMap lookup = {shadow:.2}x (target <= 1.5x): {}",
        if shadow <= 1.5 { "met" } else { "NOT met" }
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}

fn main() {
    benches();
    ratios();
    Criterion::default().configure_from_args().final_summary();
}
