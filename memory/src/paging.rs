//! x86-64 page tables (Intel SDM vol. 3A §4.5, 4-level paging): a builder that writes tables into
//! guest memory and the shared radix-walk core.
//!
//! The walk core, [`radix_walk`], is generic over an [`EntryFormat`]: guest paging, EPT and IOMMU
//! second-level tables are all radix walks that differ only in how an entry says "present",
//! "leaf" and "address". [`X86Format`] is the 4-level IA-32e format.
//!
//! ```
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmkit_memory::paging::{self, PageSize, PageTableBuilder, flags};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
//! // Tables live in 0x1000..0x10000; identity-map the first 4 MiB with 2 MiB pages.
//! let mut pt = PageTableBuilder::new(&mem, 0x1000, 0xF000).unwrap();
//! pt.identity_map(0, 4 << 20, PageSize::Size2M, flags::WRITABLE).unwrap();
//! // And map one 4 KiB page of VA 0x4000_0000 to GPA 0x30_0000.
//! pt.map(0x4000_0000, 0x30_0000, PageSize::Size4K, flags::WRITABLE).unwrap();
//!
//! let t = paging::translate(&mem, pt.cr3(), 0x4000_0123).unwrap();
//! assert_eq!(t.gpa, 0x30_0123);
//! assert_eq!(t.page_size, PageSize::Size4K);
//! assert!(paging::translate(&mem, pt.cr3(), 0x8000_0000).is_err());
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// Page-table entry bits (SDM vol. 3A, tables 4-14 … 4-20).
pub mod flags {
    /// P: present.
    pub const PRESENT: u64 = 1 << 0;
    /// R/W: writes allowed.
    pub const WRITABLE: u64 = 1 << 1;
    /// U/S: user-mode accesses allowed.
    pub const USER: u64 = 1 << 2;
    /// PWT: page-level write-through.
    pub const PWT: u64 = 1 << 3;
    /// PCD: page-level cache disable.
    pub const PCD: u64 = 1 << 4;
    /// A: accessed.
    pub const ACCESSED: u64 = 1 << 5;
    /// D: dirty (leaf entries only).
    pub const DIRTY: u64 = 1 << 6;
    /// PS: page size (a 2 MiB or 1 GiB leaf in a PDE or PDPTE).
    pub const PAGE_SIZE: u64 = 1 << 7;
    /// G: global (leaf entries only).
    pub const GLOBAL: u64 = 1 << 8;
    /// XD: execute-disable (when EFER.NXE = 1).
    pub const NO_EXECUTE: u64 = 1 << 63;
    /// Bits 51:12 — the physical address of the next table or 4 KiB frame.
    pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;
}

/// Size of a page mapped by a leaf entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PageSize {
    /// 4 KiB (a PTE, level 1).
    Size4K,
    /// 2 MiB (a PDE with PS=1, level 2).
    Size2M,
    /// 1 GiB (a PDPTE with PS=1, level 3).
    Size1G,
}

impl PageSize {
    /// Bytes in the page.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }

    /// The paging level (1 = PT, 2 = PD, 3 = PDPT) whose entry maps a page of this size.
    pub const fn level(self) -> u8 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }

    /// The page size a leaf at `level` maps.
    pub const fn from_level(level: u8) -> Option<Self> {
        match level {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }
}

/// Errors from building or walking page tables.
#[derive(Debug, Error)]
pub enum PagingError {
    /// The walk met a non-present entry.
    #[error("address {va:#x} is not mapped (non-present entry at level {level})")]
    NotPresent {
        /// The translated address.
        va: u64,
        /// The level (4 = PML4 … 1 = PT) of the non-present entry.
        level: u8,
    },
    /// A leaf (PS=1) entry at a level where the format forbids it.
    #[error("entry at level {level} for {va:#x} has PS set where no large page is allowed")]
    BadLeaf {
        /// The translated address.
        va: u64,
        /// The level of the entry.
        level: u8,
    },
    /// The address is not canonical for the paging mode.
    #[error("address {0:#x} is not canonical")]
    NonCanonical(u64),
    /// An address or length is not aligned to what the operation needs.
    #[error("{what} {value:#x} is not aligned to {align:#x}")]
    Misaligned {
        /// Which argument.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The required alignment.
        align: u64,
    },
    /// The builder's table area is full.
    #[error("page-table area exhausted")]
    OutOfTableSpace,
    /// The virtual address is already mapped (or covered by a larger page).
    #[error("address {0:#x} is already mapped")]
    AlreadyMapped(u64),
    /// A table or entry lies outside guest memory.
    #[error("page-table access at {gpa:#x} failed")]
    Memory {
        /// Guest physical address of the access.
        gpa: u64,
        /// The vm-memory error.
        #[source]
        source: GuestMemoryError,
    },
}

