//! Fuzz vmkit-memory's paging models.
//!
//! [`run`] builds a paging world — EPT tables with mixed rights and misconfigurations, guest
//! tables whose entries are drawn from the input's seed or, with flag bit 10, copied raw from the
//! input — then replays a guest workload (page-table writes, stores, INVLPG, CR3 switches)
//! through the shadow MMU and compares every probe with the two-dimensional walk. Invariants:
//! nothing panics or hangs; shadow == EPT ∘ guest walk on every input.
//!
//! Input (little-endian u64 words): `seed`, `flags` (bit 0 LA57, 1 WP, 2 SMEP, 3 SMAP, 4 no NXE,
//! 5 PKE, 6 guest A/D updates, 7 no 1 GiB pages, 8 EPT A/D, 9 unsync policy, 10 raw tables,
//! bits 63:32 PKRU), then pairs of words, each an op (see
//! `vmkit_memory::test_utils::decode`); with raw tables the same words after `flags` also
//! fill the table entries.

use vmkit_memory::test_utils::{IDX, TABLES, World, decode, run_ops};

/// Run one input.
pub fn run(data: &[u8]) {
    let (seed, mode, ept_ad, policy, ops) = decode(data);
    let world = World::new(seed, mode, ept_ad);
    let flags = data.get(8..16).map_or(0, |b| {
        b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x))
    });
    if flags & (1 << 10) != 0 {
        let slots = TABLES * IDX.len();
        for (i, chunk) in data
            .get(16..)
            .unwrap_or(&[])
            .chunks(8)
            .take(slots)
            .enumerate()
        {
            let v = chunk
                .iter()
                .rev()
                .fold(0u64, |a, &x| (a << 8) | u64::from(x));
            let t = world.tables[i / IDX.len()];
            world.write_gpa(t + IDX[i % IDX.len()] * 8, v);
        }
    }
    if let Err(e) = run_ops(&world, policy, &ops) {
        panic!("shadow MMU disagrees with EPT ∘ guest walk: {e}");
    }
    // Arbitrary CR3, EPTP and addresses (misaligned, outside memory, non-canonical): errors only.
    let words: Vec<u64> = data
        .chunks(8)
        .map(|c| c.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
        .collect();
    for w in words.windows(3).take(16) {
        let access = vmkit_memory::test_utils::access_from(w[2]);
        let _ = vmkit_memory::walk::walk_guest(&world.host, &mode, w[0], w[1], access);
        let mut setup = world.setup;
        setup.eptp = w[2];
        let _ = vmkit_memory::nested::walk_2d(&world.host, &setup, w[0], w[1], access);
    }
}

/// Deterministic seed inputs (written to `corpus/paging/` by [`tests::seed_corpus_is_current`]
/// when `VMKIT_WRITE_CORPUS=1`).
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let word = |v: u64| v.to_le_bytes().to_vec();
    let flag_sets: [(&str, u64); 6] = [
        ("default", 0b10),
        ("la57_smep_smap", 0b1111),
        ("no_nxe_pke", (0x0000_0004u64 << 32) | 0b11_0010),
        ("ad_updates_ept_ad", 0b1_0100_0010),
        ("unsync", 0b10_0000_0010),
        ("raw_tables", 0b100_0000_0010),
    ];
    for (k, (name, flags)) in flag_sets.iter().enumerate() {
        let mut d = word(0x1234_5678 + k as u64);
        d.extend(word(*flags));
        for i in 0..12u64 {
            d.extend(word(i * 0x9e37_79b9 + (i % 4)));
            d.extend(word(i.wrapping_mul(0x5851_f42d_4c95_7f2d) | 3));
        }
        out.push((format!("seed_{name}"), d));
    }
    out.push(("empty".into(), Vec::new()));
    out.push(("short".into(), vec![1, 2, 3]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_corpus_is_current() {
        crate::check_seed_files("paging", seeds());
    }

    #[test]
    fn replay_corpus_paging() {
        let seeds = crate::corpus("paging");
        assert!(seeds.len() >= 8, "seed corpus missing");
        for s in seeds {
            run(&s);
        }
    }
}
