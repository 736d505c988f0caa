//! The shadow page-table model: what a VMM without EPT does. For each guest CR3 it keeps shadow
//! entries GVA → HPA (the composition guest walk ∘ GPA→HPA, the GPA→HPA map being EPT tables in
//! host memory), write-protects the guest page-table pages those entries were built from, and on
//! a fault decides:
//!
//! * **hypervisor-induced** — the shadow entry is missing or stale (or the access must set the
//!   guest's dirty bit, or writes a write-protected guest page-table page): sync and resume;
//! * **guest-induced** — the guest's own tables deny the access: inject #PF with the guest's
//!   error code;
//! * **host** — the guest-physical address is not backed (an EPT-style violation for the VMM).
//!
//! Guest writes to page-table pages are emulated. With [`SyncPolicy::WriteProtect`] every such
//! write zaps the shadow entries built from that page; with [`SyncPolicy::Unsync`] a written
//! leaf table page becomes *unsync* (no longer write-protected, its shadow entries may be stale
//! as the architecture allows for a TLB) and is resynced on INVLPG and CR3 switches.
//! [`ShadowCounters`] counts each kind of event.
//!
//! ```
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmkit_memory::PageSize;
//! use vmkit_memory::ept::{EptBuilder, EptConfig, eptf};
//! use vmkit_memory::nested::NestedSetup;
//! use vmkit_memory::paging::{PageTableBuilder, flags};
//! use vmkit_memory::shadow::{ShadowMmu, SyncPolicy};
//! use vmkit_memory::walk::{Access, PagingMode};
//!
//! // Guest RAM is identity-mapped GPA = HPA by EPT here, so the builder can write guest tables.
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
//! let mut ept = EptBuilder::new(&mem, 0xF0_0000, 0x10000).unwrap();
//! ept.map_range(0, 0, 8 << 20, PageSize::Size2M, eptf::RWX | eptf::MT_WB).unwrap();
//! let mut pt = PageTableBuilder::new(&mem, 0x1000, 0x8000).unwrap();
//! pt.map(0x40_0000, 0x30_0000, PageSize::Size4K, flags::WRITABLE).unwrap();
//!
//! let setup = NestedSetup { mode: PagingMode::default(), ept: EptConfig::default(), eptp: ept.eptp() };
//! let mut mmu = ShadowMmu::new(setup, SyncPolicy::WriteProtect, pt.cr3());
//! assert_eq!(mmu.translate(&mem, 0x40_0010, Access::read()).unwrap(), 0x30_0010); // fill
//! assert_eq!(mmu.translate(&mem, 0x40_0010, Access::read()).unwrap(), 0x30_0010); // hit
//! assert_eq!((mmu.counters().fills, mmu.counters().hits), (1, 1));
//! ```

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::ept::{self, EptAccess, EptFault, eptf};
use crate::nested::{NestedError, NestedSetup, Stage, walk_2d};
use crate::paging::flags;
use crate::walk::{Access, AccessKind, PageFault, PagingMode, Perms};

/// What happens when the guest writes one of its page-table pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncPolicy {
    /// Keep every guest table write-protected; zap dependent shadow entries on each write.
    WriteProtect,
    /// Let written leaf tables go unsync; resync them on INVLPG and CR3 switches.
    Unsync,
}

/// Counters for each kind of shadow-MMU event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowCounters {
    /// Translations served by a shadow entry (no exit).
    pub hits: u64,
    /// Hypervisor-induced faults that built a missing shadow entry.
    pub fills: u64,
    /// Hypervisor-induced faults on a present shadow entry with too few rights (write-protect,
    /// dirty-bit tracking) that the hypervisor resolved.
    pub protection_fills: u64,
    /// Guest-induced faults: #PF injected into the guest.
    pub guest_faults: u64,
    /// Host faults: the guest-physical address is not mapped by the GPA→HPA map.
    pub host_faults: u64,
    /// Guest writes to write-protected page-table pages that the hypervisor emulated.
    pub pt_write_emulations: u64,
    /// Shadow entries removed (zapped) because their guest tables changed or were flushed.
    pub zaps: u64,
    /// Leaf table pages that went unsync.
    pub unsyncs: u64,
    /// Unsync pages resynced (on INVLPG or CR3 switch).
    pub resyncs: u64,
    /// INVLPG executions.
    pub invlpgs: u64,
    /// CR3 switches.
    pub cr3_switches: u64,
}