/// How a radix page-table format encodes its entries. Implemented by [`X86Format`]; EPT and
/// IOMMU formats implement it too.
pub trait EntryFormat {
    /// Number of levels in a full walk (4 for IA-32e paging).
    fn levels(&self) -> u8;
    /// Whether `entry` at `level` is present (maps something).
    fn present(&self, entry: u64, level: u8) -> bool;
    /// Whether a present `entry` at `level` is a leaf (maps a page rather than a table).
    /// Returns `Err(())` if the entry claims to be a leaf at a level that cannot hold one.
    #[allow(clippy::result_unit_err)]
    fn leaf(&self, entry: u64, level: u8) -> Result<bool, ()>;
    /// The physical address of the next table held in a non-leaf `entry` (default: bits 51:12,
    /// the layout IA-32e paging and EPT share).
    fn table_address(&self, entry: u64, _level: u8) -> u64 {
        entry & flags::ADDR_MASK
    }
    /// The page base held in a leaf `entry` at `level` (default: bits 51:12 with the offset bits
    /// of a large page cleared — bit 12 of a 2 MiB/1 GiB leaf is PAT, not address).
    fn page_address(&self, entry: u64, level: u8) -> u64 {
        let size_mask = PageSize::from_level(level).map_or(0xfff, |s| s.bytes() - 1);
        entry & flags::ADDR_MASK & !size_mask
    }
    /// Whether a present `entry` at `level` has reserved bits set (a #PF with RSVD for guest
    /// paging, an EPT misconfiguration for EPT). No reserved bits unless a format says so.
    fn reserved(&self, _entry: u64, _level: u8) -> bool {
        false
    }
}

/// The IA-32e 4-level format: PS allowed at levels 2 and 3.
#[derive(Clone, Copy, Debug, Default)]
pub struct X86Format;

impl EntryFormat for X86Format {
    fn levels(&self) -> u8 {
        4
    }
    fn present(&self, entry: u64, _level: u8) -> bool {
        entry & flags::PRESENT != 0
    }
    fn leaf(&self, entry: u64, level: u8) -> Result<bool, ()> {
        match level {
            1 => Ok(true),
            2 | 3 => Ok(entry & flags::PAGE_SIZE != 0),
            _ if entry & flags::PAGE_SIZE != 0 => Err(()),
            _ => Ok(false),
        }
    }
}

/// One entry read during a walk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalkStep {
    /// Level of the entry (4 = PML4 … 1 = PT).
    pub level: u8,
    /// Guest physical address of the entry.
    pub entry_gpa: u64,
    /// The entry's value.
    pub entry: u64,
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The translated physical address.
    pub gpa: u64,
    /// Size of the page that maps it.
    pub page_size: PageSize,
    /// Entries read, root first (`steps[..depth]`).
    pub steps: [WalkStep; 5],
    /// How many entries were read.
    pub depth: u8,
}

impl Translation {
    /// The entries read, root first.
    pub fn entries(&self) -> &[WalkStep] {
        &self.steps[..self.depth as usize]
    }

    /// The leaf entry.
    pub fn leaf(&self) -> WalkStep {
        self.steps[self.depth as usize - 1]
    }
}

/// Index into the table at `level` (9 bits per level, starting at bit 12).
pub const fn table_index(va: u64, level: u8) -> u64 {
    (va >> (12 + 9 * (level as u64 - 1))) & 0x1ff
}

