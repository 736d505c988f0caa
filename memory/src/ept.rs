//! The EPT model (Intel SDM vol. 3C §29.3): EPTP, 4- or 5-level EPT tables with R/W/X (and
//! mode-based execute control for user-mode linear addresses), memory type and ignore-PAT, 2 MiB
//! and 1 GiB leaves, accessed/dirty flags; translation to a host-physical address, an
//! **EPT violation** with the architectural exit qualification (§28.2.1, table 28-7), or an
//! **EPT misconfiguration** (§29.3.3.1). [`EptBuilder`] writes tables into host memory.
//!
//! ```
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmkit_memory::PageSize;
//! use vmkit_memory::ept::{self, EptAccess, EptBuilder, EptConfig, EptFault, eptf, exit_qual};
//! use vmkit_memory::walk::AccessKind;
//!
//! let host = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
//! let mut b = EptBuilder::new(&host, 0x1000, 0x10000).unwrap();
//! // GPA 0..2 MiB -> HPA 2..4 MiB, read + execute, write-back.
//! b.map(0, 0x20_0000, PageSize::Size2M, eptf::READ | eptf::EXECUTE | eptf::MT_WB).unwrap();
//! let cfg = EptConfig::default();
//!
//! let t = ept::translate_phys(&host, &cfg, b.eptp(), 0x1234, EptAccess::new(AccessKind::Read))
//!     .unwrap();
//! assert_eq!(t.hpa, 0x20_1234);
//! // A write: EPT violation, qualification = write access | readable | executable.
//! let err = ept::translate_phys(&host, &cfg, b.eptp(), 0x1234, EptAccess::new(AccessKind::Write))
//!     .unwrap_err();
//! let Some(EptFault::Violation { qualification, .. }) = err.fault() else { panic!() };
//! assert_eq!(qualification, exit_qual::WRITE | exit_qual::READABLE | exit_qual::EXECUTABLE);
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::paging::{
    EntryFormat, PageSize, PagingError, PhysReader, TableArea, TableReader, WalkEnd, WalkStep,
    flags, table_index, walk_core,
};
use crate::walk::AccessKind;

/// EPT entry bits (SDM vol. 3C tables 29-1 … 29-6).
pub mod eptf {
    /// Bit 0: read access.
    pub const READ: u64 = 1 << 0;
    /// Bit 1: write access.
    pub const WRITE: u64 = 1 << 1;
    /// Bit 2: execute access (supervisor-mode linear addresses when mode-based control is on).
    pub const EXECUTE: u64 = 1 << 2;
    /// Bits 5:3 of a leaf: EPT memory type.
    pub const MEMORY_TYPE_MASK: u64 = 7 << 3;
    /// Memory type UC (0) in bits 5:3.
    pub const MT_UC: u64 = 0 << 3;
    /// Memory type WC (1).
    pub const MT_WC: u64 = 1 << 3;
    /// Memory type WT (4).
    pub const MT_WT: u64 = 4 << 3;
    /// Memory type WP (5).
    pub const MT_WP: u64 = 5 << 3;
    /// Memory type WB (6).
    pub const MT_WB: u64 = 6 << 3;
    /// Bit 6 of a leaf: ignore PAT memory type.
    pub const IGNORE_PAT: u64 = 1 << 6;
    /// Bit 7: a 2 MiB / 1 GiB leaf.
    pub const PAGE_SIZE: u64 = 1 << 7;
    /// Bit 8: accessed (when EPTP enables A/D).
    pub const ACCESSED: u64 = 1 << 8;
    /// Bit 9 of a leaf: dirty (when EPTP enables A/D).
    pub const DIRTY: u64 = 1 << 9;
    /// Bit 10: execute access for user-mode linear addresses (mode-based execute control).
    pub const USER_EXECUTE: u64 = 1 << 10;
    /// Bit 63: suppress #VE.
    pub const SUPPRESS_VE: u64 = 1 << 63;
    /// All access bits (read, write, execute).
    pub const RWX: u64 = READ | WRITE | EXECUTE;
}

