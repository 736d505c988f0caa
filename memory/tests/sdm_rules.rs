//! The guest walker and EPT model against tables of hand-built page tables, one row per SDM rule
//! (vol. 3A §4.5–4.8, vol. 3C §29.3). Each row states the expected GPA or the exact #PF error code.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_memory::ept::{self, EptAccess, EptConfig, EptFault, eptf, exit_qual};
use vmkit_memory::paging::{flags::*, table_index};
use vmkit_memory::walk::{self, Access, AccessKind, PagingMode, pfec::*};

const P: u64 = PRESENT;
const W: u64 = WRITABLE;
const U: u64 = USER;
const NX: u64 = NO_EXECUTE;
const PS: u64 = PAGE_SIZE;

/// Tables at 0x1000 (root) … 0x5000, one per level; the leaf maps to 0x40_0000 (1 GiB: 0).
const VA: u64 = 0x0000_0040_0040_1234;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

/// Write a chain for `VA`: `entries[i]` is the flags of level `levels - i`; table addresses are
/// filled in. Returns CR3.
fn chain(m: &GuestMemoryMmap, levels: u8, entries: &[u64], leaf_frame: u64) -> u64 {
    let mut table = 0x1000u64;
    for (i, &f) in entries.iter().enumerate() {
        let level = levels - i as u8;
        let is_last = i + 1 == entries.len();
        let target = if is_last { leaf_frame } else { table + 0x1000 };
        m.write_obj(target | f, GuestAddress(table + table_index(VA, level) * 8))
            .unwrap();
        table += 0x1000;
    }
    0x1000
}

fn run(entries: &[u64], mode: PagingMode, access: Access) -> Result<u64, u32> {
    let m = mem();
    let levels = mode.levels();
    let frame = match entries.len() as u8 {
        n if n == levels => 0x40_0000,
        n if n == levels - 1 => 0x40_0000 & !0x1f_ffff, // 2 MiB leaf
        _ => 0,                                         // 1 GiB leaf
    };
    let cr3 = chain(&m, levels, entries, frame);
    walk::walk_guest(&m, &mode, cr3, VA, access)
        .map(|t| t.gpa)
        .map_err(|e| e.page_fault().expect("a page fault").error_code)
}

