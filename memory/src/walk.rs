//! The guest page walker with permissions (Intel SDM vol. 3A ch. 4): 4-level and 5-level (LA57)
//! IA-32e paging, 4 KiB / 2 MiB / 1 GiB pages, access rights (§4.6: R/W, U/S, XD, CR0.WP,
//! CR4.SMEP/SMAP with EFLAGS.AC, EFER.NXE, protection keys), reserved bits per MAXPHYADDR
//! (§4.5.4), the exact #PF error code (§4.7) and optional accessed/dirty updates (§4.8).
//!
//! The walk runs over any [`TableReader`]: [`PhysReader`] for guest memory, or the EPT-translating
//! reader of [`nested`](crate::nested) for the two-dimensional walk.
//!
//! ```
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmkit_memory::paging::{PageSize, PageTableBuilder, flags};
//! use vmkit_memory::walk::{self, Access, PagingMode, pfec};
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
//! let mut pt = PageTableBuilder::new(&mem, 0x1000, 0x8000).unwrap();
//! pt.map(0x40_0000, 0x20_0000, PageSize::Size4K, flags::USER).unwrap(); // user, read-only
//! let mode = PagingMode::default(); // CR0.WP = 1, EFER.NXE = 1, 4-level
//!
//! let ok = walk::walk_guest(&mem, &mode, pt.cr3(), 0x40_0010, Access::read().user()).unwrap();
//! assert_eq!(ok.gpa, 0x20_0010);
//! // A user write to a read-only page: #PF with P | W/R | U/S, CR2 = the address.
//! let pf = walk::walk_guest(&mem, &mode, pt.cr3(), 0x40_0010, Access::write().user())
//!     .unwrap_err()
//!     .page_fault()
//!     .unwrap();
//! assert_eq!(pf.error_code, pfec::P | pfec::WR | pfec::US);
//! assert_eq!(pf.cr2, 0x40_0010);
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::GuestMemory;

use crate::paging::{
    EntryFormat, PageSize, PagingError, PhysReader, TableReader, WalkEnd, WalkStep, flags,
    walk_core,
};

/// #PF error-code bits (SDM vol. 3A §4.7, figure 4-12).
pub mod pfec {
    /// P: 0 = non-present page, 1 = protection violation (or reserved bit).
    pub const P: u32 = 1 << 0;
    /// W/R: the access was a write.
    pub const WR: u32 = 1 << 1;
    /// U/S: the access was a user-mode access.
    pub const US: u32 = 1 << 2;
    /// RSVD: a reserved bit was set in some paging-structure entry.
    pub const RSVD: u32 = 1 << 3;
    /// I/D: the access was an instruction fetch (only with EFER.NXE or CR4.SMEP set).
    pub const ID: u32 = 1 << 4;
    /// PK: a protection-key violation.
    pub const PK: u32 = 1 << 5;
}

/// Control-register state that shapes a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagingMode {
    /// CR4.LA57: 5-level paging (57-bit linear addresses).
    pub la57: bool,
    /// CR0.WP: supervisor writes honour R/W.
    pub wp: bool,
    /// CR4.SMEP: supervisor fetches from user pages fault.
    pub smep: bool,
    /// CR4.SMAP: supervisor data accesses to user pages fault (unless EFLAGS.AC for explicit ones).
    pub smap: bool,
    /// IA32_EFER.NXE: XD (bit 63) is honoured (otherwise it is reserved).
    pub nxe: bool,
    /// CR4.PKE: protection keys for user-mode pages.
    pub pke: bool,
    /// The PKRU register (AD/WD bit pairs per key).
    pub pkru: u32,
    /// CR4.PCIDE: CR3 bits 11:0 are a PCID.
    pub pcide: bool,
    /// 1 GiB pages are supported (CPUID.80000001H:EDX.Page1GB); otherwise a PDPTE with PS is
    /// reserved.
    pub gbpages: bool,
    /// MAXPHYADDR (CPUID.80000008H:EAX bits 7:0): entry bits 51:MAXPHYADDR are reserved.
    pub maxphyaddr: u8,
    /// Set accessed flags (and dirty on writes) in the entries of successful walks.
    pub update_ad: bool,
}