/// EPT-violation exit-qualification bits (SDM vol. 3C §28.2.1, table 28-7).
pub mod exit_qual {
    /// Bit 0: the access was a data read.
    pub const READ: u64 = 1 << 0;
    /// Bit 1: the access was a data write.
    pub const WRITE: u64 = 1 << 1;
    /// Bit 2: the access was an instruction fetch.
    pub const FETCH: u64 = 1 << 2;
    /// Bit 3: the GPA was readable (AND of bit 0 over the entries used).
    pub const READABLE: u64 = 1 << 3;
    /// Bit 4: the GPA was writable (AND of bit 1).
    pub const WRITABLE: u64 = 1 << 4;
    /// Bit 5: the GPA was executable (AND of bit 2; supervisor-mode with MBEC).
    pub const EXECUTABLE: u64 = 1 << 5;
    /// Bit 6: the GPA was executable for user-mode linear addresses (AND of bit 10; MBEC only).
    pub const USER_EXECUTABLE: u64 = 1 << 6;
    /// Bit 7: the guest-linear-address field is valid.
    pub const GLA_VALID: u64 = 1 << 7;
    /// Bit 8 (with bit 7): 1 = access to the translated linear address, 0 = access to a guest
    /// paging-structure entry.
    pub const GLA_TRANSLATED: u64 = 1 << 8;
    /// Bit 9 (advanced information, bits 7 and 8 set): the linear address is user-mode.
    pub const USER_LINEAR: u64 = 1 << 9;
    /// Bit 10 (advanced information): the linear address is writable.
    pub const WRITABLE_LINEAR: u64 = 1 << 10;
    /// Bit 11 (advanced information): the linear address is execute-disabled.
    pub const XD_LINEAR: u64 = 1 << 11;
}

/// EPTP bits 2:0: memory type for the paging structures (0 = UC, 6 = WB).
pub const EPTP_MT_WB: u64 = 6;
/// EPTP bit 6: enable accessed and dirty flags.
pub const EPTP_AD: u64 = 1 << 6;

/// Build an EPTP: root table address, walk length (4 or 5), A/D enable; memory type WB.
pub const fn eptp(root: u64, levels: u8, ad: bool) -> u64 {
    root | (((levels as u64).wrapping_sub(1) & 7) << 3) | EPTP_MT_WB | if ad { EPTP_AD } else { 0 }
}

/// Processor capabilities the EPT model follows (IA32_VMX_EPT_VPID_CAP and controls).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EptConfig {
    /// Mode-based execute control (bit 2 = supervisor execute, bit 10 = user execute).
    pub mbec: bool,
    /// Execute-only translations are supported (otherwise bits 2:0 = 100b misconfigure).
    pub execute_only: bool,
    /// MAXPHYADDR: bits 51:MAXPHYADDR of entries are reserved.
    pub maxphyaddr: u8,
}

impl Default for EptConfig {
    /// No MBEC, execute-only supported, MAXPHYADDR 46.
    fn default() -> Self {
        Self {
            mbec: false,
            execute_only: true,
            maxphyaddr: 46,
        }
    }
}

/// The EPT entry format for a config and walk length.
#[derive(Clone, Copy, Debug)]
pub struct EptFormat {
    /// The config.
    pub config: EptConfig,
    /// Walk length (4 or 5).
    pub levels: u8,
}

impl EntryFormat for EptFormat {
    fn levels(&self) -> u8 {
        self.levels
    }
    fn present(&self, entry: u64, _level: u8) -> bool {
        entry & eptf::RWX != 0 || (self.config.mbec && entry & eptf::USER_EXECUTE != 0)
    }
    fn leaf(&self, entry: u64, level: u8) -> Result<bool, ()> {
        Ok(level == 1 || (matches!(level, 2 | 3) && entry & eptf::PAGE_SIZE != 0))
    }
    /// Misconfiguration (§29.3.3.1): write without read, unsupported execute-only, reserved
    /// bits, reserved memory types (2, 3, 7) in a leaf.
    fn reserved(&self, entry: u64, level: u8) -> bool {
        let rwx = entry & eptf::RWX;
        if entry & eptf::WRITE != 0 && entry & eptf::READ == 0 {
            return true;
        }
        if rwx == eptf::EXECUTE && !self.config.execute_only {
            return true;
        }
        let bits = self.config.maxphyaddr.clamp(32, 52);
        let mut rsvd = ((1u64 << 52) - 1) & !((1u64 << bits) - 1);
        let leaf = level == 1 || (matches!(level, 2 | 3) && entry & eptf::PAGE_SIZE != 0);
        if level >= 4 || !leaf {
            rsvd |= 0xF8; // bits 7:3 (PS included at levels 4 and 5)
        } else {
            let mt = (entry & eptf::MEMORY_TYPE_MASK) >> 3;
            if matches!(mt, 2 | 3 | 7) {
                return true;
            }
            match level {
                3 => rsvd |= 0x3FFF_F000, // bits 29:12
                2 => rsvd |= 0x1F_F000,   // bits 20:12
                _ => {}
            }
        }
        entry & rsvd != 0
    }
}

