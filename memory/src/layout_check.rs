//! Helpers for unit-testing guest memory layouts: overlap and region-kind checks that return
//! errors naming the culprits, and a text rendering of the layout and its e820 table for
//! failure messages and snapshot tests.
//!
//! A VMM author's test:
//!
//! ```
//! use vmkit_memory::{GuestLayout, RegionKind};
//! use vmkit_memory::layout_check::{check_no_overlap, check_region_kind, render};
//!
//! #[cfg_attr(test, test)]
//! fn my_vmm_layout_is_sane() {
//!     let layout = GuestLayout::builder()
//!         .ram_size(4 << 30)
//!         .mmio_window("pci-ecam", 0xe000_0000, 0x1000_0000)
//!         .reserved("bios", 0xf_0000, 0x1_0000)
//!         .build()
//!         .unwrap();
//!     // Any failure message carries the whole map.
//!     check_no_overlap(&layout).unwrap_or_else(|e| panic!("{e}\n{}", render(&layout)));
//!     check_region_kind(&layout, 0x10_0000, RegionKind::Ram).unwrap();
//!     check_region_kind(&layout, 0xe000_1000, RegionKind::Mmio).unwrap();
//!     check_region_kind(&layout, 0xf_8000, RegionKind::Reserved).unwrap();
//!     assert!(render(&layout).contains("pci-ecam"));
//! }
//! # my_vmm_layout_is_sane();
//! ```

use thiserror::Error;

use crate::layout::{GuestLayout, Region, RegionKind};

/// A failed layout check.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutCheckError {
    /// Two regions that must not overlap do.
    #[error("{a} [{a_start:#x}..{a_end:#x}) overlaps {b} [{b_start:#x}..{b_end:#x})")]
    Overlap {
        /// First region.
        a: String,
        /// Its start.
        a_start: u64,
        /// Its end (exclusive).
        a_end: u64,
        /// Second region.
        b: String,
        /// Its start.
        b_start: u64,
        /// Its end (exclusive).
        b_end: u64,
    },
    /// The address is in a region of another kind (or in none).
    #[error("{addr:#x} is {found}, expected {expected:?}")]
    WrongKind {
        /// The address checked.
        addr: u64,
        /// The expected kind.
        expected: RegionKind,
        /// What was found there.
        found: String,
    },
}

/// Whether two regions may share addresses: only a reserved range carved out of RAM.
fn may_overlap(a: &Region, b: &Region) -> bool {
    matches!(
        (a.kind, b.kind),
        (RegionKind::Ram, RegionKind::Reserved) | (RegionKind::Reserved, RegionKind::Ram)
    )
}

/// Every pair of overlapping regions that must not overlap (RAM/RAM, MMIO/anything,
/// reserved/reserved).
pub fn overlaps(layout: &GuestLayout) -> Vec<(&Region, &Region)> {
    let r = layout.regions();
    let mut out = Vec::new();
    for (i, a) in r.iter().enumerate() {
        for b in &r[i + 1..] {
            if a.start < b.end() && b.start < a.end() && !may_overlap(a, b) {
                out.push((a, b));
            }
        }
    }
    out
}

/// Check that no two regions overlap (except reserved ranges inside RAM).
pub fn check_no_overlap(layout: &GuestLayout) -> Result<(), LayoutCheckError> {
    match overlaps(layout).first() {
        None => Ok(()),
        Some((a, b)) => Err(LayoutCheckError::Overlap {
            a: a.name.clone(),
            a_start: a.start,
            a_end: a.end(),
            b: b.name.clone(),
            b_start: b.start,
            b_end: b.end(),
        }),
    }
}

/// Check that `addr` is in a region of `kind` ([`GuestLayout::classify`]: reserved and MMIO
/// win over RAM).
pub fn check_region_kind(
    layout: &GuestLayout,
    addr: u64,
    kind: RegionKind,
) -> Result<(), LayoutCheckError> {
    match layout.classify(addr) {
        Some(r) if r.kind == kind => Ok(()),
        found => Err(LayoutCheckError::WrongKind {
            addr,
            expected: kind,
            found: found.map_or_else(
                || "unmapped".to_string(),
                |r| format!("{} ({:?})", r.name, r.kind),
            ),
        }),
    }
}

/// The layout as text: one line per region, the MMIO hole, then the e820 table.
pub fn render(layout: &GuestLayout) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "guest physical layout ({} bits):",
        layout.max_phys_bits()
    );
    for r in layout.regions() {
        let kind = match r.kind {
            RegionKind::Ram => "ram",
            RegionKind::Reserved => "reserved",
            RegionKind::Mmio => "mmio",
        };
        let _ = writeln!(
            s,
            "  {:#018x}-{:#018x} {:<8} {} ({} KiB)",
            r.start,
            r.end() - 1,
            kind,
            r.name,
            r.size >> 10
        );
    }
    let (hs, he) = layout.mmio_hole();
    let _ = writeln!(s, "  mmio hole {hs:#x}..{he:#x}");
    let _ = writeln!(s, "e820:");
    for e in layout.e820() {
        let _ = writeln!(s, "  {e}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_and_checks() {
        let l = GuestLayout::builder()
            .ram_size(64 << 20)
            .reserved("bios", 0xf_0000, 0x1_0000)
            .mmio_window("virtio", 0xd000_0000, 0x1000)
            .build()
            .unwrap();
        check_no_overlap(&l).unwrap();
        let text = render(&l);
        assert!(text.contains("virtio"), "{text}");
        assert!(text.contains("] usable"), "{text}");
        assert!(text.contains("] reserved"), "{text}");
        assert_eq!(
            check_region_kind(&l, 0xd000_0000, RegionKind::Ram),
            Err(LayoutCheckError::WrongKind {
                addr: 0xd000_0000,
                expected: RegionKind::Ram,
                found: "virtio (Mmio)".into()
            })
        );
        assert!(matches!(
            check_region_kind(&l, 1 << 40, RegionKind::Ram),
            Err(LayoutCheckError::WrongKind { .. })
        ));
    }
}