/// Why the shadow MMU did not return a host-physical address.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum ShadowError {
    /// Guest-induced: inject this #PF.
    #[error("guest page fault (error code {:#x})", .0.error_code)]
    GuestFault(PageFault),
    /// The GPA→HPA map does not back the address (the VMM handles it, e.g. as MMIO).
    #[error("host fault at {stage:?}: {fault:?}")]
    HostFault {
        /// Where the unbacked guest-physical address was met.
        stage: Stage,
        /// The GPA→HPA fault.
        fault: EptFault,
    },
    /// Not canonical (#GP), bad CR3 or EPTP, or host memory not readable.
    #[error("invalid translation input")]
    Invalid,
}

#[derive(Clone, Copy, Debug)]
struct Spte {
    hpa_page: u64,
    gpa_page: u64,
    perms: Perms,
    /// Accesses ([`access_index`] bits) that complete without any fault: allowed by the guest's
    /// rights under the current mode, by the GPA→HPA rights, and for writes also dirty and not
    /// a write-protected table page. Precomputed at fill; a mode change drops every entry.
    allow: u16,
    /// GPA→HPA rights allow writes and the guest dirty bit needs no update (used when an
    /// unsync page becomes writable again).
    host_writable: bool,
}

/// The [`Spte::allow`] bit index of an access: kind × user mode × SMAP exemption (explicit
/// access with EFLAGS.AC), the only inputs of the permission check besides the mode.
#[inline]
fn access_index(a: Access) -> u32 {
    let kind = match a.kind {
        AccessKind::Read => 0,
        AccessKind::Write => 4,
        AccessKind::Fetch => 8,
    };
    kind | (u32::from(a.is_user_mode()) << 1) | u32::from(!a.implicit && a.ac)
}

/// A representative access for each [`access_index`] value.
fn access_of(index: u32) -> Access {
    let kind = match index >> 2 {
        0 => AccessKind::Read,
        1 => AccessKind::Write,
        _ => AccessKind::Fetch,
    };
    Access {
        kind,
        user: index & 2 != 0,
        implicit: false,
        ac: index & 1 != 0,
    }
}

/// Mask of the [`access_index`] bits of one kind.
fn kind_mask(kind: AccessKind) -> u16 {
    match kind {
        AccessKind::Read => 0x000f,
        AccessKind::Write => 0x00f0,
        AccessKind::Fetch => 0x0f00,
    }
}

fn guest_allow(perms: &Perms, mode: &PagingMode) -> u16 {
    (0..12)
        .filter(|&i| perms.check(access_of(i), mode).is_ok())
        .fold(0, |m, i| m | 1 << i)
}

/// A shadow entry as seen from outside the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowEntry {
    /// Host-physical page.
    pub hpa_page: u64,
    /// Guest-physical page.
    pub gpa_page: u64,
    /// The guest's effective rights.
    pub perms: Perms,
    /// Some writes complete without a hypervisor fault (the shadow entry's W bit).
    pub writable: bool,
}

/// A tracked guest page-table page.
#[derive(Debug, Default)]
struct PtPage {
    /// Shadow entries (root, guest-virtual page number) built from this page.
    users: HashSet<(u64, u64)>,
    /// Bit `n` set: the page was used as a level-`n` table.
    levels: u8,
}

/// The shadow MMU model. See the [module documentation](self).
pub struct ShadowMmu {
    setup: NestedSetup,
    policy: SyncPolicy,
    cr3: u64,
    /// Shadow entries of the current root, by guest-virtual page number.
    cur: HashMap<u64, Spte>,
    /// Shadow entries of other cached roots.
    roots: HashMap<u64, HashMap<u64, Spte>>,
    /// Guest table pages → shadow entries built from them.
    pt_pages: HashMap<u64, PtPage>,
    /// Guest table pages that are unsync (leaf tables written under [`SyncPolicy::Unsync`]).
    unsync: HashSet<u64>,
    counters: ShadowCounters,
}

fn root_key(cr3: u64) -> u64 {
    cr3 & flags::ADDR_MASK
}

impl ShadowMmu {
    /// A shadow MMU for a guest in `setup.mode`, GPA→HPA through `setup.eptp`, starting at `cr3`.
    pub fn new(setup: NestedSetup, policy: SyncPolicy, cr3: u64) -> Self {
        Self {
            setup,
            policy,
            cr3,
            cur: HashMap::new(),
            roots: HashMap::new(),
            pt_pages: HashMap::new(),
            unsync: HashSet::new(),
            counters: ShadowCounters::default(),
        }
    }

    /// The counters.
    pub fn counters(&self) -> &ShadowCounters {
        &self.counters
    }

    /// The guest's current CR3.
    pub fn cr3(&self) -> u64 {
        self.cr3
    }