/// Information about the guest-linear address behind an access, for the exit qualification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearInfo {
    /// The guest-linear address.
    pub gla: u64,
    /// The access is to the translated linear address (not to a guest paging-structure entry).
    pub translated: bool,
    /// The linear address is a user-mode address (U/S = 1 at every guest level).
    pub user: bool,
    /// The linear address is writable (R/W = 1 at every guest level).
    pub writable: bool,
    /// The linear address is execute-disabled.
    pub xd: bool,
}

/// An access to translate through EPT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EptAccess {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// The guest-linear address behind it, if any (bit 7 of the qualification).
    pub linear: Option<LinearInfo>,
}

impl EptAccess {
    /// An access with no guest-linear address (e.g. a device or the VMM).
    pub const fn new(kind: AccessKind) -> Self {
        Self { kind, linear: None }
    }
}

/// Why EPT did not translate a guest-physical address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EptFault {
    /// EPT violation (exit reason 48).
    Violation {
        /// The guest-physical address.
        gpa: u64,
        /// The guest-linear address, if the qualification says it is valid.
        gla: Option<u64>,
        /// The exit qualification ([`exit_qual`] bits).
        qualification: u64,
    },
    /// EPT misconfiguration (exit reason 49).
    Misconfig {
        /// The guest-physical address.
        gpa: u64,
        /// Level of the misconfigured entry.
        level: u8,
    },
}

impl EptFault {
    /// The guest-physical address of the faulting access.
    pub fn gpa(&self) -> u64 {
        match *self {
            EptFault::Violation { gpa, .. } | EptFault::Misconfig { gpa, .. } => gpa,
        }
    }
}

/// Errors from an EPT translation.
#[derive(Debug, Error)]
pub enum EptError<E> {
    /// A VM exit: violation or misconfiguration.
    #[error("EPT fault: {0:?}")]
    Fault(EptFault),
    /// The EPTP is invalid (VM entry would fail): bad memory type, walk length or address bits.
    #[error("invalid EPTP {0:#x}")]
    BadEptp(u64),
    /// An EPT entry could not be read or written (host memory).
    #[error("EPT table access failed")]
    Table(#[source] E),
}

impl<E> EptError<E> {
    /// The fault, if this is one.
    pub fn fault(&self) -> Option<EptFault> {
        match self {
            EptError::Fault(f) => Some(*f),
            _ => None,
        }
    }
}

/// A successful EPT translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EptTranslation {
    /// The host-physical address.
    pub hpa: u64,
    /// The leaf's page size.
    pub page_size: PageSize,
    /// Combined R/W/X (+ user execute) rights over all levels ([`eptf`] bits).
    pub rights: u64,
    /// The leaf's memory type (0 … 6).
    pub memory_type: u8,
    /// The leaf's ignore-PAT bit.
    pub ignore_pat: bool,
    /// Entries read, root first (`steps[..depth]`).
    pub steps: [WalkStep; 5],
    /// How many entries were read.
    pub depth: u8,
}

