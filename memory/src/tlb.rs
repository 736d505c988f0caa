//! A TLB model tagged by VPID and PCID (SDM vol. 3A §4.10, vol. 3C §28.1): entries cache a
//! translation for a (VPID, PCID, page) — global entries for any PCID — and are invalidated by
//! INVLPG, the four INVPCID types, MOV to CR3 (with or without NOFLUSH) and INVVPID.
//!
//! The TLB may hold stale entries after the guest edits its tables without invalidating: that is
//! the architecture, and the model reproduces it.
//!
//! ```
//! use vmkit_memory::PageSize;
//! use vmkit_memory::tlb::{Tlb, TlbEntry};
//! use vmkit_memory::walk::Perms;
//!
//! let mut tlb = Tlb::default();
//! let e = TlbEntry { frame: 0x20_0000, page_size: PageSize::Size2M, perms: Perms::default() };
//! tlb.insert(1, 5, 0x4000_0000, e);
//! assert_eq!(tlb.lookup(1, 5, 0x4001_2345).map(|e| e.frame), Some(0x20_0000));
//! assert!(tlb.lookup(1, 6, 0x4001_2345).is_none()); // another PCID
//! tlb.mov_cr3(1, 5 | (1 << 63), true); // NOFLUSH: kept
//! assert!(tlb.lookup(1, 5, 0x4000_0000).is_some());
//! tlb.invlpg(1, 5, 0x401f_f000); // any address inside the 2 MiB page
//! assert!(tlb.lookup(1, 5, 0x4000_0000).is_none());
//! ```

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::paging::PageSize;
use crate::walk::Perms;

/// A cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlbEntry {
    /// Base of the (host- or guest-) physical page.
    pub frame: u64,
    /// Page size.
    pub page_size: PageSize,
    /// Effective rights (G decides whether the entry is global).
    pub perms: Perms,
}

/// INVPCID types (SDM vol. 2, INVPCID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InvpcidType {
    /// Type 0: one address, one PCID (non-global entries).
    IndividualAddress,
    /// Type 1: all non-global entries of one PCID.
    SingleContext,
    /// Type 2: everything, global entries included.
    AllContextIncludingGlobal,
    /// Type 3: every non-global entry.
    AllContext,
}

/// TLB event counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlbCounters {
    /// Lookups that hit.
    pub hits: u64,
    /// Lookups that missed.
    pub misses: u64,
    /// Entries invalidated.
    pub invalidated: u64,
}

const SIZES: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

/// Tag for global entries (they match any PCID).
const GLOBAL: u32 = u32::MAX;

/// The TLB model. Keys are (VPID, PCID or global, page base); lookups try each page size.
#[derive(Debug, Default)]
pub struct Tlb {
    entries: HashMap<(u16, u32, u64), TlbEntry>,
    counters: TlbCounters,
}

/// Page base of `va` for `size`, with the size's level in the low bits (so a 4 KiB and a 2 MiB
/// entry at the same base are different keys).
fn base(va: u64, size: PageSize) -> u64 {
    (va & !(size.bytes() - 1)) | u64::from(size.level())
}

impl Tlb {
    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No entries cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The counters.
    pub fn counters(&self) -> &TlbCounters {
        &self.counters
    }

    /// Look up `va` for (`vpid`, `pcid`): a non-global entry of that PCID or a global entry.
    pub fn lookup(&mut self, vpid: u16, pcid: u16, va: u64) -> Option<TlbEntry> {
        for size in SIZES {
            let b = base(va, size);
            for tag in [u32::from(pcid), GLOBAL] {
                if let Some(e) = self.entries.get(&(vpid, tag, b)) {
                    self.counters.hits += 1;
                    return Some(*e);
                }
            }
        }
        self.counters.misses += 1;
        None
    }

    /// Cache `entry` for the page containing `va`.
    pub fn insert(&mut self, vpid: u16, pcid: u16, va: u64, entry: TlbEntry) {
        let tag = if entry.perms.global {
            GLOBAL
        } else {
            u32::from(pcid)
        };
        self.entries
            .insert((vpid, tag, base(va, entry.page_size)), entry);
    }

    fn remove_where(&mut self, f: impl Fn(&(u16, u32, u64), &TlbEntry) -> bool) {
        let before = self.entries.len();
        self.entries.retain(|k, e| !f(k, e));
        self.counters.invalidated += (before - self.entries.len()) as u64;
    }

    /// INVLPG `va` (SDM §4.10.4.1): entries for the page in the current PCID, and global entries
    /// for it in any PCID, whatever their page size.
    pub fn invlpg(&mut self, vpid: u16, pcid: u16, va: u64) {
        self.remove_where(|&(v, t, b), e| {
            v == vpid && (t == u32::from(pcid) || t == GLOBAL) && b == base(va, e.page_size)
        });
    }

    /// INVPCID of `kind` for `pcid` (and `va` for the individual-address type).
    pub fn invpcid(&mut self, vpid: u16, kind: InvpcidType, pcid: u16, va: u64) {
        let p = u32::from(pcid);
        match kind {
            InvpcidType::IndividualAddress => {
                self.remove_where(|&(v, t, b), e| v == vpid && t == p && b == base(va, e.page_size))
            }
            InvpcidType::SingleContext => self.remove_where(|&(v, t, _), _| v == vpid && t == p),
            InvpcidType::AllContextIncludingGlobal => self.remove_where(|&(v, _, _), _| v == vpid),
            InvpcidType::AllContext => self.remove_where(|&(v, t, _), _| v == vpid && t != GLOBAL),
        }
    }

    /// MOV to CR3 with value `cr3` (SDM §4.10.4.1). Without CR4.PCIDE: non-global entries of
    /// PCID 0 go. With PCIDE: bit 63 (NOFLUSH) clear invalidates the new PCID's non-global
    /// entries; set keeps everything. Returns the PCID now current.
    pub fn mov_cr3(&mut self, vpid: u16, cr3: u64, pcide: bool) -> u16 {
        if !pcide {
            self.remove_where(|&(v, t, _), _| v == vpid && t == 0);
            return 0;
        }
        let pcid = (cr3 & 0xfff) as u16;
        if cr3 & (1 << 63) == 0 {
            self.remove_where(|&(v, t, _), _| v == vpid && t == u32::from(pcid));
        }
        pcid
    }

    /// INVVPID single-context (or a VM entry without VPIDs): every entry of `vpid`.
    pub fn invvpid(&mut self, vpid: u16) {
        self.remove_where(|&(v, _, _), _| v == vpid);
    }

    /// Everything (e.g. a CR4.PGE toggle or INVVPID all-context).
    pub fn flush_all(&mut self) {
        self.remove_where(|_, _| true);
    }
}
