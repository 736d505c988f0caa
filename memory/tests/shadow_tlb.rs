//! Shadow MMU event counting and TLB flush semantics, on small hand-built scenarios.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_memory::PageSize;
use vmkit_memory::ept::{EptBuilder, EptConfig, eptf};
use vmkit_memory::nested::NestedSetup;
use vmkit_memory::paging::{PageTableBuilder, flags, translate};
use vmkit_memory::shadow::{ShadowError, ShadowMmu, SyncPolicy};
use vmkit_memory::tlb::{InvpcidType, Tlb, TlbEntry};
use vmkit_memory::walk::{Access, PagingMode, Perms, pfec};

const VA: u64 = 0x4000_0000;

/// Guest RAM identity-mapped by EPT; one process mapping VA → 0x30_0000 (writable) and
/// VA + 0x1000 → its own PT page (so the guest can write its page table through a VA).
fn world(update_ad: bool) -> (GuestMemoryMmap, NestedSetup, u64, u64) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let (setup, cr3, pte) = build(&mem, update_ad);
    (mem, setup, cr3, pte)
}

fn build(mem: &GuestMemoryMmap, update_ad: bool) -> (NestedSetup, u64, u64) {
    let mut ept = EptBuilder::new(mem, 0xF0_0000, 0x10000).unwrap();
    ept.map_range(0, 0, 8 << 20, PageSize::Size2M, eptf::RWX | eptf::MT_WB)
        .unwrap();
    let mut pt = PageTableBuilder::new(mem, 0x1000, 0x8000).unwrap();
    pt.map(
        VA,
        0x30_0000,
        PageSize::Size4K,
        flags::WRITABLE | flags::USER,
    )
    .unwrap();
    let pte = translate(mem, pt.cr3(), VA).unwrap().leaf().entry_gpa;
    pt.map(VA + 0x1000, pte & !0xfff, PageSize::Size4K, flags::WRITABLE)
        .unwrap();
    let setup = NestedSetup {
        mode: PagingMode {
            update_ad,
            ..PagingMode::default()
        },
        ept: EptConfig::default(),
        eptp: ept.eptp(),
    };
    (setup, pt.cr3(), pte)
}

#[test]
fn fills_hits_guest_faults_and_dirty_tracking() {
    let (mem, setup, cr3, _) = world(true);
    let mut mmu = ShadowMmu::new(setup, SyncPolicy::WriteProtect, cr3);
    assert_eq!(mmu.translate(&mem, VA, Access::read()), Ok(0x30_0000));
    assert_eq!(mmu.translate(&mem, VA + 8, Access::read()), Ok(0x30_0008));
    // The read left the guest D bit clear: the first write is a hypervisor-induced fault.
    assert_eq!(mmu.translate(&mem, VA, Access::write()), Ok(0x30_0000));
    assert_eq!(mmu.translate(&mem, VA, Access::write()), Ok(0x30_0000));
    let c = *mmu.counters();
    assert_eq!((c.fills, c.hits, c.protection_fills), (1, 2, 1));
    // A user fetch... is allowed (no XD); a user access to the supervisor PT alias is not.
    assert_eq!(
        mmu.translate(&mem, VA + 0x1000, Access::read().user()),
        Err(ShadowError::GuestFault(vmkit_memory::walk::PageFault {
            error_code: pfec::P | pfec::US,
            cr2: VA + 0x1000
        }))
    );
    assert_eq!(mmu.counters().guest_faults, 1);
}

#[test]
fn write_protected_page_table_writes_zap_or_unsync() {
    for policy in [SyncPolicy::WriteProtect, SyncPolicy::Unsync] {
        let (mem, setup, cr3, pte) = world(false);
        let mut mmu = ShadowMmu::new(setup, policy, cr3);
        assert_eq!(mmu.translate(&mem, VA, Access::read()), Ok(0x30_0000));
        assert!(mmu.write_protected() >= 4);
        // The guest remaps VA to 0x31_0000 by storing through its PT alias.
        let new = 0x31_0000 | flags::PRESENT | flags::WRITABLE | flags::USER;
        mmu.write_u64(&mem, VA + 0x1000 + (pte & 0xfff), new, Access::write())
            .unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(pte)).unwrap(), new);
        let c = *mmu.counters();
        assert_eq!(c.pt_write_emulations, 1, "{policy:?}");
        match policy {
            SyncPolicy::WriteProtect => {
                // The dependent shadow entry is gone: the next access sees the new mapping.
                assert!(c.zaps >= 1);
                assert_eq!(mmu.translate(&mem, VA, Access::read()), Ok(0x31_0000));
            }
            SyncPolicy::Unsync => {
                // Stale until the guest invalidates, as a TLB would be.
                assert_eq!(c.unsyncs, 1);
                assert_eq!(mmu.translate(&mem, VA, Access::read()), Ok(0x30_0000));
                mmu.invlpg(VA);
                assert_eq!(mmu.counters().resyncs, 1);
                assert_eq!(mmu.translate(&mem, VA, Access::read()), Ok(0x31_0000));
            }
        }
    }
}