#[test]
fn sdm_access_rights_table() {
    let d = PagingMode::default();
    let wp0 = PagingMode { wp: false, ..d };
    let no_nxe = PagingMode { nxe: false, ..d };
    let smep = PagingMode { smep: true, ..d };
    let smep_no_nxe = PagingMode {
        smep: true,
        nxe: false,
        ..d
    };
    let smap = PagingMode { smap: true, ..d };
    let pk = PagingMode {
        pke: true,
        pkru: 0b0100, // key 1: AD
        ..d
    };
    let pk_wd = PagingMode {
        pke: true,
        pkru: 0b1000, // key 1: WD
        ..d
    };
    let key1 = 1u64 << 59;
    let rw = [P | W | U, P | W | U, P | W | U];
    let gpa = 0x40_0000 | (VA & 0xfff);
    let (r, w, x) = (Access::read(), Access::write(), Access::fetch());
    #[rustfmt::skip]
    let rows: Vec<Row<PagingMode, Access, u32>> = vec![
        ("supervisor read of RO page", [&rw[..], &[P]].concat(), d, r, Ok(gpa)),
        ("supervisor write to RO page, WP=0", [&rw[..], &[P]].concat(), wp0, w, Ok(gpa)),
        ("supervisor write to RO page, WP=1", [&rw[..], &[P]].concat(), d, w, Err(P_ | WR)),
        ("supervisor write, RO only in PDPTE, WP=1", vec![P|W, P, P|W, P|W], d, w, Err(P_ | WR)),
        ("user read of supervisor page", [&rw[..], &[P | W]].concat(), d, r.user(), Err(P_ | US)),
        ("user read, U/S=0 in PML4E only", vec![P|W, P|W|U, P|W|U, P|W|U], d, r.user(), Err(P_ | US)),
        ("user read of user page", [&rw[..], &[P | U]].concat(), d, r.user(), Ok(gpa)),
        ("user write to RO user page, WP=0", [&rw[..], &[P | U]].concat(), wp0, w.user(), Err(P_ | WR | US)),
        ("implicit supervisor read of supervisor page at CPL3", [&rw[..], &[P]].concat(), d, r.user().implicit(), Ok(gpa)),
        ("fetch from XD page, NXE=1", [&rw[..], &[P | NX]].concat(), d, x, Err(P_ | ID)),
        ("fetch, XD in PDPTE, NXE=1", vec![P|W|U, P|W|U|NX, P|W|U, P|W|U], d, x, Err(P_ | ID)),
        ("XD with NXE=0 is reserved", [&rw[..], &[P | NX]].concat(), no_nxe, r, Err(P_ | RSVD)),
        ("fetch from non-present page, NXE=0: no I/D", [&rw[..], &[0]].concat(), no_nxe, x, Err(0)),
        ("fetch from non-present page, NXE=1: I/D", [&rw[..], &[0]].concat(), d, x, Err(ID)),
        ("user write to non-present PTE", [&rw[..], &[0]].concat(), d, w.user(), Err(WR | US)),
        ("non-present PDE", vec![P|W|U, P|W|U, W|U, P|W|U], d, r, Err(0)),
        ("SMEP: supervisor fetch from user page", [&rw[..], &[P | U]].concat(), smep, x, Err(P_ | ID)),
        ("SMEP without NXE still reports I/D", [&rw[..], &[P | U]].concat(), smep_no_nxe, x, Err(P_ | ID)),
        ("SMEP: user fetch from user page is fine", [&rw[..], &[P | U]].concat(), smep, x.user(), Ok(gpa)),
        ("SMAP: supervisor read of user page, AC=0", [&rw[..], &[P | U]].concat(), smap, r, Err(P_)),
        ("SMAP: supervisor read of user page, AC=1", [&rw[..], &[P | U]].concat(), smap, r.with_ac(), Ok(gpa)),
        ("SMAP: implicit read of user page, AC=1", [&rw[..], &[P | U]].concat(), smap, r.with_ac().implicit(), Err(P_)),
        ("SMAP: supervisor write to RW user page, AC=1", [&rw[..], &[P | W | U]].concat(), smap, w.with_ac(), Ok(gpa)),
        ("SMAP: supervisor write to RO user page, AC=1, WP=1", [&rw[..], &[P | U]].concat(), smap, w.with_ac(), Err(P_ | WR)),
        ("SMAP off: supervisor write to user page, WP=0", [&rw[..], &[P | U]].concat(), wp0, w, Ok(gpa)),
        ("PK: access-disable, supervisor read", [&rw[..], &[P | U | key1]].concat(), pk, r, Err(P_ | PK)),
        ("PK: access-disable does not stop fetches", [&rw[..], &[P | U | key1]].concat(), pk, x.user(), Ok(gpa)),
        ("PK: write-disable, user write", [&rw[..], &[P | W | U | key1]].concat(), pk_wd, w.user(), Err(P_ | WR | US | PK)),
        ("PK: write-disable, supervisor write, WP=0", [&rw[..], &[P | W | U | key1]].concat(), PagingMode { wp: false, ..pk_wd }, w, Ok(gpa)),
        ("PK: supervisor page ignores keys", [&rw[..], &[P | W | key1]].concat(), pk, r, Ok(gpa)),
        ("reserved: bit above MAXPHYADDR=36 in PDE", vec![P|W, P|W, P|W | (1 << 40), P|W], PagingMode { maxphyaddr: 36, ..d }, w.user(), Err(P_ | RSVD | WR | US)),
        ("reserved: PS in PML4E", vec![P|W|PS, P|W, P|W, P|W], d, r, Err(P_ | RSVD)),
        ("2 MiB page", vec![P|W, P|W, P|W|PS], d, r, Ok(0x40_0000 | (VA & 0x1f_ffff))),
        ("2 MiB page with bit 13 set: reserved", vec![P|W, P|W, P|W|PS | (1 << 13)], d, r, Err(P_ | RSVD)),
        ("2 MiB page, PAT bit 12 is fine", vec![P|W, P|W, P|W|PS | (1 << 12)], d, r, Ok(0x40_0000 | (VA & 0x1f_ffff))),
        ("1 GiB page", vec![P|W, P|W|PS], d, r, Ok(VA & 0x3fff_ffff)),
        ("1 GiB page with bit 20 set: reserved", vec![P|W, P|W|PS | (1 << 20)], d, r, Err(P_ | RSVD)),
        ("1 GiB page without Page1GB support: reserved", vec![P|W, P|W|PS], PagingMode { gbpages: false, ..d }, r, Err(P_ | RSVD)),
        ("reserved bits beat non-present below", vec![P|W | (1 << 50), 0, 0, 0], d, r, Err(P_ | RSVD)),
    ];
    for (name, entries, mode, access, want) in rows {
        assert_eq!(run(&entries, mode, access), want, "{name}");
    }
}

