//! The two-dimensional walk (nested paging): the guest walk of [`walk`](crate::walk::walk) where every
//! guest paging-structure access is itself translated through EPT, then the final guest-physical
//! address too. Every memory reference is recorded — for 4-level guest and 4-level EPT tables a
//! TLB miss costs at most 4 × (4 + 1) + 4 = 24 — and a fault says which stage raised it.
//!
//! ```
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//! use vmkit_memory::PageSize;
//! use vmkit_memory::ept::{EptBuilder, EptConfig, eptf};
//! use vmkit_memory::nested::{self, NestedSetup};
//! use vmkit_memory::paging::{PageTableBuilder, flags};
//! use vmkit_memory::walk::{Access, PagingMode};
//!
//! // Host memory: EPT tables at 0x1000.., guest RAM (16 MiB) at HPA 16 MiB.
//! let host = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 32 << 20)]).unwrap();
//! let mut ept = EptBuilder::new(&host, 0x1000, 0x10000).unwrap();
//! ept.map_range(0, 16 << 20, 16 << 20, PageSize::Size4K, eptf::RWX | eptf::MT_WB).unwrap();
//! // Guest tables, written at their host addresses (GPA + 16 MiB) for this demo.
//! let guest = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
//! let mut pt = PageTableBuilder::new(&guest, 0x1000, 0x8000).unwrap();
//! pt.map(0x7000_0000, 0x40_0000, PageSize::Size4K, flags::WRITABLE).unwrap();
//! let mut buf = vec![0u8; 0x8000];
//! # use vm_memory::Bytes;
//! guest.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
//! host.write_slice(&buf, GuestAddress((16 << 20) + 0x1000)).unwrap();
//!
//! let setup = NestedSetup { mode: PagingMode::default(), ept: EptConfig::default(), eptp: ept.eptp() };
//! let t = nested::walk_2d(&host, &setup, pt.cr3(), 0x7000_0008, Access::read()).unwrap();
//! assert_eq!(t.gpa, 0x40_0008);
//! assert_eq!(t.hpa, (16 << 20) + 0x40_0008);
//! // 4 guest levels × (4 EPT + 1) + 4 EPT for the final GPA: the 24 references of a TLB miss.
//! assert_eq!(t.refs.len(), 24);
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::GuestMemory;

use crate::ept::{self, EptAccess, EptConfig, EptError, EptFault, LinearInfo};
use crate::paging::{PagingError, PhysReader, TableReader};
use crate::walk::{self, Access, AccessKind, GuestWalk, PageFault, PagingMode, WalkError};

/// Most memory references one 2-D walk can make (5-level guest over 5-level EPT: 5 × 6 + 5).
pub const MAX_REFS: usize = 35;

/// One memory reference of a 2-D walk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemRef {
    /// What was referenced.
    pub kind: RefKind,
    /// Level of the entry (EPT or guest).
    pub level: u8,
    /// Host-physical address read.
    pub hpa: u64,
}

/// The kind of a [`MemRef`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefKind {
    /// An EPT entry read.
    #[default]
    Ept,
    /// A guest paging-structure entry read (at its host-physical address).
    GuestTable,
}

/// The memory references of a walk (a fixed array: no allocation per walk).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRefs {
    refs: [MemRef; MAX_REFS],
    len: u8,
}

impl Default for MemRefs {
    fn default() -> Self {
        Self {
            refs: [MemRef::default(); MAX_REFS],
            len: 0,
        }
    }
}

impl MemRefs {
    fn push(&mut self, r: MemRef) {
        if let Some(slot) = self.refs.get_mut(self.len as usize) {
            *slot = r;
            self.len += 1;
        }
    }
    /// Number of references.
    pub fn len(&self) -> usize {
        self.len as usize
    }
    /// No references.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The references, in order.
    pub fn as_slice(&self) -> &[MemRef] {
        &self.refs[..self.len as usize]
    }
}

/// The paging state of a nested walk: guest mode, EPT capabilities and EPTP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NestedSetup {
    /// Guest paging mode.
    pub mode: PagingMode,
    /// EPT capabilities.
    pub ept: EptConfig,
    /// The EPTP.
    pub eptp: u64,
}

/// Which stage of a 2-D walk faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stage {
    /// EPT, while translating the guest paging-structure entry at this guest level.
    GuestTable(u8),
    /// EPT, while translating the final guest-physical address.
    Final,
}

/// Why a 2-D walk did not produce a host-physical address.
#[derive(Debug, Error)]
pub enum NestedError {
    /// The guest walk faults: inject #PF into the guest.
    #[error("guest page fault (error code {:#x})", .0.error_code)]
    Guest(PageFault),
    /// EPT faults at `stage`: a VM exit to the hypervisor.
    #[error("EPT fault at {stage:?}: {fault:?}")]
    Ept {
        /// The stage.
        stage: Stage,
        /// Violation or misconfiguration.
        fault: EptFault,
    },
    /// The address is not canonical (#GP).
    #[error("address {0:#x} is not canonical")]
    NonCanonical(u64),
    /// CR3 is not a valid table address.
    #[error("cr3 {0:#x} is not a valid table address")]
    BadCr3(u64),
    /// The EPTP is invalid.
    #[error("invalid EPTP {0:#x}")]
    BadEptp(u64),
    /// Host memory could not be read at this host-physical address.
    #[error("host memory access at {0:#x} failed")]
    Host(u64),
}

/// A successful 2-D walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NestedTranslation {
    /// Guest-physical address.
    pub gpa: u64,
    /// Host-physical address.
    pub hpa: u64,
    /// The guest walk.
    pub guest: GuestWalk,
    /// The EPT translation of the final guest-physical address (its rights, memory type …).
    pub ept: ept::EptTranslation,
    /// Every memory reference, in order.
    pub refs: MemRefs,
}