/// Reads (and, for accessed/dirty updates, writes) 64-bit table entries at physical addresses.
///
/// [`PhysReader`] reads plain memory; the two-dimensional walk implements it by translating every
/// table address through EPT first. `level` is the paging level of the entry (for bookkeeping).
pub trait TableReader {
    /// Why an entry could not be read or written.
    type Error;
    /// Read the entry at physical address `addr`.
    fn read_entry(&mut self, addr: u64, level: u8) -> Result<u64, Self::Error>;
    /// Write `value` to the entry at `addr` (only ever an entry read just before).
    fn write_entry(&mut self, addr: u64, level: u8, value: u64) -> Result<(), Self::Error>;
}

/// A [`TableReader`] over memory addressed by physical address (guest memory for guest tables,
/// host memory for EPT tables).
#[derive(Clone, Copy, Debug)]
pub struct PhysReader<'a, M: ?Sized>(pub &'a M);

impl<M: GuestMemory + ?Sized> TableReader for PhysReader<'_, M> {
    type Error = PagingError;
    fn read_entry(&mut self, addr: u64, _level: u8) -> Result<u64, PagingError> {
        self.0
            .read_obj(GuestAddress(addr))
            .map_err(|source| PagingError::Memory { gpa: addr, source })
    }
    fn write_entry(&mut self, addr: u64, _level: u8, value: u64) -> Result<(), PagingError> {
        self.0
            .write_obj(value, GuestAddress(addr))
            .map_err(|source| PagingError::Memory { gpa: addr, source })
    }
}

/// How a [`walk_core`] walk ended; the entry concerned is the last of [`Walk::entries`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkEnd {
    /// A leaf mapping a page of `size` at `base`.
    Leaf {
        /// Page base address.
        base: u64,
        /// Page size.
        size: PageSize,
    },
    /// A non-present entry.
    NotPresent,
    /// A present entry with reserved bits set (the format's [`EntryFormat::reserved`]).
    Reserved,
    /// A leaf at a level that cannot hold one.
    BadLeaf,
}

/// The entries a [`walk_core`] walk read and how it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// Entries read, root first (`steps[..depth]`).
    pub steps: [WalkStep; 5],
    /// How many entries were read.
    pub depth: u8,
    /// How the walk ended.
    pub end: WalkEnd,
}

impl Walk {
    /// The entries read, root first.
    pub fn entries(&self) -> &[WalkStep] {
        &self.steps[..self.depth as usize]
    }

    /// The level of the last entry read (the leaf, or the entry that stopped the walk).
    pub fn last_level(&self) -> u8 {
        self.depth
            .checked_sub(1)
            .map_or(0, |i| self.steps[i as usize].level)
    }
}

/// The shared radix-walk core: read one entry per level from `root` down, classify it with
/// `format`, stop at a leaf, a non-present or reserved entry. It reads at most `format.levels()`
/// (capped at 5) entries, so no table contents (cycles included) can make it loop.
pub fn walk_core<R, F>(reader: &mut R, format: &F, root: u64, va: u64) -> Result<Walk, R::Error>
where
    R: TableReader + ?Sized,
    F: EntryFormat + ?Sized,
{
    let mut w = Walk {
        steps: [WalkStep::default(); 5],
        depth: 0,
        end: WalkEnd::BadLeaf,
    };
    let mut table = root & flags::ADDR_MASK;
    for level in (1..=format.levels().min(5)).rev() {
        let entry_gpa = table + table_index(va, level) * 8;
        let entry = reader.read_entry(entry_gpa, level)?;
        w.steps[w.depth as usize] = WalkStep {
            level,
            entry_gpa,
            entry,
        };
        w.depth += 1;
        if !format.present(entry, level) {
            w.end = WalkEnd::NotPresent;
            return Ok(w);
        }
        if format.reserved(entry, level) {
            w.end = WalkEnd::Reserved;
            return Ok(w);
        }
        match format.leaf(entry, level) {
            Err(()) => return Ok(w),
            Ok(true) => {
                if let Some(size) = PageSize::from_level(level) {
                    w.end = WalkEnd::Leaf {
                        base: format.page_address(entry, level),
                        size,
                    };
                }
                return Ok(w);
            }
            Ok(false) => table = format.table_address(entry, level),
        }
    }
    // A format whose level-1 entries are not leaves: a malformed leaf (end stays BadLeaf).
    Ok(w)
}