impl Default for PagingMode {
    /// 4-level paging, WP and NXE on, SMEP/SMAP/PKE/PCIDE off, 1 GiB pages, MAXPHYADDR 46.
    fn default() -> Self {
        Self {
            la57: false,
            wp: true,
            smep: false,
            smap: false,
            nxe: true,
            pke: false,
            pkru: 0,
            pcide: false,
            gbpages: true,
            maxphyaddr: 46,
            update_ad: false,
        }
    }
}

/// CR0.WP.
pub const CR0_WP: u64 = 1 << 16;
/// CR4.PCIDE.
pub const CR4_PCIDE: u64 = 1 << 17;
/// CR4.SMEP.
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4.SMAP.
pub const CR4_SMAP: u64 = 1 << 21;
/// CR4.PKE.
pub const CR4_PKE: u64 = 1 << 22;
/// CR4.LA57.
pub const CR4_LA57: u64 = 1 << 12;
/// IA32_EFER.NXE.
pub const EFER_NXE: u64 = 1 << 11;

impl PagingMode {
    /// The mode IA-32e paging has with these register values (PKRU 0, no A/D updates).
    pub fn from_registers(cr0: u64, cr4: u64, efer: u64, maxphyaddr: u8) -> Self {
        Self {
            la57: cr4 & CR4_LA57 != 0,
            wp: cr0 & CR0_WP != 0,
            smep: cr4 & CR4_SMEP != 0,
            smap: cr4 & CR4_SMAP != 0,
            nxe: efer & EFER_NXE != 0,
            pke: cr4 & CR4_PKE != 0,
            pcide: cr4 & CR4_PCIDE != 0,
            maxphyaddr,
            ..Self::default()
        }
    }

    /// Number of paging levels (4 or 5).
    pub fn levels(&self) -> u8 {
        if self.la57 { 5 } else { 4 }
    }

    /// Whether `va` is canonical (bits 63:47, or 63:56 with LA57, all equal).
    pub fn is_canonical(&self, va: u64) -> bool {
        let shift = if self.la57 { 56 } else { 47 };
        let top = (va as i64) >> shift;
        top == 0 || top == -1
    }

    fn phys_reserved(&self) -> u64 {
        let bits = self.maxphyaddr.clamp(32, 52);
        ((1u64 << 52) - 1) & !((1u64 << bits) - 1)
    }
}

/// The IA-32e entry format under a [`PagingMode`], with reserved-bit checks (SDM §4.5.4).
impl EntryFormat for PagingMode {
    fn levels(&self) -> u8 {
        PagingMode::levels(self)
    }
    fn present(&self, entry: u64, _level: u8) -> bool {
        entry & flags::PRESENT != 0
    }
    fn leaf(&self, entry: u64, level: u8) -> Result<bool, ()> {
        Ok(level == 1 || (matches!(level, 2 | 3) && entry & flags::PAGE_SIZE != 0))
    }
    fn reserved(&self, entry: u64, level: u8) -> bool {
        let mut rsvd = self.phys_reserved();
        if !self.nxe {
            rsvd |= flags::NO_EXECUTE;
        }
        let ps = entry & flags::PAGE_SIZE != 0;
        match level {
            4 | 5 => rsvd |= flags::PAGE_SIZE,
            3 if ps => {
                if !self.gbpages {
                    return true;
                }
                rsvd |= 0x3FFF_E000; // bits 29:13
            }
            2 if ps => rsvd |= 0x1F_E000, // bits 20:13
            _ => {}
        }
        entry & rsvd != 0
    }
}

/// The kind of a memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AccessKind {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

/// One access to translate: kind, privilege and EFLAGS.AC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Access {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// CPL = 3 (a user-mode access, unless `implicit`).
    pub user: bool,
    /// An implicit supervisor-mode access (GDT/IDT/TSS reads …): supervisor at any CPL, and SMAP
    /// applies regardless of EFLAGS.AC.
    pub implicit: bool,
    /// EFLAGS.AC (lets explicit supervisor accesses reach user pages under SMAP).
    pub ac: bool,
}

