//! A random paging "world" and an oracle check (feature `test-utils`), shared by the property
//! tests, the fuzz target, the benches and the `paging-lab` example.
//!
//! A [`World`] is host memory holding EPT tables and guest RAM (GPA 0..4 MiB: the first 2 MiB
//! through one 2 MiB EPT leaf, the rest through 4 KiB EPT pages at permuted host addresses with
//! mixed rights), plus a pool of guest table pages whose entries — only at the indices in
//! [`IDX`] — are drawn from a seed: non-present, garbage, tables of the pool (cycles included),
//! 4 KiB / 2 MiB / 1 GiB leaves with permission mixes. [`run_ops`] replays guest table writes,
//! guest stores, INVLPG and CR3 switches through a [`ShadowMmu`] and checks every probe against
//! the two-dimensional walk: shadow == EPT ∘ guest walk.
//!
//! ```
//! use vmkit_memory::shadow::SyncPolicy;
//! use vmkit_memory::test_utils::{LabOp, World, run_ops};
//! use vmkit_memory::walk::PagingMode;
//!
//! let world = World::new(42, PagingMode::default(), false);
//! let ops = [LabOp::Write { entry: 3, value: 7 }, LabOp::Invlpg { probe: 1 }, LabOp::Cr3 { root: 1 }];
//! let report = run_ops(&world, SyncPolicy::WriteProtect, &ops).unwrap();
//! assert!(report.probes > 0);
//! ```

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::ept::{EptBuilder, EptConfig, EptFault, eptf};
use crate::nested::{NestedError, NestedSetup, Stage, walk_2d};
use crate::paging::{PageSize, flags};
use crate::shadow::{ShadowCounters, ShadowError, ShadowMmu, SyncPolicy};
use crate::walk::{Access, AccessKind, PageFault, PagingMode};

/// Table indices that hold entries (probes are built from them).
pub const IDX: [u64; 4] = [0, 1, 2, 511];
/// Guest RAM size (GPA 0..GUEST_RAM).
pub const GUEST_RAM: u64 = 4 << 20;
/// Host memory size.
pub const HOST_MEM: u64 = 16 << 20;
/// Host address of guest RAM's first 2 MiB.
pub const GUEST_HPA: u64 = 8 << 20;
/// Number of guest table pages in the pool.
pub const TABLES: usize = 10;

/// splitmix64: a tiny deterministic generator.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Host memory with EPT tables and randomly built guest tables.
pub struct World {
    /// Host memory (EPT tables at 0..1 MiB, guest RAM from [`GUEST_HPA`]).
    pub host: GuestMemoryMmap,
    /// Guest mode, EPT config and EPTP.
    pub setup: NestedSetup,
    /// Guest-physical addresses of the table pool.
    pub tables: Vec<u64>,
    /// Guest-physical data pages leaves may point at (table pages included).
    pub data: Vec<u64>,
    /// The seed the world was built from.
    pub seed: u64,
}

