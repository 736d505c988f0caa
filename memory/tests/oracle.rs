//! Oracle equality: for random guest tables, random GPA→HPA (EPT) maps with non-present entries,
//! misconfigurations and permission mixes, every probed address and access translates the same
//! through the shadow MMU and through EPT ∘ guest walk — also after random guest page-table
//! writes, guest stores, INVLPG and CR3 switches.

use proptest::prelude::*;
use vmkit_memory::shadow::SyncPolicy;
use vmkit_memory::test_utils::{LabOp, World, decode, run_ops};
use vmkit_memory::walk::PagingMode;

fn op() -> impl Strategy<Value = LabOp> {
    prop_oneof![
        4 => (any::<u64>(), any::<u64>()).prop_map(|(entry, value)| LabOp::Write { entry, value }),
        2 => (any::<u64>(), any::<u64>()).prop_map(|(probe, value)| LabOp::Store { probe, value }),
        2 => any::<u64>().prop_map(|probe| LabOp::Invlpg { probe }),
        2 => any::<u64>().prop_map(|root| LabOp::Cr3 { root }),
    ]
}

fn mode() -> impl Strategy<Value = (PagingMode, bool)> {
    (any::<u16>(), any::<u32>()).prop_map(|(m, pkru)| {
        let mode = PagingMode {
            la57: m & 1 != 0,
            wp: m & 2 != 0,
            smep: m & 4 != 0,
            smap: m & 8 != 0,
            nxe: m & 16 == 0,
            pke: m & 32 != 0,
            pkru,
            update_ad: m & 64 != 0,
            gbpages: m & 128 == 0,
            ..PagingMode::default()
        };
        (mode, m & 256 != 0)
    })
}

proptest! {
    // 96 cases in CI; PROPTEST_CASES=N for a longer local run.
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96)
    ))]

    #[test]
    fn shadow_equals_ept_after_guest_walk_write_protect(
        seed in any::<u64>(),
        (mode, ept_ad) in mode(),
        ops in proptest::collection::vec(op(), 0..24),
    ) {
        let world = World::new(seed, mode, ept_ad);
        let r = run_ops(&world, SyncPolicy::WriteProtect, &ops);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }

    #[test]
    fn shadow_equals_ept_after_guest_walk_unsync(
        seed in any::<u64>(),
        (mode, ept_ad) in mode(),
        ops in proptest::collection::vec(op(), 0..24),
    ) {
        let world = World::new(seed, mode, ept_ad);
        let r = run_ops(&world, SyncPolicy::Unsync, &ops);
        prop_assert!(r.is_ok(), "{}", r.unwrap_err());
    }
}

/// The worlds are not trivial: a good share of probes translate, and both kinds of fault occur.
#[test]
fn worlds_exercise_hits_fills_and_faults() {
    let mut total = vmkit_memory::test_utils::Report::default();
    for seed in 0..40 {
        let world = World::new(seed, PagingMode::default(), false);
        let ops: Vec<LabOp> = (0..16u64)
            .map(|i| match i % 4 {
                0 => LabOp::Write {
                    entry: seed * 31 + i,
                    value: i * 7,
                },
                1 => LabOp::Store { probe: i, value: i },
                2 => LabOp::Invlpg { probe: i },
                _ => LabOp::Cr3 { root: i + seed },
            })
            .collect();
        let r = run_ops(&world, SyncPolicy::WriteProtect, &ops).unwrap();
        total.probes += r.probes;
        total.translated += r.translated;
        total.counters.hits += r.counters.hits;
        total.counters.guest_faults += r.counters.guest_faults;
        total.counters.host_faults += r.counters.host_faults;
        total.counters.zaps += r.counters.zaps;
        total.counters.pt_write_emulations += r.counters.pt_write_emulations;
    }
    eprintln!("{total:?}");
    assert!(total.translated * 10 > total.probes, "{total:?}");
    assert!(total.counters.hits > 0, "{total:?}");
    assert!(total.counters.guest_faults > 0, "{total:?}");
    assert!(total.counters.host_faults > 0, "{total:?}");
    assert!(total.counters.pt_write_emulations > 0, "{total:?}");
    assert!(total.counters.zaps > 0, "{total:?}");
}

#[test]
fn decode_never_panics_on_short_input() {
    for len in 0..40 {
        let data: Vec<u8> = (0..len as u8).collect();
        let (seed, mode, ad, policy, ops) = decode(&data);
        let world = World::new(seed, mode, ad);
        run_ops(&world, policy, &ops).unwrap();
    }
}
