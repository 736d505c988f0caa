//! # vmkit-memory
//!
//! Guest physical memory and x86 address translation for vmkit VMMs:
//!
//! * [`layout`] — a validated guest physical address map ([`GuestLayout`]): RAM split around the
//!   32-bit MMIO hole, reserved ranges and named MMIO windows, producing a vm-memory
//!   [`GuestMemoryMmap`](vm_memory::GuestMemoryMmap) and an e820 table; [`layout_check`] has
//!   helpers for unit-testing layouts.
//! * [`paging`] — x86-64 page tables: a builder that writes tables into guest memory and the
//!   shared radix-walk core ([`paging::walk_core`]).
//! * [`walk`] — the guest page walker with permissions (SDM vol. 3A ch. 4): 4/5-level, #PF error
//!   codes, A/D updates.
//! * [`ept`] — the EPT model (SDM vol. 3C §29.3): violations, misconfigurations, a builder.
//! * [`nested`] — the two-dimensional walk (guest ∘ EPT) with every memory reference.
//! * [`shadow`] — the shadow page-table model (write-protected guest tables, unsync/resync).
//! * [`tlb`] — a TLB tagged by VPID and PCID with INVLPG / INVPCID / CR3 flush semantics.
//! * [`boot`] — kernel loaders: ELF, bzImage and the PVH start info through linux-loader, and
//!   multiboot v1 (ELF32 / a.out kludge, information structure with memory map and command line).
//! * [`dirty`] — "pages written since last sync" from KVM's dirty log or dirty ring and
//!   vm-memory's bitmap.
//!
//! ```
//! use vmkit_memory::{GuestLayout, E820Type};
//!
//! let layout = GuestLayout::builder().ram_size(64 << 20).build().unwrap();
//! let mem = layout.create_memory().unwrap();
//! assert_eq!(layout.e820()[0].kind, E820Type::Ram);
//! # use vm_memory::GuestMemoryBackend;
//! assert_eq!(mem.iter().count(), 1);
//! ```
#![deny(missing_docs)]

pub mod boot;
pub mod dirty;
pub mod ept;
pub mod layout;
pub mod layout_check;
pub mod nested;
pub mod paging;
pub mod shadow;
#[cfg(feature = "test-utils")]
pub mod test_utils;
pub mod tlb;
pub mod walk;

pub use layout::{E820Entry, E820Type, GuestLayout, GuestLayoutBuilder, LayoutError, RegionKind};
pub use paging::{PageSize, PageTableBuilder, PagingError, Translation};