impl World {
    /// Build a world from `seed`, with guest `mode` and EPT A/D on or off.
    pub fn new(seed: u64, mode: PagingMode, ept_ad: bool) -> Self {
        let host = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), HOST_MEM as usize)])
            .expect("host memory");
        let mut rng = Rng(seed);
        let mut eb = EptBuilder::new(&host, 0x1000, 0xF_F000)
            .expect("EPT area")
            .with_ad(ept_ad);
        eb.map(0, GUEST_HPA, PageSize::Size2M, eptf::RWX | eptf::MT_WB)
            .expect("2 MiB EPT leaf");
        for page in 0..512u64 {
            let gpa = (2 << 20) + page * 0x1000;
            // An odd multiplier permutes the 512 host pages: the map stays injective.
            let hpa = GUEST_HPA + (2 << 20) + ((page * 397 + 11) % 512) * 0x1000;
            let r = rng.next_u64();
            let rights = match r % 16 {
                0 => continue, // not present
                1 => eptf::READ,
                2 => eptf::READ | eptf::WRITE,
                3 => eptf::READ | eptf::EXECUTE,
                4 => eptf::EXECUTE,
                5 => eptf::WRITE, // misconfigured
                _ => eptf::RWX,
            };
            let mt = if r & 0x100 != 0 {
                eptf::MT_WB
            } else {
                eptf::MT_UC
            };
            eb.map(gpa, hpa, PageSize::Size4K, rights | mt)
                .expect("4 KiB EPT leaf");
        }
        let setup = NestedSetup {
            mode,
            ept: EptConfig::default(),
            eptp: eb.eptp(),
        };
        let mut tables: Vec<u64> = (1..=8).map(|i| i * 0x1000).collect();
        tables.push(0x20_1000);
        tables.push(0x20_2000);
        let mut data: Vec<u64> = vec![0x10_0000, 0x10_1000, 0x1F_F000, 0x20_3000, 0x3F_F000];
        data.extend_from_slice(&tables[..3]);
        data.push(0x80_0000); // outside guest RAM
        let w = Self {
            host,
            setup,
            tables,
            data,
            seed,
        };
        for t in 0..TABLES {
            for &i in &IDX {
                let v = w.random_entry(t, rng.next_u64());
                w.write_gpa(w.tables[t] + i * 8, v);
            }
        }
        w
    }

    /// The host address backing guest-physical `gpa` (whatever the EPT rights), if in RAM.
    pub fn gpa_to_hpa(&self, gpa: u64) -> Option<u64> {
        if gpa < (2 << 20) {
            Some(GUEST_HPA + gpa)
        } else if gpa < GUEST_RAM {
            let page = (gpa - (2 << 20)) >> 12;
            Some(GUEST_HPA + (2 << 20) + ((page * 397 + 11) % 512) * 0x1000 + (gpa & 0xfff))
        } else {
            None
        }
    }

    /// Write a 64-bit value at guest-physical `gpa` (no-op outside guest RAM).
    pub fn write_gpa(&self, gpa: u64, value: u64) {
        if let Some(hpa) = self.gpa_to_hpa(gpa) {
            let _ = self.host.write_obj(value, GuestAddress(hpa));
        }
    }

    /// The level table `t` of the pool is meant for (entries are drawn to fit it, but any table
    /// may be reached at any level through cycles and stray pointers).
    pub fn home_level(&self, t: usize) -> u8 {
        let levels = self.setup.mode.levels();
        1 + (t % levels as usize) as u8
    }

    /// A guest table entry for pool table `t`, drawn from `r`.
    pub fn random_entry(&self, t: usize, r: u64) -> u64 {
        let pick = |v: &[u64], x: u64| v[(x % v.len() as u64) as usize];
        let bits = r >> 8;
        let level = self.home_level(t);
        let perms = perm_bits(bits >> 8);
        let table_at = |lvl: u8, x: u64| {
            let same: Vec<u64> = (0..TABLES)
                .filter(|&i| self.home_level(i) == lvl)
                .map(|i| self.tables[i])
                .collect();
            if same.is_empty() {
                pick(&self.tables, x)
            } else {
                pick(&same, x)
            }
        };
        match r % 20 {
            0 => 0,
            1 => r | flags::PRESENT, // garbage: reserved bits likely
            2 => pick(&self.tables, bits) | flags::PRESENT | perms, // any table: cycles
            3..=5 if matches!(level, 2 | 3) => {
                // A large-page leaf.
                let base = if bits & 1 == 0 { 0 } else { 2 << 20 };
                let base = if level == 3 { 0 } else { base };
                base | flags::PRESENT | flags::PAGE_SIZE | perms
            }
            _ if level == 1 => pick(&self.data, bits) | flags::PRESENT | perms,
            _ => table_at(level - 1, bits) | flags::PRESENT | perms,
        }
    }

    /// A populated entry slot chosen by `r`: (pool table, guest-physical address).
    pub fn entry_slot(&self, r: u64) -> (usize, u64) {
        let t = (r % TABLES as u64) as usize;
        (
            t,
            self.tables[t] + IDX[((r >> 8) % IDX.len() as u64) as usize] * 8,
        )
    }

    /// A probe address built from populated indices, chosen by `r`.
    pub fn probe_va(&self, r: u64) -> u64 {
        let levels = self.setup.mode.levels();
        let mut va = 0u64;
        for level in 1..=levels {
            let i = IDX[((r >> (level * 2)) & 3) as usize];
            va |= i << (12 + 9 * (u64::from(level) - 1));
        }
        va |= (r >> 20) & 0xff8;
        // Sign-extend from the top implemented bit.
        let top = if levels == 5 { 56 } else { 47 };
        let shift = 63 - top;
        (((va << shift) as i64) >> shift) as u64
    }

    /// A root table (CR3) chosen by `r` among the top-level tables of the pool.
    pub fn root(&self, r: u64) -> u64 {
        let top = self.setup.mode.levels();
        let roots: Vec<u64> = (0..TABLES)
            .filter(|&i| self.home_level(i) == top)
            .map(|i| self.tables[i])
            .collect();
        roots[(r % roots.len() as u64) as usize]
    }
}