    /// The guest paging mode.
    pub fn mode(&self) -> &PagingMode {
        &self.setup.mode
    }

    /// Number of shadow entries of the current root.
    pub fn len(&self) -> usize {
        self.cur.len()
    }

    /// No shadow entries for the current root.
    pub fn is_empty(&self) -> bool {
        self.cur.is_empty()
    }

    /// Guest page-table pages currently write-protected (tracked and not unsync).
    pub fn write_protected(&self) -> usize {
        self.pt_pages.len().saturating_sub(self.unsync.len())
    }

    /// The shadow entry for `gva` in the current root, if any.
    pub fn entry(&self, gva: u64) -> Option<ShadowEntry> {
        self.cur.get(&(gva >> 12)).map(|s| ShadowEntry {
            hpa_page: s.hpa_page,
            gpa_page: s.gpa_page,
            perms: s.perms,
            writable: (s.allow & kind_mask(AccessKind::Write)) != 0,
        })
    }

    /// Change the guest paging mode (CR0/CR4/EFER/PKRU writes): drops every shadow entry.
    pub fn set_mode(&mut self, mode: PagingMode) {
        self.setup.mode = mode;
        self.flush_all();
    }

    /// Drop every shadow entry of every root.
    pub fn flush_all(&mut self) {
        self.counters.zaps += self.cur.len() as u64;
        self.counters.zaps += self.roots.values().map(|r| r.len() as u64).sum::<u64>();
        self.cur.clear();
        self.roots.clear();
        self.pt_pages.clear();
        self.unsync.clear();
    }

    /// Translate `gva` for `access` in the current address space. The fast path is one hash
    /// lookup; anything else is a fault to the hypervisor, which walks guest and GPA→HPA tables.
    #[inline]
    pub fn translate<M: GuestMemory + ?Sized>(
        &mut self,
        host: &M,
        gva: u64,
        access: Access,
    ) -> Result<u64, ShadowError> {
        if let Some(s) = self.cur.get(&(gva >> 12))
            && (s.allow >> access_index(access)) & 1 != 0
        {
            self.counters.hits += 1;
            return Ok(s.hpa_page | (gva & 0xfff));
        }
        self.fault(host, gva, access)
    }

    #[cold]
    fn fault<M: GuestMemory + ?Sized>(
        &mut self,
        host: &M,
        gva: u64,
        access: Access,
    ) -> Result<u64, ShadowError> {
        let vpn = gva >> 12;
        let had = self.cur.contains_key(&vpn);
        let t = match walk_2d(host, &self.setup, self.cr3, gva, access) {
            Ok(t) => t,
            Err(NestedError::Guest(pf)) => {
                self.counters.guest_faults += 1;
                return Err(ShadowError::GuestFault(pf));
            }
            Err(NestedError::Ept { stage, fault }) => {
                self.counters.host_faults += 1;
                return Err(ShadowError::HostFault { stage, fault });
            }
            Err(_) => return Err(ShadowError::Invalid),
        };
        if had {
            self.counters.protection_fills += 1;
        } else {
            self.counters.fills += 1;
        }
        let root = root_key(self.cr3);
        let gpa_page = t.gpa & !0xfff;
        // Track (write-protect) every guest table page this entry was built from.
        for s in t.guest.entries() {
            let p = self.pt_pages.entry(s.entry_gpa & !0xfff).or_default();
            p.users.insert((root, vpn));
            p.levels |= 1 << s.level;
        }
        let is_pt_page = self.pt_pages.contains_key(&gpa_page) && !self.unsync.contains(&gpa_page);
        let leaf = t.guest.entries().last().map_or(0, |s| s.entry);
        let dirty = leaf & flags::DIRTY != 0 || access.kind == AccessKind::Write;
        let dirty_ok = !self.setup.mode.update_ad || dirty;
        let rights = t.ept.rights;
        let exec = if self.setup.ept.mbec && t.guest.perms.user {
            eptf::USER_EXECUTE
        } else {
            eptf::EXECUTE
        };
        let host_writable = rights & eptf::WRITE != 0 && dirty_ok;
        let mut host = 0;
        if rights & eptf::READ != 0 {
            host |= kind_mask(AccessKind::Read);
        }
        if rights & exec != 0 {
            host |= kind_mask(AccessKind::Fetch);
        }
        if host_writable && !is_pt_page {
            host |= kind_mask(AccessKind::Write);
        }
        let allow = host & guest_allow(&t.guest.perms, &self.setup.mode);
        let spte = Spte {
            hpa_page: t.hpa & !0xfff,
            gpa_page,
            perms: t.guest.perms,
            allow,
            host_writable,
        };
        self.cur.insert(vpn, spte);
        Ok(t.hpa)
    }

