//! # vmkit-memory
//!
//! Guest physical memory for vmkit VMMs:
//!
//! * [`layout`] — a validated guest physical address map ([`GuestLayout`]): RAM split around the
//!   32-bit MMIO hole, reserved ranges and named MMIO windows, producing a vm-memory
//!   [`GuestMemoryMmap`](vm_memory::GuestMemoryMmap) and an e820 table.
//! * [`paging`] — x86-64 4-level page tables: a builder that writes tables into guest memory and a
//!   walker that translates a guest-virtual address by reading them.
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

pub mod layout;
pub mod paging;

pub use layout::{E820Entry, E820Type, GuestLayout, GuestLayoutBuilder, LayoutError, RegionKind};
pub use paging::{PageSize, PageTableBuilder, PagingError, Translation};