/// Check an EPTP and return `(root, levels, ad)`.
pub fn parse_eptp<E>(config: &EptConfig, eptp: u64) -> Result<(u64, u8, bool), EptError<E>> {
    let mt = eptp & 7;
    let levels = ((eptp >> 3) & 7) as u8 + 1;
    let bits = config.maxphyaddr.clamp(32, 52);
    let high = !((1u64 << bits) - 1);
    if !(mt == 0 || mt == EPTP_MT_WB) || !(levels == 4 || levels == 5) || eptp & high != 0 {
        return Err(EptError::BadEptp(eptp));
    }
    // Bits 11:7 are reserved.
    if eptp & 0xF80 != 0 {
        return Err(EptError::BadEptp(eptp));
    }
    Ok((eptp & flags::ADDR_MASK, levels, eptp & EPTP_AD != 0))
}

/// Translate `gpa` through the EPT tables of `eptp`, reading host memory through `reader`.
/// With A/D enabled in the EPTP, a successful translation sets A in every entry used and D in the
/// leaf for writes.
pub fn translate<R: TableReader + ?Sized>(
    reader: &mut R,
    config: &EptConfig,
    eptp: u64,
    gpa: u64,
    access: EptAccess,
) -> Result<EptTranslation, EptError<R::Error>> {
    let (root, levels, ad) = parse_eptp(config, eptp)?;
    let format = EptFormat {
        config: *config,
        levels,
    };
    let w = walk_core(reader, &format, root, gpa).map_err(EptError::Table)?;
    let level = w.last_level();
    let entries = w.entries();
    let mut rights = eptf::RWX | eptf::USER_EXECUTE;
    for s in entries {
        rights &= s.entry;
    }
    let (base, size) = match w.end {
        WalkEnd::Leaf { base, size } => (base, size),
        WalkEnd::Reserved | WalkEnd::BadLeaf => {
            return Err(EptError::Fault(EptFault::Misconfig { gpa, level }));
        }
        WalkEnd::NotPresent => {
            rights = 0;
            (0, PageSize::Size4K)
        }
    };
    let exec_bit = match access.linear {
        Some(l) if config.mbec && l.user => eptf::USER_EXECUTE,
        _ => eptf::EXECUTE,
    };
    let needed = match access.kind {
        AccessKind::Read => eptf::READ,
        AccessKind::Write => eptf::WRITE,
        AccessKind::Fetch => exec_bit,
    };
    if w.end == WalkEnd::NotPresent || rights & needed == 0 {
        let mut q = match access.kind {
            AccessKind::Read => exit_qual::READ,
            AccessKind::Write => exit_qual::WRITE,
            AccessKind::Fetch => exit_qual::FETCH,
        };
        q |= (rights & eptf::RWX) << 3;
        if config.mbec && rights & eptf::USER_EXECUTE != 0 {
            q |= exit_qual::USER_EXECUTABLE;
        }
        if let Some(l) = access.linear {
            q |= exit_qual::GLA_VALID;
            if l.translated {
                q |= exit_qual::GLA_TRANSLATED;
                if l.user {
                    q |= exit_qual::USER_LINEAR;
                }
                if l.writable {
                    q |= exit_qual::WRITABLE_LINEAR;
                }
                if l.xd {
                    q |= exit_qual::XD_LINEAR;
                }
            }
        }
        return Err(EptError::Fault(EptFault::Violation {
            gpa,
            gla: access.linear.map(|l| l.gla),
            qualification: q,
        }));
    }
    if ad {
        let last = entries.len().saturating_sub(1);
        for (i, s) in entries.iter().enumerate() {
            let mut e = s.entry | eptf::ACCESSED;
            if i == last && access.kind == AccessKind::Write {
                e |= eptf::DIRTY;
            }
            if e != s.entry {
                reader
                    .write_entry(s.entry_gpa, s.level, e)
                    .map_err(EptError::Table)?;
            }
        }
    }
    let leaf = entries.last().map_or(0, |s| s.entry);
    Ok(EptTranslation {
        hpa: base | (gpa & (size.bytes() - 1)),
        page_size: size,
        rights,
        memory_type: ((leaf & eptf::MEMORY_TYPE_MASK) >> 3) as u8,
        ignore_pat: leaf & eptf::IGNORE_PAT != 0,
        steps: w.steps,
        depth: w.depth,
    })
}

