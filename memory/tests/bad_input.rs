//! Hostile tables: cycles, entries pointing outside memory, misaligned or oversized CR3 / EPTP.
//! Every walker returns an error (never panics, never loops), and the shadow MMU counts it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_memory::ept::{self, EptAccess, EptConfig, EptError, EptFault, eptf};
use vmkit_memory::nested::{self, NestedError, NestedSetup, Stage};
use vmkit_memory::paging::{PagingError, flags};
use vmkit_memory::shadow::{ShadowError, ShadowMmu, SyncPolicy};
use vmkit_memory::walk::{self, Access, AccessKind, PagingMode, WalkError, pfec};

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
}

const P: u64 = flags::PRESENT | flags::WRITABLE;

#[test]
fn guest_walker_bad_input_table() {
    let m = mem();
    // 0x1000: PML4 whose every used entry points back at itself (a cycle).
    m.write_obj(0x1000u64 | P, GuestAddress(0x1000)).unwrap();
    // 0x2000: PML4 -> 0x3000 whose entry points outside memory.
    m.write_obj(0x3000u64 | P, GuestAddress(0x2000)).unwrap();
    m.write_obj((1u64 << 40) | P, GuestAddress(0x3000)).unwrap();
    // 0x4000: a PML4 -> PDPT chain where the PDPT points to the PML4 again (two-step cycle).
    m.write_obj(0x5000u64 | P, GuestAddress(0x4000)).unwrap();
    m.write_obj(0x4000u64 | P, GuestAddress(0x5000)).unwrap();
    let d = PagingMode::default();
    let la57 = PagingMode { la57: true, ..d };
    let pcide = PagingMode { pcide: true, ..d };
    let small = PagingMode {
        maxphyaddr: 36,
        ..d
    };
    #[derive(Debug, PartialEq)]
    enum Want {
        Gpa(u64),
        Pf(u32),
        Table,
        BadCr3,
        NonCanonical,
    }
    #[rustfmt::skip]
    let rows: Vec<(&str, PagingMode, u64, u64, Want)> = vec![
        // A self-map is legal (recursive mapping): it resolves to the table page itself.
        ("self-referencing PML4", d, 0x1000, 0x0, Want::Gpa(0x1000)),
        ("self-referencing PML4, 5-level", la57, 0x1000, 0x0, Want::Gpa(0x1000)),
        ("two-table cycle", d, 0x4000, 0x0, Want::Gpa(0x4000)),
        ("entry points outside memory", d, 0x2000, 0x0, Want::Table),
        ("CR3 outside memory", d, 1 << 40, 0x0, Want::Table),
        ("misaligned CR3 (bit 0)", d, 0x1001, 0x0, Want::BadCr3),
        ("misaligned CR3 (bit 11)", d, 0x1800, 0x0, Want::BadCr3),
        ("CR3 with PWT|PCD is fine", d, 0x1018, 0x0, Want::Gpa(0x1000)),
        ("CR3 low bits are a PCID with PCIDE", pcide, 0x1abc, 0x0, Want::Gpa(0x1000)),
        ("CR3 above MAXPHYADDR", small, 1 << 40, 0x0, Want::BadCr3),
        ("CR3 bit 63", d, (1 << 63) | 0x1000, 0x0, Want::BadCr3),
        ("non-canonical address", d, 0x1000, 1 << 47, Want::NonCanonical),
        ("entry above MAXPHYADDR: reserved", small, 0x3000, 0x0, Want::Pf(pfec::P | pfec::RSVD)),
    ];
    for (name, mode, cr3, va, want) in rows {
        let got = match walk::walk_guest(&m, &mode, cr3, va, Access::read()) {
            Ok(t) => Want::Gpa(t.gpa),
            Err(WalkError::PageFault(pf)) => Want::Pf(pf.error_code),
            Err(WalkError::Table(PagingError::Memory { .. })) => Want::Table,
            Err(WalkError::Table(e)) => panic!("{name}: {e}"),
            Err(WalkError::BadCr3(_)) => Want::BadCr3,
            Err(WalkError::NonCanonical(_)) => Want::NonCanonical,
        };
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn ept_bad_input_table() {
    let m = mem();
    let cfg = EptConfig::default();
    // EPT PML4 at 0x1000 pointing to itself (cycle), at 0x2000 pointing outside memory.
    m.write_obj(0x1000u64 | eptf::RWX, GuestAddress(0x1000))
        .unwrap();
    m.write_obj((1u64 << 40) | eptf::RWX, GuestAddress(0x2000))
        .unwrap();
    let read = EptAccess::new(AccessKind::Read);
    // The cycle: level 1 reads the PML4 page as a PTE: RWX with memory type 0 → maps 0x1000.
    let t = ept::translate_phys(&m, &cfg, ept::eptp(0x1000, 4, false), 0x123, read).unwrap();
    assert_eq!(t.hpa, 0x1123);
    assert!(matches!(
        ept::translate_phys(&m, &cfg, ept::eptp(0x2000, 4, false), 0, read),
        Err(EptError::Table(PagingError::Memory { .. }))
    ));
    for bad in [
        0x1001 | 0x1e,
        ept::eptp(0x1000, 3, false),
        ept::eptp(1 << 50, 4, false),
    ] {
        assert!(
            matches!(
                ept::translate_phys(&m, &cfg, bad, 0, read),
                Err(EptError::BadEptp(_))
            ),
            "{bad:#x}"
        );
    }
}

#[test]
fn two_dimensional_and_shadow_bad_input() {
    // Host memory 4 MiB; EPT identity-maps only the first 1 MiB.
    let m = mem();
    let mut b = ept::EptBuilder::new(&m, 0x10_0000, 0x8000).unwrap();
    b.map_range(
        0,
        0,
        1 << 20,
        vmkit_memory::PageSize::Size4K,
        eptf::RWX | eptf::MT_WB,
    )
    .unwrap();
    let setup = NestedSetup {
        mode: PagingMode::default(),
        ept: EptConfig::default(),
        eptp: b.eptp(),
    };
    // Guest PML4 at 0x1000 points at a PDPT at GPA 2 MiB: not mapped by EPT.
    m.write_obj(0x20_0000u64 | P, GuestAddress(0x1000)).unwrap();
    // Guest PML4 at 0x2000 is a self-map cycle.
    m.write_obj(0x2000u64 | P, GuestAddress(0x2000)).unwrap();
    match nested::walk_2d(&m, &setup, 0x1000, 0, Access::read()) {
        Err(NestedError::Ept {
            stage: Stage::GuestTable(3),
            fault: EptFault::Violation { gpa: 0x20_0000, .. },
        }) => {}
        r => panic!("{r:?}"),
    }
    let t = nested::walk_2d(&m, &setup, 0x2000, 0x10, Access::read()).unwrap();
    assert_eq!((t.hpa, t.refs.len()), (0x2010, 24));
    assert!(matches!(
        nested::walk_2d(&m, &setup, 0x2001, 0, Access::read()),
        Err(NestedError::BadCr3(0x2001))
    ));
    assert!(matches!(
        nested::walk_2d(&m, &setup, 0x2000, 1 << 47, Access::read()),
        Err(NestedError::NonCanonical(_))
    ));
    let mut mmu = ShadowMmu::new(setup, SyncPolicy::WriteProtect, 0x1000);
    assert!(matches!(
        mmu.translate(&m, 0, Access::read()),
        Err(ShadowError::HostFault { .. })
    ));
    assert_eq!(mmu.counters().host_faults, 1);
    mmu.set_cr3(0x2001);
    assert_eq!(
        mmu.translate(&m, 0, Access::read()),
        Err(ShadowError::Invalid)
    );
    mmu.set_cr3(0x2000);
    assert_eq!(mmu.translate(&m, 0x10, Access::read()), Ok(0x2010));
    assert_eq!(mmu.counters().fills, 1);
}