    /// A guest write of `value` to `gva` (8 bytes, not crossing a page): translate, write host
    /// memory, and if the page is a guest page table apply the [`SyncPolicy`].
    pub fn write_u64<M: GuestMemory + ?Sized>(
        &mut self,
        host: &M,
        gva: u64,
        value: u64,
        access: Access,
    ) -> Result<(), ShadowError> {
        let access = Access {
            kind: AccessKind::Write,
            ..access
        };
        let hpa = self.translate(host, gva, access)?;
        host.write_obj(value, GuestAddress(hpa))
            .map_err(|_| ShadowError::Invalid)?;
        if let Some(gpa_page) = self.cur.get(&(gva >> 12)).map(|s| s.gpa_page) {
            self.table_written(gpa_page);
        }
        Ok(())
    }

    /// Tell the model the guest wrote guest-physical `gpa` (a write the hypervisor observed,
    /// e.g. emulated or by DMA): applies the [`SyncPolicy`] if it is a guest table page.
    pub fn guest_wrote(&mut self, gpa: u64) {
        self.table_written(gpa & !0xfff);
    }

    fn table_written(&mut self, page: u64) {
        if !self.pt_pages.contains_key(&page) || self.unsync.contains(&page) {
            return;
        }
        self.counters.pt_write_emulations += 1;
        match self.policy {
            SyncPolicy::WriteProtect => self.zap_page(page),
            SyncPolicy::Unsync => {
                if self.is_leaf_table(page) {
                    let mode = &self.setup.mode;
                    self.unsync.insert(page);
                    self.counters.unsyncs += 1;
                    // Entries mapping the page itself may now be written without a fault.
                    for m in [&mut self.cur].into_iter().chain(self.roots.values_mut()) {
                        for s in m.values_mut().filter(|s| s.gpa_page == page) {
                            if s.host_writable {
                                s.allow |=
                                    kind_mask(AccessKind::Write) & guest_allow(&s.perms, mode);
                            }
                        }
                    }
                } else {
                    self.zap_page(page);
                }
            }
        }
    }

    /// Whether a tracked page has only been used as a level-1 table (page table, not a
    /// directory): only those go unsync; a written directory is zapped.
    fn is_leaf_table(&self, page: u64) -> bool {
        self.pt_pages.get(&page).is_some_and(|p| p.levels == 1 << 1)
    }

    fn zap_page(&mut self, page: u64) {
        let Some(PtPage { users, .. }) = self.pt_pages.remove(&page) else {
            return;
        };
        let cur_root = root_key(self.cr3);
        for (root, vpn) in users {
            let map = if root == cur_root {
                Some(&mut self.cur)
            } else {
                self.roots.get_mut(&root)
            };
            if let Some(m) = map
                && m.remove(&vpn).is_some()
            {
                self.counters.zaps += 1;
            }
        }
    }

    fn resync_all(&mut self) {
        let pages: Vec<u64> = self.unsync.drain().collect();
        for p in pages {
            self.counters.resyncs += 1;
            self.zap_page(p);
        }
    }

    /// INVLPG `gva`: drop its shadow entry in the current root, resync unsync pages.
    pub fn invlpg(&mut self, gva: u64) {
        self.counters.invlpgs += 1;
        if self.cur.remove(&(gva >> 12)).is_some() {
            self.counters.zaps += 1;
        }
        if self.policy == SyncPolicy::Unsync {
            self.resync_all();
        }
    }

    /// MOV to CR3: switch to the shadow entries cached for the new root (kept in sync by write
    /// protection) and resync unsync pages. Bit 63 (NOFLUSH) is not part of CR3 and is dropped.
    pub fn set_cr3(&mut self, cr3: u64) {
        let cr3 = cr3 & !(1 << 63);
        self.counters.cr3_switches += 1;
        let old = root_key(self.cr3);
        let new = root_key(cr3);
        if old != new {
            let next = self.roots.remove(&new).unwrap_or_default();
            let prev = std::mem::replace(&mut self.cur, next);
            self.roots.insert(old, prev);
        }
        self.cr3 = cr3;
        self.resync_all();
    }

    /// The EPT-style GPA→HPA translation the model uses (for callers writing guest memory).
    pub fn gpa_to_hpa<M: GuestMemory + ?Sized>(&self, host: &M, gpa: u64) -> Option<u64> {
        ept::translate_phys(
            host,
            &self.setup.ept,
            self.setup.eptp,
            gpa,
            EptAccess::new(AccessKind::Write),
        )
        .ok()
        .map(|t| t.hpa)
    }
}