fn perm_bits(b: u64) -> u64 {
    let mut f = 0;
    if b & 0b11 != 0 {
        f |= flags::WRITABLE;
    }
    if b & 0b1100 != 0 {
        f |= flags::USER;
    }
    if b & 0x300 == 0 {
        f |= 1 << 59; // protection key 1
    }
    if b & 0b1_0000 != 0 && b & 0b10_0000 != 0 {
        f |= flags::NO_EXECUTE;
    }
    if b & 0b100_0000 != 0 {
        f |= flags::ACCESSED | flags::DIRTY;
    }
    if b & 0b1000_0000 != 0 {
        f |= flags::GLOBAL;
    }
    f
}

/// An access chosen by `r`: read/write/fetch, user or supervisor, AC, sometimes implicit.
pub fn access_from(r: u64) -> Access {
    let kind = match r % 3 {
        0 => AccessKind::Read,
        1 => AccessKind::Write,
        _ => AccessKind::Fetch,
    };
    Access {
        kind,
        user: r & 4 != 0,
        ac: r & 8 != 0,
        implicit: r & 0x30 == 0x30,
    }
}

/// The result both models are compared on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Translated to this host-physical address.
    Hpa(u64),
    /// #PF for the guest.
    GuestFault(PageFault),
    /// GPA→HPA fault at a stage.
    HostFault(Stage, EptFault),
    /// Invalid input (non-canonical, bad CR3 …).
    Invalid,
}

/// The oracle: a fresh two-dimensional walk.
pub fn oracle(world: &World, cr3: u64, va: u64, access: Access) -> Outcome {
    match walk_2d(&world.host, &world.setup, cr3, va, access) {
        Ok(t) => Outcome::Hpa(t.hpa),
        Err(NestedError::Guest(pf)) => Outcome::GuestFault(pf),
        Err(NestedError::Ept { stage, fault }) => Outcome::HostFault(stage, fault),
        Err(_) => Outcome::Invalid,
    }
}

/// The shadow model's answer.
pub fn shadow_outcome(mmu: &mut ShadowMmu, world: &World, va: u64, access: Access) -> Outcome {
    match mmu.translate(&world.host, va, access) {
        Ok(h) => Outcome::Hpa(h),
        Err(ShadowError::GuestFault(pf)) => Outcome::GuestFault(pf),
        Err(ShadowError::HostFault { stage, fault }) => Outcome::HostFault(stage, fault),
        Err(ShadowError::Invalid) => Outcome::Invalid,
    }
}

/// One step of a guest workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LabOp {
    /// The guest writes a page-table entry (chosen by `entry`) with a value drawn from `value`;
    /// the hypervisor sees the write (emulated or write-protect fault).
    Write {
        /// Selects the entry slot.
        entry: u64,
        /// Selects the new value.
        value: u64,
    },
    /// The guest stores 8 bytes through a probe address (may hit its own tables).
    Store {
        /// Selects the address and access.
        probe: u64,
        /// The value.
        value: u64,
    },
    /// INVLPG of a probe address.
    Invlpg {
        /// Selects the address.
        probe: u64,
    },
    /// MOV to CR3 with a pool root.
    Cr3 {
        /// Selects the root.
        root: u64,
    },
}

/// What [`run_ops`] checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Probes compared.
    pub probes: u64,
    /// Of which translated.
    pub translated: u64,
    /// Shadow counters at the end.
    pub counters: ShadowCounters,
}