/// Walk the radix tree rooted at `root` for `va`, reading entries from `mem` (no permission
/// checks). The walk reads at most `format.levels()` entries, so no table contents (cycles
/// included) can make it loop.
pub fn radix_walk<M, F>(mem: &M, format: &F, root: u64, va: u64) -> Result<Translation, PagingError>
where
    M: GuestMemory + ?Sized,
    F: EntryFormat + ?Sized,
{
    let w = walk_core(&mut PhysReader(mem), format, root, va)?;
    let level = w.last_level();
    let mut t = Translation {
        gpa: 0,
        page_size: PageSize::Size4K,
        steps: w.steps,
        depth: w.depth,
    };
    match w.end {
        WalkEnd::Leaf { base, size } => {
            t.page_size = size;
            t.gpa = base | (va & (size.bytes() - 1));
            Ok(t)
        }
        WalkEnd::NotPresent => Err(PagingError::NotPresent { va, level }),
        WalkEnd::Reserved | WalkEnd::BadLeaf => Err(PagingError::BadLeaf { va, level }),
    }
}

fn is_canonical_48(va: u64) -> bool {
    let top = (va as i64) >> 47;
    top == 0 || top == -1
}

/// Translate `va` through 4-level IA-32e tables rooted at `cr3` (no permission checks).
pub fn translate<M: GuestMemory + ?Sized>(
    mem: &M,
    cr3: u64,
    va: u64,
) -> Result<Translation, PagingError> {
    if !is_canonical_48(va) {
        return Err(PagingError::NonCanonical(va));
    }
    radix_walk(mem, &X86Format, cr3, va)
}

/// A bump allocator of zeroed 4 KiB table pages in a caller-chosen area, shared by the page-table
/// builders (IA-32e and EPT).
#[derive(Clone, Copy, Debug)]
pub(crate) struct TableArea {
    next: u64,
    end: u64,
}

impl TableArea {
    /// The area `start..start + size`; `start` must be 4 KiB aligned.
    pub(crate) fn new(start: u64, size: u64) -> Result<Self, PagingError> {
        if !start.is_multiple_of(0x1000) {
            return Err(PagingError::Misaligned {
                what: "table area",
                value: start,
                align: 0x1000,
            });
        }
        Ok(Self {
            next: start,
            end: start.saturating_add(size),
        })
    }

    /// The next free address (the end of what was allocated).
    pub(crate) fn next(&self) -> u64 {
        self.next
    }

    /// Allocate one page and zero it in `mem`.
    pub(crate) fn alloc<M: GuestMemory + ?Sized>(&mut self, mem: &M) -> Result<u64, PagingError> {
        if self.next.checked_add(0x1000).is_none_or(|e| e > self.end) {
            return Err(PagingError::OutOfTableSpace);
        }
        let gpa = self.next;
        mem.write_slice(&[0u8; 0x1000], GuestAddress(gpa))
            .map_err(|source| PagingError::Memory { gpa, source })?;
        self.next += 0x1000;
        Ok(gpa)
    }
}

/// Writes IA-32e 4-level page tables into guest memory, allocating table pages from a
/// caller-chosen area (a bump allocator; pages are zeroed when allocated).
pub struct PageTableBuilder<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    root: u64,
    area: TableArea,
}

impl<'m, M: GuestMemory + ?Sized> PageTableBuilder<'m, M> {
    /// Start a new set of tables in `area_start..area_start + area_size`; the PML4 is the first
    /// page of the area.
    pub fn new(mem: &'m M, area_start: u64, area_size: u64) -> Result<Self, PagingError> {
        let mut area = TableArea::new(area_start, area_size)?;
        let root = area.alloc(mem)?;
        Ok(Self { mem, root, area })
    }