impl Access {
    /// A supervisor-mode access of `kind`.
    pub const fn new(kind: AccessKind) -> Self {
        Self {
            kind,
            user: false,
            implicit: false,
            ac: false,
        }
    }
    /// A supervisor read.
    pub const fn read() -> Self {
        Self::new(AccessKind::Read)
    }
    /// A supervisor write.
    pub const fn write() -> Self {
        Self::new(AccessKind::Write)
    }
    /// A supervisor instruction fetch.
    pub const fn fetch() -> Self {
        Self::new(AccessKind::Fetch)
    }
    /// The same access made at CPL 3.
    pub const fn user(mut self) -> Self {
        self.user = true;
        self
    }
    /// The same access as an implicit supervisor access.
    pub const fn implicit(mut self) -> Self {
        self.implicit = true;
        self
    }
    /// The same access with EFLAGS.AC = 1.
    pub const fn with_ac(mut self) -> Self {
        self.ac = true;
        self
    }
    /// Whether this is a user-mode access (CPL 3 and not implicit).
    pub const fn is_user_mode(&self) -> bool {
        self.user && !self.implicit
    }
    /// The W/R, U/S and I/D bits of a #PF error code for this access under `mode`.
    pub fn error_code_bits(&self, mode: &PagingMode) -> u32 {
        let mut ec = 0;
        if self.kind == AccessKind::Write {
            ec |= pfec::WR;
        }
        if self.is_user_mode() {
            ec |= pfec::US;
        }
        if self.kind == AccessKind::Fetch && (mode.nxe || mode.smep) {
            ec |= pfec::ID;
        }
        ec
    }
}

/// A page fault: the error code pushed and the CR2 value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PageFault {
    /// The error code ([`pfec`] bits).
    pub error_code: u32,
    /// CR2: the faulting linear address.
    pub cr2: u64,
}

/// Effective access rights of a translation (combined over all levels, SDM §4.6.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Perms {
    /// R/W = 1 at every level.
    pub writable: bool,
    /// U/S = 1 at every level (a user-mode address).
    pub user: bool,
    /// Executable: XD = 0 at every level, or EFER.NXE = 0.
    pub executable: bool,
    /// The leaf's protection key (bits 62:59; meaningful with CR4.PKE).
    pub pkey: u8,
    /// G: the leaf is global.
    pub global: bool,
}

impl Perms {
    /// Combine the entries of a walk (root first; the last is the leaf).
    pub fn from_entries(steps: &[WalkStep], mode: &PagingMode) -> Self {
        let mut p = Perms {
            writable: true,
            user: true,
            executable: true,
            pkey: 0,
            global: false,
        };
        for s in steps {
            p.writable &= s.entry & flags::WRITABLE != 0;
            p.user &= s.entry & flags::USER != 0;
            if mode.nxe {
                p.executable &= s.entry & flags::NO_EXECUTE == 0;
            }
        }
        if let Some(leaf) = steps.last() {
            p.pkey = ((leaf.entry >> 59) & 0xf) as u8;
            p.global = leaf.entry & flags::GLOBAL != 0;
        }
        p
    }

    /// Check `access` against these rights under `mode` (SDM §4.6.1, §4.6.2). On denial, returns
    /// the #PF error code (P set).
    pub fn check(&self, access: Access, mode: &PagingMode) -> Result<(), u32> {
        let ec = access.error_code_bits(mode) | pfec::P;
        let user_mode = access.is_user_mode();
        // SMAP blocks supervisor data accesses to user pages, unless explicit with AC = 1.
        let smap_blocks = self.user && mode.smap && (access.implicit || !access.ac);
        let ok = match (access.kind, user_mode) {
            (AccessKind::Read, true) => self.user,
            (AccessKind::Write, true) => self.user && self.writable,
            (AccessKind::Fetch, true) => self.user && self.executable,
            (AccessKind::Read, false) => !smap_blocks,
            (AccessKind::Write, false) => !smap_blocks && (self.writable || !mode.wp),
            (AccessKind::Fetch, false) => self.executable && !(self.user && mode.smep),
        };
        if !ok {
            return Err(ec);
        }
        // Protection keys (§4.6.2): data accesses to user-mode addresses.
        if mode.pke && self.user && access.kind != AccessKind::Fetch {
            let bits = mode.pkru >> (2 * u32::from(self.pkey & 0xf));
            let ad = bits & 1 != 0;
            let wd = bits & 2 != 0;
            if ad || (access.kind == AccessKind::Write && wd && (user_mode || mode.wp)) {
                return Err(ec | pfec::PK);
            }
        }
        Ok(())
    }
}

/// A successful guest walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestWalk {
    /// The guest-physical address.
    pub gpa: u64,
    /// The page size of the leaf.
    pub page_size: PageSize,
    /// Effective access rights.
    pub perms: Perms,
    /// Entries read, root first (`steps[..depth]`); values as read (before any A/D update).
    pub steps: [WalkStep; 5],
    /// How many entries were read.
    pub depth: u8,
}