/// Run `ops` through a [`ShadowMmu`] on `world`, comparing every probe with [`oracle`]: after
/// every op with [`SyncPolicy::WriteProtect`], after each CR3 switch with [`SyncPolicy::Unsync`]
/// (unsync tables may be stale until then, as a TLB may). Probes are a fixed set of 24 addresses ×
/// accesses derived from the seed. Errors describe the first mismatch.
pub fn run_ops(world: &World, policy: SyncPolicy, ops: &[LabOp]) -> Result<Report, String> {
    let mut rng = Rng(world.seed ^ 0x5eed);
    let probes: Vec<(u64, Access)> = (0..24)
        .map(|_| {
            let r = rng.next_u64();
            (world.probe_va(r), access_from(r >> 40))
        })
        .collect();
    let mut cr3 = world.root(0);
    let mut mmu = ShadowMmu::new(world.setup, policy, cr3);
    let mut report = Report::default();
    let check = |mmu: &mut ShadowMmu, cr3: u64, report: &mut Report| -> Result<(), String> {
        for &(va, access) in &probes {
            // Twice: the second answer may come from the shadow entry the first one built.
            for _ in 0..2 {
                let want = oracle(world, cr3, va, access);
                let got = shadow_outcome(mmu, world, va, access);
                report.probes += 1;
                if matches!(want, Outcome::Hpa(_)) {
                    report.translated += 1;
                }
                if want != got {
                    return Err(format!(
                        "cr3 {cr3:#x} va {va:#x} {access:?}: shadow {got:?}, EPT∘guest {want:?}"
                    ));
                }
            }
        }
        Ok(())
    };
    check(&mut mmu, cr3, &mut report)?;
    for op in ops {
        match *op {
            LabOp::Write { entry, value } => {
                let (t, gpa) = world.entry_slot(entry);
                world.write_gpa(gpa, world.random_entry(t, value));
                mmu.guest_wrote(gpa);
            }
            LabOp::Store { probe, value } => {
                let (va, access) = probes[(probe % probes.len() as u64) as usize];
                let access = Access {
                    kind: AccessKind::Write,
                    ..access
                };
                let want = oracle(world, cr3, va, access);
                let got = match mmu.write_u64(
                    &world.host,
                    va,
                    world.random_entry((value % TABLES as u64) as usize, value >> 8),
                    access,
                ) {
                    Ok(()) => want,
                    Err(ShadowError::GuestFault(pf)) => Outcome::GuestFault(pf),
                    Err(ShadowError::HostFault { stage, fault }) => {
                        Outcome::HostFault(stage, fault)
                    }
                    Err(ShadowError::Invalid) => Outcome::Invalid,
                };
                if policy == SyncPolicy::WriteProtect && want != got {
                    return Err(format!("store {va:#x}: shadow {got:?}, EPT∘guest {want:?}"));
                }
            }
            LabOp::Invlpg { probe } => {
                mmu.invlpg(probes[(probe % probes.len() as u64) as usize].0);
            }
            LabOp::Cr3 { root } => {
                cr3 = world.root(root);
                mmu.set_cr3(cr3);
            }
        }
        if policy == SyncPolicy::WriteProtect || matches!(op, LabOp::Cr3 { .. }) {
            check(&mut mmu, cr3, &mut report)?;
        }
    }
    report.counters = *mmu.counters();
    Ok(report)
}

/// Decode a byte string into a mode and ops (used by the fuzz target and its corpus).
pub fn decode(data: &[u8]) -> (u64, PagingMode, bool, SyncPolicy, Vec<LabOp>) {
    let mut words = data
        .chunks(8)
        .map(|c| c.iter().rev().fold(0u64, |a, &b| (a << 8) | u64::from(b)));
    let seed = words.next().unwrap_or(0);
    let m = words.next().unwrap_or(0);
    let mode = PagingMode {
        la57: m & 1 != 0,
        wp: m & 2 != 0,
        smep: m & 4 != 0,
        smap: m & 8 != 0,
        nxe: m & 16 == 0,
        pke: m & 32 != 0,
        pkru: (m >> 32) as u32,
        update_ad: m & 64 != 0,
        gbpages: m & 128 == 0,
        ..PagingMode::default()
    };
    let ept_ad = m & 256 != 0;
    let policy = if m & 512 != 0 {
        SyncPolicy::Unsync
    } else {
        SyncPolicy::WriteProtect
    };
    let mut ops = Vec::new();
    while let Some(w) = words.next() {
        let arg = words.next().unwrap_or(w);
        ops.push(match w % 4 {
            0 => LabOp::Write {
                entry: w >> 2,
                value: arg,
            },
            1 => LabOp::Store {
                probe: w >> 2,
                value: arg,
            },
            2 => LabOp::Invlpg { probe: w >> 2 },
            _ => LabOp::Cr3 { root: w >> 2 },
        });
        if ops.len() >= 64 {
            break;
        }
    }
    (seed, mode, ept_ad, policy, ops)
}