enum Stop {
    Ept(u8, EptFault),
    BadEptp(u64),
    Host(u64),
}

/// A [`TableReader`] that translates every guest table address through EPT.
struct NestedReader<'a, M: ?Sized> {
    host: &'a M,
    setup: &'a NestedSetup,
    va: u64,
    refs: MemRefs,
    last_hpa: [u64; 6],
}

struct Recorder<'a, 'b, M: ?Sized> {
    inner: PhysReader<'a, M>,
    refs: &'b mut MemRefs,
}

impl<M: GuestMemory + ?Sized> TableReader for Recorder<'_, '_, M> {
    type Error = PagingError;
    fn read_entry(&mut self, addr: u64, level: u8) -> Result<u64, PagingError> {
        self.refs.push(MemRef {
            kind: RefKind::Ept,
            level,
            hpa: addr,
        });
        self.inner.read_entry(addr, level)
    }
    fn write_entry(&mut self, addr: u64, level: u8, value: u64) -> Result<(), PagingError> {
        self.inner.write_entry(addr, level, value)
    }
}

fn ept_stop(stage_level: u8, e: EptError<PagingError>) -> Stop {
    match e {
        EptError::Fault(f) => Stop::Ept(stage_level, f),
        EptError::BadEptp(p) => Stop::BadEptp(p),
        EptError::Table(PagingError::Memory { gpa, .. }) => Stop::Host(gpa),
        EptError::Table(_) => Stop::Host(0),
    }
}

impl<M: GuestMemory + ?Sized> TableReader for NestedReader<'_, M> {
    type Error = Stop;
    fn read_entry(&mut self, gpa: u64, level: u8) -> Result<u64, Stop> {
        // With EPT A/D enabled, guest paging-structure accesses count as writes (SDM §29.3.5).
        let ad = self.setup.eptp & ept::EPTP_AD != 0;
        let access = EptAccess {
            kind: if ad {
                AccessKind::Write
            } else {
                AccessKind::Read
            },
            linear: Some(LinearInfo {
                gla: self.va,
                translated: false,
                user: false,
                writable: false,
                xd: false,
            }),
        };
        let mut rec = Recorder {
            inner: PhysReader(self.host),
            refs: &mut self.refs,
        };
        let t = ept::translate(&mut rec, &self.setup.ept, self.setup.eptp, gpa, access)
            .map_err(|e| ept_stop(level, e))?;
        self.refs.push(MemRef {
            kind: RefKind::GuestTable,
            level,
            hpa: t.hpa,
        });
        if let Some(slot) = self.last_hpa.get_mut(level as usize) {
            *slot = t.hpa;
        }
        PhysReader(self.host)
            .read_entry(t.hpa, level)
            .map_err(|_| Stop::Host(t.hpa))
    }
    fn write_entry(&mut self, _gpa: u64, level: u8, value: u64) -> Result<(), Stop> {
        // Accessed/dirty updates go to the entry just read at this level.
        let hpa = self.last_hpa.get(level as usize).copied().unwrap_or(0);
        PhysReader(self.host)
            .write_entry(hpa, level, value)
            .map_err(|_| Stop::Host(hpa))
    }
}

/// Walk guest tables (rooted at guest-physical `cr3`) for `va` and translate the result through
/// EPT, all in host memory `host`. Guest A/D updates happen when `setup.mode.update_ad` is set,
/// EPT A/D updates when the EPTP enables them.
pub fn walk_2d<M: GuestMemory + ?Sized>(
    host: &M,
    setup: &NestedSetup,
    cr3: u64,
    va: u64,
    access: Access,
) -> Result<NestedTranslation, NestedError> {
    let mut r = NestedReader {
        host,
        setup,
        va,
        refs: MemRefs::default(),
        last_hpa: [0; 6],
    };
    let g = match walk::walk(&mut r, &setup.mode, cr3, va, access) {
        Ok(g) => g,
        Err(WalkError::PageFault(pf)) => return Err(NestedError::Guest(pf)),
        Err(WalkError::NonCanonical(v)) => return Err(NestedError::NonCanonical(v)),
        Err(WalkError::BadCr3(c)) => return Err(NestedError::BadCr3(c)),
        Err(WalkError::Table(Stop::Ept(level, fault))) => {
            return Err(NestedError::Ept {
                stage: Stage::GuestTable(level),
                fault,
            });
        }
        Err(WalkError::Table(Stop::BadEptp(p))) => return Err(NestedError::BadEptp(p)),
        Err(WalkError::Table(Stop::Host(a))) => return Err(NestedError::Host(a)),
    };
    let ea = EptAccess {
        kind: access.kind,
        linear: Some(LinearInfo {
            gla: va,
            translated: true,
            user: g.perms.user,
            writable: g.perms.writable,
            xd: !g.perms.executable,
        }),
    };
    let mut rec = Recorder {
        inner: PhysReader(host),
        refs: &mut r.refs,
    };
    let t = ept::translate(&mut rec, &setup.ept, setup.eptp, g.gpa, ea).map_err(
        |e| match ept_stop(0, e) {
            Stop::Ept(_, fault) => NestedError::Ept {
                stage: Stage::Final,
                fault,
            },
            Stop::BadEptp(p) => NestedError::BadEptp(p),
            Stop::Host(a) => NestedError::Host(a),
        },
    )?;
    Ok(NestedTranslation {
        gpa: g.gpa,
        hpa: t.hpa,
        guest: g,
        ept: t,
        refs: r.refs,
    })
}