    /// The value to load into CR3 (the PML4's address; PCD/PWT clear).
    pub fn cr3(&self) -> u64 {
        self.root
    }

    /// Bytes of the table area used so far, counting from the PML4.
    pub fn used(&self) -> u64 {
        self.area.next() - self.root
    }

    fn read(&self, gpa: u64) -> Result<u64, PagingError> {
        self.mem
            .read_obj(GuestAddress(gpa))
            .map_err(|source| PagingError::Memory { gpa, source })
    }

    fn write(&self, gpa: u64, v: u64) -> Result<(), PagingError> {
        self.mem
            .write_obj(v, GuestAddress(gpa))
            .map_err(|source| PagingError::Memory { gpa, source })
    }

    /// Map one page: `va` → `pa` with `flags` (PRESENT is added; PS is set for large pages).
    /// Intermediate tables get PRESENT | WRITABLE | USER so the leaf decides permissions.
    pub fn map(&mut self, va: u64, pa: u64, size: PageSize, flags: u64) -> Result<(), PagingError> {
        let align = size.bytes();
        if !va.is_multiple_of(align) {
            return Err(PagingError::Misaligned {
                what: "virtual address",
                value: va,
                align,
            });
        }
        if !pa.is_multiple_of(align) {
            return Err(PagingError::Misaligned {
                what: "physical address",
                value: pa,
                align,
            });
        }
        if !is_canonical_48(va) {
            return Err(PagingError::NonCanonical(va));
        }
        let mut table = self.root;
        for level in (size.level() + 1..=4).rev() {
            let slot = table + table_index(va, level) * 8;
            let e = self.read(slot)?;
            table = if e & flags::PRESENT == 0 {
                let t = self.area.alloc(self.mem)?;
                self.write(slot, t | flags::PRESENT | flags::WRITABLE | flags::USER)?;
                t
            } else if e & flags::PAGE_SIZE != 0 {
                return Err(PagingError::AlreadyMapped(va));
            } else {
                e & flags::ADDR_MASK
            };
        }
        let slot = table + table_index(va, size.level()) * 8;
        if self.read(slot)? & flags::PRESENT != 0 {
            return Err(PagingError::AlreadyMapped(va));
        }
        let ps = if size == PageSize::Size4K {
            0
        } else {
            flags::PAGE_SIZE
        };
        self.write(slot, pa | flags | flags::PRESENT | ps)
    }