const P_: u32 = P as u32;

/// One table row: name, entries (root first), configuration, access, expected result.
type Row<C, A, E> = (&'static str, Vec<u64>, C, A, Result<u64, E>);

#[test]
fn la57_five_level_walks_and_canonical_checks() {
    let m = mem();
    let la57 = PagingMode {
        la57: true,
        ..PagingMode::default()
    };
    // VA with bits 56:48 used (PML5 index 1).
    let va = 0x0001_0000_0040_1234u64;
    let mut table = 0x1000u64;
    for level in (1..=5).rev() {
        let target = if level == 1 {
            0x40_0000
        } else {
            table + 0x1000
        };
        m.write_obj(
            target | P | W,
            GuestAddress(table + table_index(va, level) * 8),
        )
        .unwrap();
        table += 0x1000;
    }
    let t = walk::walk_guest(&m, &la57, 0x1000, va, Access::read()).unwrap();
    assert_eq!((t.gpa, t.depth), (0x40_0234, 5));
    // The same address is not canonical with 4-level paging.
    assert!(matches!(
        walk::walk_guest(&m, &PagingMode::default(), 0x1000, va, Access::read()),
        Err(walk::WalkError::NonCanonical(_))
    ));
    // Bit 57 set without sign extension is not canonical even with LA57.
    assert!(matches!(
        walk::walk_guest(&m, &la57, 0x1000, 1 << 57, Access::read()),
        Err(walk::WalkError::NonCanonical(_))
    ));
}

#[test]
fn accessed_dirty_updates() {
    let m = mem();
    let cr3 = chain(&m, 4, &[P | W, P | W, P | W, P | W], 0x40_0000);
    let mode = PagingMode {
        update_ad: true,
        ..PagingMode::default()
    };
    walk::walk_guest(&m, &mode, cr3, VA, Access::read()).unwrap();
    let t = walk::walk_guest(&m, &PagingMode::default(), cr3, VA, Access::read()).unwrap();
    assert!(t.entries().iter().all(|s| s.entry & ACCESSED != 0));
    assert_eq!(t.entries()[3].entry & DIRTY, 0);
    walk::walk_guest(&m, &mode, cr3, VA, Access::write()).unwrap();
    let t = walk::walk_guest(&m, &PagingMode::default(), cr3, VA, Access::read()).unwrap();
    assert_ne!(t.entries()[3].entry & DIRTY, 0);
    // A faulting walk sets nothing.
    let m = mem();
    let cr3 = chain(&m, 4, &[P | W, P | W, P | W, P], 0x40_0000);
    walk::walk_guest(&m, &mode, cr3, VA, Access::write()).unwrap_err();
    let t = walk::walk_guest(&m, &PagingMode::default(), cr3, VA, Access::read()).unwrap();
    assert!(t.entries().iter().all(|s| s.entry & ACCESSED == 0));
}

#[test]
fn ept_rules_table() {
    let cfg = EptConfig::default();
    let no_xo = EptConfig {
        execute_only: false,
        ..cfg
    };
    let mbec = EptConfig { mbec: true, ..cfg };
    let rwx = eptf::RWX;
    let ux = eptf::USER_EXECUTE;
    let wb = eptf::MT_WB;
    let gpa = VA & 0xffff_ffff_ffff;
    let hpa = 0x40_0000 | (gpa & 0xfff);
    let (r, w, x) = (AccessKind::Read, AccessKind::Write, AccessKind::Fetch);
    let viol = |q: u64| {
        Err(Some(EptFault::Violation {
            gpa,
            gla: None,
            qualification: q,
        }))
    };
    let misc = |level: u8| Err(Some(EptFault::Misconfig { gpa, level }));
    use exit_qual as q;
    #[rustfmt::skip]
    let rows: Vec<Row<EptConfig, AccessKind, Option<EptFault>>> = vec![
        ("read of RWX page", vec![rwx, rwx, rwx, rwx | wb], cfg, r, Ok(hpa)),
        ("write to read-only page", vec![rwx, rwx, rwx, eptf::READ | wb], cfg, w, viol(q::WRITE | q::READABLE)),
        ("fetch, X clear in the PDPTE", vec![rwx, eptf::READ | eptf::WRITE, rwx, rwx | wb], cfg, x, viol(q::FETCH | q::READABLE | q::WRITABLE)),
        ("read of non-present PTE", vec![rwx, rwx, rwx, 0], cfg, r, viol(q::READ)),
        ("execute-only page read", vec![rwx, rwx, rwx, eptf::EXECUTE | wb], cfg, r, viol(q::READ | q::EXECUTABLE)),
        ("execute-only without support: misconfig", vec![rwx, rwx, rwx, eptf::EXECUTE | wb], no_xo, x, misc(1)),
        ("write without read: misconfig", vec![rwx, rwx, eptf::WRITE, rwx | wb], cfg, r, misc(2)),
        ("memory type 2: misconfig", vec![rwx, rwx, rwx, rwx | (2 << 3)], cfg, r, misc(1)),
        ("memory type 7: misconfig", vec![rwx, rwx, rwx, rwx | (7 << 3)], cfg, r, misc(1)),
        ("reserved bits 7:3 in a PML4E: misconfig", vec![rwx | (1 << 3), rwx, rwx, rwx | wb], cfg, r, misc(4)),
        ("bit above MAXPHYADDR: misconfig", vec![rwx, rwx | (1 << 47), rwx, rwx | wb], cfg, r, misc(3)),
        ("2 MiB leaf", vec![rwx, rwx, rwx | eptf::PAGE_SIZE | wb], cfg, w, Ok(0x40_0000 | (gpa & 0x1f_ffff))),
        ("2 MiB leaf with bit 12 set: misconfig", vec![rwx, rwx, rwx | eptf::PAGE_SIZE | wb | (1 << 12)], cfg, r, misc(2)),
        ("1 GiB leaf", vec![rwx, rwx | eptf::PAGE_SIZE | wb], cfg, r, Ok(gpa & 0x3fff_ffff)),
        ("MBEC: supervisor fetch, only user-execute set", vec![rwx | ux, rwx | ux, rwx | ux, eptf::READ | ux | wb], mbec, x, viol(q::FETCH | q::READABLE | q::USER_EXECUTABLE)),
    ];
    for (name, entries, config, kind, want) in rows {
        let m = mem();
        let levels = entries.len();
        let frame = match levels {
            4 => 0x40_0000,
            3 => 0x40_0000,
            _ => 0,
        };
        let root = chain(&m, 4, &entries, frame);
        let got = ept::translate_phys(
            &m,
            &config,
            ept::eptp(root, 4, false),
            gpa,
            EptAccess::new(kind),
        )
        .map(|t| t.hpa)
        .map_err(|e| e.fault());
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn ept_memory_type_ad_and_bad_eptp() {
    let m = mem();
    let root = chain(&m, 4, &[eptf::RWX; 4], 0x40_0000);
    m.write_obj(
        0x40_0000 | eptf::RWX | eptf::MT_WT | eptf::IGNORE_PAT,
        GuestAddress(0x4000 + table_index(VA, 1) * 8),
    )
    .unwrap();
    let cfg = EptConfig::default();
    let t = ept::translate_phys(
        &m,
        &cfg,
        ept::eptp(root, 4, true),
        VA & 0xffff_ffff_ffff,
        EptAccess::new(AccessKind::Write),
    )
    .unwrap();
    assert_eq!((t.memory_type, t.ignore_pat), (4, true));
    let t2 = ept::translate_phys(
        &m,
        &cfg,
        ept::eptp(root, 4, false),
        VA & 0xffff_ffff_ffff,
        EptAccess::new(AccessKind::Read),
    )
    .unwrap();
    assert!(t2.steps[..4].iter().all(|s| s.entry & eptf::ACCESSED != 0));
    assert_ne!(t2.steps[3].entry & eptf::DIRTY, 0);
    for bad in [
        root | 1 | (3 << 3),
        root | 6 | (2 << 3),
        root | 6 | (3 << 3) | (1 << 7),
    ] {
        assert!(matches!(
            ept::translate_phys(&m, &cfg, bad, 0, EptAccess::new(AccessKind::Read)),
            Err(ept::EptError::BadEptp(_))
        ));
    }
}

/// The 2-D walk: reference counts (24 for 4/4, 29 for 5/4, fewer with large EPT pages) and the
/// exit qualification's guest-linear-address bits for each stage (SDM vol. 3C table 28-7).
#[test]
fn two_dimensional_walk_refs_and_qualification() {
    use vmkit_memory::PageSize;
    use vmkit_memory::nested::{self, NestedError, NestedSetup, RefKind, Stage};
    let m = mem();
    // EPT at 0x80_0000: GPA 0..8 MiB identity, 4 KiB pages, the page 0x40_0000 read-only and
    // guest table page 0x3000 not mapped at all in a second EPT.
    let mut b = ept::EptBuilder::new(&m, 0x80_0000, 0x40_0000).unwrap();
    let mut b2_pages = Vec::new();
    for page in 0..(8u64 << 20) / 0x1000 {
        let gpa = page * 0x1000;
        let rights = if gpa == 0x40_0000 {
            eptf::READ | eptf::EXECUTE
        } else {
            eptf::RWX
        };
        b.map(gpa, gpa, PageSize::Size4K, rights | eptf::MT_WB)
            .unwrap();
        if gpa != 0x3000 {
            b2_pages.push(gpa);
        }
    }
    let eptp = b.eptp();
    let mut b2 = ept::EptBuilder::new(&m, 0xC0_0000, 0x30_0000).unwrap();
    for gpa in b2_pages {
        b2.map(gpa, gpa, PageSize::Size4K, eptf::RWX | eptf::MT_WB)
            .unwrap();
    }
    let cr3 = chain(
        &m,
        4,
        &[P | W | U, P | W | U, P | W | U, P | W | U],
        0x40_0000,
    );
    let mut setup = NestedSetup {
        mode: PagingMode::default(),
        ept: EptConfig::default(),
        eptp,
    };
    let t = nested::walk_2d(&m, &setup, cr3, VA, Access::read().user()).unwrap();
    assert_eq!((t.hpa, t.refs.len()), (0x40_0000 | (VA & 0xfff), 24));
    let kinds: Vec<RefKind> = t.refs.as_slice().iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds.iter().filter(|&&k| k == RefKind::GuestTable).count(),
        4
    );
    assert_eq!(kinds[4], RefKind::GuestTable); // 4 EPT reads, then the PML4E
    // A user write to the EPT-read-only page: violation at the final stage, GLA translated, and
    // the advanced bits describe the linear address (user, writable, not XD).
    match nested::walk_2d(&m, &setup, cr3, VA, Access::write().user()) {
        Err(NestedError::Ept {
            stage: Stage::Final,
            fault:
                EptFault::Violation {
                    qualification,
                    gla: Some(gla),
                    ..
                },
        }) => {
            assert_eq!(gla, VA);
            let q = exit_qual::WRITE
                | exit_qual::READABLE
                | exit_qual::EXECUTABLE
                | exit_qual::GLA_VALID
                | exit_qual::GLA_TRANSLATED
                | exit_qual::USER_LINEAR
                | exit_qual::WRITABLE_LINEAR;
            assert_eq!(qualification, q);
        }
        r => panic!("{r:?}"),
    }
    // The PDPT page (GPA 0x3000 … the chain's second table is 0x2000, third 0x3000) unmapped in
    // EPT: a violation while walking the guest tables, GLA valid but not translated.
    setup.eptp = b2.eptp();
    match nested::walk_2d(&m, &setup, cr3, VA, Access::read()) {
        Err(NestedError::Ept {
            stage: Stage::GuestTable(2),
            fault: EptFault::Violation {
                qualification, gpa, ..
            },
        }) => {
            assert_eq!(gpa, 0x3000 + table_index(VA, 2) * 8);
            assert_eq!(qualification, exit_qual::READ | exit_qual::GLA_VALID);
        }
        r => panic!("{r:?}"),
    }
    // With EPT A/D on, guest-table reads count as writes.
    setup.eptp = b2.eptp() | ept::EPTP_AD;
    match nested::walk_2d(&m, &setup, cr3, VA, Access::read()) {
        Err(NestedError::Ept {
            fault: EptFault::Violation { qualification, .. },
            ..
        }) => assert_eq!(qualification, exit_qual::WRITE | exit_qual::GLA_VALID),
        r => panic!("{r:?}"),
    }
    // 5-level guest over 4-level EPT: 5 × 5 + 4 = 29 references.
    let m5 = mem();
    let mut b5 = ept::EptBuilder::new(&m5, 0x80_0000, 0x40_0000).unwrap();
    b5.map_range(0, 0, 8 << 20, PageSize::Size4K, eptf::RWX | eptf::MT_WB)
        .unwrap();
    let cr3 = chain(&m5, 5, &[P | W, P | W, P | W, P | W, P | W], 0x40_0000);
    let setup5 = NestedSetup {
        mode: PagingMode {
            la57: true,
            ..PagingMode::default()
        },
        ept: EptConfig::default(),
        eptp: b5.eptp(),
    };
    let t = nested::walk_2d(&m5, &setup5, cr3, VA, Access::read()).unwrap();
    assert_eq!(t.refs.len(), 29);
}