impl GuestWalk {
    /// The entries read, root first.
    pub fn entries(&self) -> &[WalkStep] {
        &self.steps[..self.depth as usize]
    }
}

/// Why a guest walk did not produce an address.
#[derive(Debug, Error)]
pub enum WalkError<E> {
    /// The access faults: inject #PF.
    #[error("page fault (error code {:#x}) at {:#x}", .0.error_code, .0.cr2)]
    PageFault(PageFault),
    /// The address is not canonical (a #GP, not a #PF).
    #[error("address {0:#x} is not canonical")]
    NonCanonical(u64),
    /// CR3 has bits set above MAXPHYADDR, or (without PCIDE) in bits 11:0 other than PWT/PCD.
    #[error("cr3 {0:#x} is not a valid table address")]
    BadCr3(u64),
    /// A table entry could not be read or written.
    #[error("page-table access failed")]
    Table(#[source] E),
}

impl<E> WalkError<E> {
    /// The page fault, if this is one.
    pub fn page_fault(&self) -> Option<PageFault> {
        match self {
            WalkError::PageFault(pf) => Some(*pf),
            _ => None,
        }
    }
}

/// CR3 bits that are not part of the table address: PWT (3), PCD (4).
const CR3_FLAGS: u64 = (1 << 3) | (1 << 4);

/// Check `cr3` and return the root table address.
pub fn cr3_root<E>(mode: &PagingMode, cr3: u64) -> Result<u64, WalkError<E>> {
    let mut bad = mode.phys_reserved() | (0xFFF0_0000_0000_0000);
    if !mode.pcide {
        bad |= 0xFFF & !CR3_FLAGS;
    }
    if cr3 & bad != 0 {
        return Err(WalkError::BadCr3(cr3));
    }
    Ok(cr3 & flags::ADDR_MASK)
}

/// Walk the guest tables rooted at `cr3` for `va` and check `access`, reading entries through
/// `reader`. With `mode.update_ad`, a successful walk sets A in every entry it used and D in the
/// leaf for writes.
pub fn walk<R>(
    reader: &mut R,
    mode: &PagingMode,
    cr3: u64,
    va: u64,
    access: Access,
) -> Result<GuestWalk, WalkError<R::Error>>
where
    R: TableReader + ?Sized,
{
    if !mode.is_canonical(va) {
        return Err(WalkError::NonCanonical(va));
    }
    let root = cr3_root(mode, cr3)?;
    let w = walk_core(reader, mode, root, va).map_err(WalkError::Table)?;
    let fault = |bits: u32| {
        WalkError::PageFault(PageFault {
            error_code: access.error_code_bits(mode) | bits,
            cr2: va,
        })
    };
    let (base, size) = match w.end {
        WalkEnd::Leaf { base, size } => (base, size),
        WalkEnd::NotPresent => return Err(fault(0)),
        WalkEnd::Reserved | WalkEnd::BadLeaf => return Err(fault(pfec::P | pfec::RSVD)),
    };
    let entries = w.entries();
    let perms = Perms::from_entries(entries, mode);
    perms.check(access, mode).map_err(|ec| {
        WalkError::PageFault(PageFault {
            error_code: ec,
            cr2: va,
        })
    })?;
    if mode.update_ad {
        let last = entries.len().saturating_sub(1);
        for (i, s) in entries.iter().enumerate() {
            let mut e = s.entry | flags::ACCESSED;
            if i == last && access.kind == AccessKind::Write {
                e |= flags::DIRTY;
            }
            if e != s.entry {
                reader
                    .write_entry(s.entry_gpa, s.level, e)
                    .map_err(WalkError::Table)?;
            }
        }
    }
    Ok(GuestWalk {
        gpa: base | (va & (size.bytes() - 1)),
        page_size: size,
        perms,
        steps: w.steps,
        depth: w.depth,
    })
}

/// [`walk`] over guest memory `mem` (guest-physical addresses read directly).
pub fn walk_guest<M: GuestMemory + ?Sized>(
    mem: &M,
    mode: &PagingMode,
    cr3: u64,
    va: u64,
    access: Access,
) -> Result<GuestWalk, WalkError<PagingError>> {
    walk(&mut PhysReader(mem), mode, cr3, va, access)
}