    /// Identity-map `start..start + len` with pages of `size` (both must be `size`-aligned).
    pub fn identity_map(
        &mut self,
        start: u64,
        len: u64,
        size: PageSize,
        flags: u64,
    ) -> Result<(), PagingError> {
        if !len.is_multiple_of(size.bytes()) {
            return Err(PagingError::Misaligned {
                what: "length",
                value: len,
                align: size.bytes(),
            });
        }
        let mut a = start;
        while a < start + len {
            self.map(a, a, size, flags)?;
            a += size.bytes();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn builder_rejects_bad_input() {
        let m = mem();
        assert!(matches!(
            PageTableBuilder::new(&m, 0x1001, 0x1000),
            Err(PagingError::Misaligned { .. })
        ));
        let mut b = PageTableBuilder::new(&m, 0x1000, 0x3000).unwrap();
        assert!(matches!(
            b.map(0x1000, 0, PageSize::Size2M, 0),
            Err(PagingError::Misaligned { .. })
        ));
        assert!(matches!(
            b.map(0x0000_8000_0000_0000, 0, PageSize::Size4K, 0),
            Err(PagingError::NonCanonical(_))
        ));
        b.map(0, 0, PageSize::Size4K, 0).unwrap_err(); // needs PDPT + PD + PT: only 2 pages left
        let mut b = PageTableBuilder::new(&m, 0x1000, 0x10000).unwrap();
        b.map(0, 0, PageSize::Size2M, 0).unwrap();
        assert!(matches!(
            b.map(0x1000, 0, PageSize::Size4K, 0),
            Err(PagingError::AlreadyMapped(_))
        ));
        assert!(matches!(
            b.map(0, 0, PageSize::Size2M, 0),
            Err(PagingError::AlreadyMapped(_))
        ));
        // Tables outside guest memory.
        assert!(matches!(
            PageTableBuilder::new(&m, 1 << 40, 0x10000),
            Err(PagingError::Memory { .. })
        ));
    }

    #[test]
    fn walk_bad_tables_terminates_with_errors() {
        let m = mem();
        // A PML4 whose entry 0 points at itself: a cycle. The walk is bounded by the level count.
        m.write_obj(0x1000u64 | flags::PRESENT, GuestAddress(0x1000))
            .unwrap();
        // (A self-reference is legal — "recursive mapping" — and resolves to the table itself.)
        let t = translate(&m, 0x1000, 0x0).unwrap();
        assert_eq!((t.gpa, t.depth), (0x1000, 4));
        // PS set in a PML4 entry.
        m.write_obj(
            0x2000u64 | flags::PRESENT | flags::PAGE_SIZE,
            GuestAddress(0x3000),
        )
        .unwrap();
        assert!(matches!(
            translate(&m, 0x3000, 0),
            Err(PagingError::BadLeaf { level: 4, .. })
        ));
        // An entry pointing outside guest memory.
        m.write_obj((1u64 << 40) | flags::PRESENT, GuestAddress(0x4000))
            .unwrap();
        assert!(matches!(
            translate(&m, 0x4000, 0),
            Err(PagingError::Memory { .. })
        ));
        // Non-canonical address.
        assert!(matches!(
            translate(&m, 0x4000, 1 << 47),
            Err(PagingError::NonCanonical(_))
        ));
    }

    #[derive(Debug, Clone)]
    struct MapOp {
        va_page: u64,
        pa_page: u64,
        size: PageSize,
    }

    fn map_op() -> impl Strategy<Value = MapOp> {
        (0u64..1 << 20, 0u64..1 << 16, 0u8..3).prop_map(|(v, p, s)| {
            let size = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G][s as usize];
            MapOp {
                va_page: v,
                pa_page: p,
                size,
            }
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn every_mapped_address_walks_to_its_gpa(
            ops in proptest::collection::vec(map_op(), 1..40),
            probes in proptest::collection::vec(any::<u64>(), 100),
        ) {
            let m = mem();
            let mut b = PageTableBuilder::new(&m, 0x10_0000, 0x100_0000).unwrap();
            // Model: va page base -> (pa base, size)
            let mut model: BTreeMap<u64, (u64, PageSize)> = BTreeMap::new();
            for op in &ops {
                let sz = op.size.bytes();
                let va = (op.va_page << 12) / sz * sz;
                let pa = (op.pa_page << 12) / sz * sz;
                let overlaps = model.iter().any(|(&v, &(_, s))| va < v + s.bytes() && v < va + sz);
                let r = b.map(va, pa, op.size, flags::WRITABLE);
                if overlaps {
                    prop_assert!(r.is_err());
                } else if r.is_ok() {
                    model.insert(va, (pa, op.size));
                }
            }
            let mut addrs: Vec<u64> = probes.iter().map(|p| p & ((1 << 47) - 1)).collect();
            for (&v, &(_, s)) in &model {
                addrs.push(v);
                addrs.push(v + s.bytes() - 1);
                addrs.push(v + (probes[0] % s.bytes()));
            }
            for va in addrs {
                let hit = model.range(..=va).next_back().filter(|(v, (_, s))| va < *v + s.bytes());
                match (hit, translate(&m, b.cr3(), va)) {
                    (Some((v, (pa, s))), Ok(t)) => {
                        prop_assert_eq!(t.gpa, pa + (va - v));
                        prop_assert_eq!(t.page_size, *s);
                    }
                    (None, Err(PagingError::NotPresent { .. })) => {}
                    (h, r) => prop_assert!(false, "va {:#x}: model {:?} walker {:?}", va, h, r),
                }
            }
        }
    }
}