#[test]
fn cr3_switch_keeps_cached_roots() {
    let (mem, setup, cr3, _) = world(false);
    let mut mmu = ShadowMmu::new(setup, SyncPolicy::WriteProtect, cr3);
    mmu.translate(&mem, VA, Access::read()).unwrap();
    // A second address space with nothing mapped.
    mem.write_slice(&[0u8; 4096], GuestAddress(0x50_0000))
        .unwrap();
    mmu.set_cr3(0x50_0000);
    assert!(matches!(
        mmu.translate(&mem, VA, Access::read()),
        Err(ShadowError::GuestFault(_))
    ));
    mmu.set_cr3(cr3);
    assert_eq!(mmu.translate(&mem, VA, Access::read()), Ok(0x30_0000));
    let c = mmu.counters();
    assert_eq!((c.fills, c.hits, c.cr3_switches), (1, 1, 2));
}

fn entry(frame: u64, size: PageSize, global: bool) -> TlbEntry {
    TlbEntry {
        frame,
        page_size: size,
        perms: Perms {
            global,
            ..Perms::default()
        },
    }
}

#[test]
fn tlb_flush_semantics() {
    let mut t = Tlb::default();
    t.insert(1, 1, 0x1000, entry(0xa000, PageSize::Size4K, false));
    t.insert(1, 2, 0x1000, entry(0xb000, PageSize::Size4K, false));
    t.insert(1, 1, 0x20_0000, entry(0x40_0000, PageSize::Size2M, false));
    t.insert(1, 1, 0x4000, entry(0xc000, PageSize::Size4K, true)); // global
    t.insert(2, 1, 0x1000, entry(0xd000, PageSize::Size4K, false)); // other VPID
    assert_eq!(t.lookup(1, 2, 0x1fff).map(|e| e.frame), Some(0xb000));
    assert_eq!(t.lookup(1, 7, 0x4000).map(|e| e.frame), Some(0xc000)); // global: any PCID
    assert_eq!(t.lookup(1, 1, 0x3f_ffff).map(|e| e.frame), Some(0x40_0000));
    // INVLPG: current PCID's entry and global entries for the page, any page size.
    t.invlpg(1, 1, 0x1000);
    assert!(t.lookup(1, 1, 0x1000).is_none());
    assert!(t.lookup(1, 2, 0x1000).is_some());
    t.invlpg(1, 1, 0x3f_f000);
    assert!(t.lookup(1, 1, 0x20_0000).is_none());
    t.invlpg(1, 9, 0x4000);
    assert!(t.lookup(1, 1, 0x4000).is_none());
    // INVPCID individual address and single context leave globals alone.
    t.insert(1, 1, 0x4000, entry(0xc000, PageSize::Size4K, true));
    t.invpcid(1, InvpcidType::IndividualAddress, 2, 0x1000);
    assert!(t.lookup(1, 2, 0x1000).is_none());
    t.insert(1, 3, 0x5000, entry(0xe000, PageSize::Size4K, false));
    t.invpcid(1, InvpcidType::SingleContext, 3, 0);
    assert!(t.lookup(1, 3, 0x5000).is_none());
    assert!(t.lookup(1, 3, 0x4000).is_some());
    t.invpcid(1, InvpcidType::AllContext, 0, 0);
    assert!(t.lookup(1, 3, 0x4000).is_some());
    t.invpcid(1, InvpcidType::AllContextIncludingGlobal, 0, 0);
    assert!(t.lookup(1, 3, 0x4000).is_none());
    // MOV CR3: without PCIDE non-global PCID-0 entries go; with PCIDE, NOFLUSH keeps them.
    t.insert(1, 0, 0x1000, entry(0xa000, PageSize::Size4K, false));
    t.insert(1, 0, 0x4000, entry(0xc000, PageSize::Size4K, true));
    assert_eq!(t.mov_cr3(1, 0x1000, false), 0);
    assert!(t.lookup(1, 0, 0x1000).is_none());
    assert!(t.lookup(1, 0, 0x4000).is_some());
    t.insert(1, 5, 0x1000, entry(0xa000, PageSize::Size4K, false));
    assert_eq!(t.mov_cr3(1, 0x2005 | (1 << 63), true), 5);
    assert!(t.lookup(1, 5, 0x1000).is_some());
    t.mov_cr3(1, 0x2005, true);
    assert!(t.lookup(1, 5, 0x1000).is_none());
    // The other VPID was never touched; INVVPID drops it.
    assert!(t.lookup(2, 1, 0x1000).is_some());
    t.invvpid(2);
    assert!(t.lookup(2, 1, 0x1000).is_none());
    assert!(t.counters().invalidated >= 8);
}