/// [`translate`] reading EPT tables from host memory `host` (addressed by host-physical address).
pub fn translate_phys<M: GuestMemory + ?Sized>(
    host: &M,
    config: &EptConfig,
    eptp: u64,
    gpa: u64,
    access: EptAccess,
) -> Result<EptTranslation, EptError<PagingError>> {
    translate(&mut PhysReader(host), config, eptp, gpa, access)
}

/// Writes 4-level EPT tables into host memory, allocating table pages from a caller-chosen area
/// (a bump allocator; pages are zeroed when allocated).
pub struct EptBuilder<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    root: u64,
    area: TableArea,
    ad: bool,
}

impl<'m, M: GuestMemory + ?Sized> EptBuilder<'m, M> {
    /// Start new tables in `area_start..area_start + area_size` of host memory; the EPT PML4 is
    /// the first page.
    pub fn new(mem: &'m M, area_start: u64, area_size: u64) -> Result<Self, PagingError> {
        let mut area = TableArea::new(area_start, area_size)?;
        let root = area.alloc(mem)?;
        Ok(Self {
            mem,
            root,
            area,
            ad: false,
        })
    }

    /// Enable accessed/dirty flags in the EPTP this builder reports.
    pub fn with_ad(mut self, ad: bool) -> Self {
        self.ad = ad;
        self
    }

    /// The EPTP (WB, 4-level, A/D as configured).
    pub fn eptp(&self) -> u64 {
        eptp(self.root, 4, self.ad)
    }

    fn rw(&self, a: u64, v: Option<u64>) -> Result<u64, PagingError> {
        let r = match v {
            Some(v) => self.mem.write_obj(v, GuestAddress(a)).map(|()| v),
            None => self.mem.read_obj(GuestAddress(a)),
        };
        r.map_err(|source| PagingError::Memory { gpa: a, source })
    }

    /// Map one page `gpa` → `hpa` with leaf bits `bits` ([`eptf`] rights, memory type,
    /// ignore-PAT …; PS is added for large pages). Intermediate entries get R/W/X (+ user
    /// execute) so the leaf decides.
    pub fn map(
        &mut self,
        gpa: u64,
        hpa: u64,
        size: PageSize,
        bits: u64,
    ) -> Result<(), PagingError> {
        let align = size.bytes();
        for (what, v) in [
            ("guest physical address", gpa),
            ("host physical address", hpa),
        ] {
            if !v.is_multiple_of(align) {
                return Err(PagingError::Misaligned {
                    what,
                    value: v,
                    align,
                });
            }
        }
        if gpa >> 48 != 0 {
            return Err(PagingError::NonCanonical(gpa));
        }
        let mut table = self.root;
        for level in (size.level() + 1..=4).rev() {
            let slot = table + table_index(gpa, level) * 8;
            let e = self.rw(slot, None)?;
            table = if e & eptf::RWX == 0 {
                let t = self.area.alloc(self.mem)?;
                self.rw(slot, Some(t | eptf::RWX | eptf::USER_EXECUTE))?;
                t
            } else if e & eptf::PAGE_SIZE != 0 {
                return Err(PagingError::AlreadyMapped(gpa));
            } else {
                e & flags::ADDR_MASK
            };
        }
        let slot = table + table_index(gpa, size.level()) * 8;
        if self.rw(slot, None)? & eptf::RWX != 0 {
            return Err(PagingError::AlreadyMapped(gpa));
        }
        let ps = if size == PageSize::Size4K {
            0
        } else {
            eptf::PAGE_SIZE
        };
        self.rw(slot, Some(hpa | bits | ps)).map(|_| ())
    }

    /// Map `gpa..gpa + len` to `hpa..` with pages of `size`.
    pub fn map_range(
        &mut self,
        gpa: u64,
        hpa: u64,
        len: u64,
        size: PageSize,
        bits: u64,
    ) -> Result<(), PagingError> {
        if !len.is_multiple_of(size.bytes()) {
            return Err(PagingError::Misaligned {
                what: "length",
                value: len,
                align: size.bytes(),
            });
        }
        let mut off = 0;
        while off < len {
            self.map(gpa + off, hpa + off, size, bits)?;
            off += size.bytes();
        }
        Ok(())
    }
}
