//! Guest physical address layout: RAM around the 32-bit MMIO hole, reserved ranges, MMIO windows.
//!
//! A [`GuestLayout`] is built and validated once by a [`GuestLayoutBuilder`]; afterwards it is
//! immutable. It produces the vm-memory [`GuestMemoryMmap`] that backs the RAM (and nothing else:
//! the MMIO hole and MMIO windows are never backed) and the e820 table a firmware or Linux boot
//! protocol hands to the guest.
//!
//! ```
//! use vmkit_memory::{GuestLayout, LayoutError};
//!
//! // 4 GiB of RAM: 3 GiB below the hole at 0xC000_0000, 1 GiB above 4 GiB.
//! let layout = GuestLayout::builder()
//!     .ram_size(4 << 30)
//!     .mmio_window("pci-ecam", 0xE000_0000, 0x1000_0000)
//!     .build()
//!     .unwrap();
//! assert_eq!(layout.ram_ranges(), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
//!
//! // A window that overlaps RAM is refused with a typed error.
//! let err = GuestLayout::builder()
//!     .ram_size(1 << 30)
//!     .mmio_window("bad", 0x1000_0000, 0x1000)
//!     .build()
//!     .unwrap_err();
//! assert!(matches!(err, LayoutError::Overlap { .. }));
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryMmap, bitmap::NewBitmap, mmap::FromRangesError};

/// Granularity every region must be aligned to (a 4 KiB page).
pub const PAGE_SIZE: u64 = 0x1000;
/// Default start of the 32-bit MMIO hole (3 GiB).
pub const DEFAULT_MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit address space; the default end of the MMIO hole.
pub const FOUR_GIB: u64 = 1 << 32;

/// Errors from validating a layout or creating its memory.
#[derive(Debug, Error)]
pub enum LayoutError {
    /// A region has size zero.
    #[error("region `{name}` has zero size")]
    ZeroSize {
        /// Region name.
        name: String,
    },
    /// A region's start or size is not a multiple of [`PAGE_SIZE`].
    #[error("region `{name}` at {start:#x} size {size:#x} is not 4 KiB aligned")]
    Misaligned {
        /// Region name.
        name: String,
        /// Start address.
        start: u64,
        /// Size in bytes.
        size: u64,
    },
    /// `start + size` overflows 64 bits.
    #[error("region `{name}` at {start:#x} size {size:#x} overflows the address space")]
    AddressOverflow {
        /// Region name.
        name: String,
        /// Start address.
        start: u64,
        /// Size in bytes.
        size: u64,
    },
    /// Two regions overlap.
    #[error("region `{first}` overlaps region `{second}`")]
    Overlap {
        /// The region that starts first.
        first: String,
        /// The other region.
        second: String,
    },
    /// A region straddles an edge of the 32-bit MMIO hole.
    #[error("region `{name}` crosses an edge of the MMIO hole")]
    CrossesHole {
        /// Region name.
        name: String,
    },
    /// A reserved region is partly RAM and partly not.
    #[error("reserved region `{name}` is partly inside and partly outside RAM")]
    PartlyRam {
        /// Region name.
        name: String,
    },
    /// A region ends beyond what the host's physical address width can address.
    #[error(
        "region `{name}` ends at {end:#x}, beyond the {max_phys_bits}-bit physical address limit"
    )]
    BeyondHostLimit {
        /// Region name.
        name: String,
        /// Exclusive end address.
        end: u64,
        /// The limit in bits.
        max_phys_bits: u8,
    },
    /// The MMIO hole is not inside the 32-bit address space or not aligned.
    #[error("invalid MMIO hole {start:#x}..{end:#x}: it must be page aligned and inside 4 GiB")]
    InvalidHole {
        /// Hole start.
        start: u64,
        /// Hole end (exclusive).
        end: u64,
    },
    /// `max_phys_bits` is outside 32..=52.
    #[error("max_phys_bits {0} is outside 32..=52")]
    InvalidPhysBits(u8),
    /// Creating the backing memory failed.
    #[error("cannot create guest memory")]
    Memory(#[source] FromRangesError),
}

/// What occupies a region of guest physical address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RegionKind {
    /// Guest RAM, backed by host memory.
    Ram,
    /// Reserved: listed as reserved in e820 (backed only if it lies inside RAM).
    Reserved,
    /// A named MMIO window for devices; never backed by memory.
    Mmio,
}

/// One named region of a [`GuestLayout`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    /// Human-readable name (`"ram-low"`, `"pci-ecam"` …).
    pub name: String,
    /// First guest physical address.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// What the region is.
    pub kind: RegionKind,
}

impl Region {
    /// Exclusive end address.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }

    /// Whether `addr` lies inside the region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.start && addr < self.end()
    }
}

/// e820 memory types (ACPI "Address Range Types").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM (type 1).
    Ram = 1,
    /// Reserved, not usable (type 2).
    Reserved = 2,
}

/// One entry of an e820 table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Range type.
    pub kind: E820Type,
}

impl From<E820Entry> for linux_loader::loader::bootparam::boot_e820_entry {
    fn from(e: E820Entry) -> Self {
        Self {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        }
    }
}

impl fmt::Display for E820Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            E820Type::Ram => "usable",
            E820Type::Reserved => "reserved",
        };
        write!(
            f,
            "[mem {:#018x}-{:#018x}] {kind}",
            self.addr,
            self.addr + self.size - 1
        )
    }
}

/// A validated guest physical memory layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestLayout {
    regions: Vec<Region>,
    hole_start: u64,
    hole_end: u64,
    max_phys_bits: u8,
}

/// Builder for [`GuestLayout`]; call [`build`](Self::build) to validate.
#[derive(Clone, Debug)]
pub struct GuestLayoutBuilder {
    ram_size: u64,
    hole_start: u64,
    hole_end: u64,
    max_phys_bits: Option<u8>,
    extra: Vec<Region>,
}

impl Default for GuestLayoutBuilder {
    fn default() -> Self {
        Self {
            ram_size: 0,
            hole_start: DEFAULT_MMIO_HOLE_START,
            hole_end: FOUR_GIB,
            max_phys_bits: None,
            extra: Vec::new(),
        }
    }
}

/// The host's physical address width (CPUID leaf 0x8000_0008, EAX bits 7:0), or 36 if unknown.
pub fn host_phys_bits() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        // CPUID is always available on x86-64; `__cpuid` is safe to call there.
        let max_ext = std::arch::x86_64::__cpuid(0x8000_0000).eax;
        if max_ext >= 0x8000_0008 {
            return (std::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff) as u8;
        }
    }
    36
}

impl GuestLayoutBuilder {
    /// Total RAM in bytes; split around the MMIO hole.
    pub fn ram_size(mut self, bytes: u64) -> Self {
        self.ram_size = bytes;
        self
    }

    /// Place the 32-bit MMIO hole at `start..end` (default `0xC000_0000..4 GiB`). RAM that does not
    /// fit below the hole continues at `end`.
    pub fn mmio_hole(mut self, start: u64, end: u64) -> Self {
        self.hole_start = start;
        self.hole_end = end;
        self
    }

    /// Physical address width to validate against (default: the host's).
    pub fn max_phys_bits(mut self, bits: u8) -> Self {
        self.max_phys_bits = Some(bits);
        self
    }

    /// A reserved range: inside RAM it is carved out of the e820 RAM entries (but stays backed),
    /// outside RAM it is listed as reserved and not backed.
    pub fn reserved(mut self, name: &str, start: u64, size: u64) -> Self {
        self.extra.push(Region {
            name: name.into(),
            start,
            size,
            kind: RegionKind::Reserved,
        });
        self
    }

    /// A named MMIO window (never backed, never overlapping RAM).
    pub fn mmio_window(mut self, name: &str, start: u64, size: u64) -> Self {
        self.extra.push(Region {
            name: name.into(),
            start,
            size,
            kind: RegionKind::Mmio,
        });
        self
    }

    /// Validate and build the layout.
    pub fn build(self) -> Result<GuestLayout, LayoutError> {
        let max_phys_bits = self.max_phys_bits.unwrap_or_else(host_phys_bits);
        if !(32..=52).contains(&max_phys_bits) {
            return Err(LayoutError::InvalidPhysBits(max_phys_bits));
        }
        let (hs, he) = (self.hole_start, self.hole_end);
        if hs >= he || he > FOUR_GIB || hs % PAGE_SIZE != 0 || he % PAGE_SIZE != 0 {
            return Err(LayoutError::InvalidHole { start: hs, end: he });
        }
        let mut regions = Vec::new();
        let low = self.ram_size.min(hs);
        if low > 0 {
            regions.push(Region {
                name: "ram-low".into(),
                start: 0,
                size: low,
                kind: RegionKind::Ram,
            });
        }
        if self.ram_size > low {
            regions.push(Region {
                name: "ram-high".into(),
                start: he,
                size: self.ram_size - low,
                kind: RegionKind::Ram,
            });
        }
        if regions.is_empty() {
            return Err(LayoutError::ZeroSize { name: "ram".into() });
        }
        for r in regions.iter().chain(&self.extra) {
            check_region(r, max_phys_bits)?;
        }
        let ram = regions.as_slice();
        for r in &self.extra {
            // Straddling an edge of the hole is always an error.
            let in_hole = |a: u64| a >= hs && a < he;
            if in_hole(r.start) != in_hole(r.end() - 1) || (r.start < hs && r.end() > he) {
                return Err(LayoutError::CrossesHole {
                    name: r.name.clone(),
                });
            }
            let touches_ram = ram.iter().any(|m| r.start < m.end() && m.start < r.end());
            match r.kind {
                RegionKind::Mmio if touches_ram => {
                    let first = ram.iter().find(|m| r.start < m.end() && m.start < r.end());
                    return Err(LayoutError::Overlap {
                        first: first.map(|m| m.name.clone()).unwrap_or_default(),
                        second: r.name.clone(),
                    });
                }
                RegionKind::Reserved if touches_ram => {
                    let inside = ram.iter().any(|m| r.start >= m.start && r.end() <= m.end());
                    if !inside {
                        return Err(LayoutError::PartlyRam {
                            name: r.name.clone(),
                        });
                    }
                }
                _ => {}
            }
        }
        // Reserved and MMIO regions must not overlap each other.
        let mut extra = self.extra.clone();
        extra.sort_by_key(|r| r.start);
        for pair in extra.windows(2) {
            if pair[1].start < pair[0].end() {
                return Err(LayoutError::Overlap {
                    first: pair[0].name.clone(),
                    second: pair[1].name.clone(),
                });
            }
        }
        regions.extend(extra);
        regions.sort_by_key(|r| (r.start, r.kind != RegionKind::Ram));
        Ok(GuestLayout {
            regions,
            hole_start: hs,
            hole_end: he,
            max_phys_bits,
        })
    }
}

fn check_region(r: &Region, max_phys_bits: u8) -> Result<(), LayoutError> {
    if r.size == 0 {
        return Err(LayoutError::ZeroSize {
            name: r.name.clone(),
        });
    }
    if !r.start.is_multiple_of(PAGE_SIZE) || !r.size.is_multiple_of(PAGE_SIZE) {
        return Err(LayoutError::Misaligned {
            name: r.name.clone(),
            start: r.start,
            size: r.size,
        });
    }
    let end = r
        .start
        .checked_add(r.size)
        .ok_or_else(|| LayoutError::AddressOverflow {
            name: r.name.clone(),
            start: r.start,
            size: r.size,
        })?;
    if end > 1u64 << max_phys_bits {
        return Err(LayoutError::BeyondHostLimit {
            name: r.name.clone(),
            end,
            max_phys_bits,
        });
    }
    Ok(())
}

impl GuestLayout {
    /// Start a builder with the default MMIO hole and the host's physical address width.
    pub fn builder() -> GuestLayoutBuilder {
        GuestLayoutBuilder::default()
    }

    /// All regions (RAM, reserved, MMIO), sorted by start address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The MMIO hole as `(start, end)` (end exclusive).
    pub fn mmio_hole(&self) -> (u64, u64) {
        (self.hole_start, self.hole_end)
    }

    /// The physical address width the layout was validated against.
    pub fn max_phys_bits(&self) -> u8 {
        self.max_phys_bits
    }

    /// The backed RAM ranges as `(start, size)`.
    pub fn ram_ranges(&self) -> Vec<(u64, u64)> {
        self.regions_of(RegionKind::Ram)
            .map(|r| (r.start, r.size))
            .collect()
    }

    /// Regions of one kind.
    pub fn regions_of(&self, kind: RegionKind) -> impl Iterator<Item = &Region> {
        self.regions.iter().filter(move |r| r.kind == kind)
    }

    /// A region by name.
    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// What `addr` is: the innermost region containing it (reserved/MMIO before RAM), if any.
    pub fn classify(&self, addr: u64) -> Option<&Region> {
        let mut found = None;
        for r in self.regions.iter().filter(|r| r.contains(addr)) {
            if found.is_none() || r.kind != RegionKind::Ram {
                found = Some(r);
            }
        }
        found
    }

    /// Total backed RAM in bytes.
    pub fn ram_size(&self) -> u64 {
        self.regions_of(RegionKind::Ram).map(|r| r.size).sum()
    }

    /// Allocate anonymous host memory for every RAM range (and nothing else).
    pub fn create_memory(&self) -> Result<GuestMemoryMmap, LayoutError> {
        self.create_memory_with_bitmap()
    }

    /// Like [`create_memory`](Self::create_memory) with a dirty bitmap type `B` (e.g.
    /// `vm_memory::bitmap::AtomicBitmap`) tracking VMM-side writes.
    pub fn create_memory_with_bitmap<B: NewBitmap>(
        &self,
    ) -> Result<GuestMemoryMmap<B>, LayoutError> {
        let ranges: Vec<(GuestAddress, usize)> = self
            .ram_ranges()
            .into_iter()
            .map(|(start, size)| (GuestAddress(start), size as usize))
            .collect();
        GuestMemoryMmap::from_ranges(&ranges).map_err(LayoutError::Memory)
    }

    /// The e820 table: RAM (minus reserved carve-outs) and reserved ranges, sorted by address.
    pub fn e820(&self) -> Vec<E820Entry> {
        let reserved: Vec<&Region> = self.regions_of(RegionKind::Reserved).collect();
        let mut out = Vec::new();
        for ram in self.regions_of(RegionKind::Ram) {
            let mut cursor = ram.start;
            for r in reserved
                .iter()
                .filter(|r| r.start >= ram.start && r.end() <= ram.end())
            {
                if r.start > cursor {
                    out.push(E820Entry {
                        addr: cursor,
                        size: r.start - cursor,
                        kind: E820Type::Ram,
                    });
                }
                cursor = cursor.max(r.end());
            }
            if cursor < ram.end() {
                out.push(E820Entry {
                    addr: cursor,
                    size: ram.end() - cursor,
                    kind: E820Type::Ram,
                });
            }
        }
        out.extend(reserved.iter().map(|r| E820Entry {
            addr: r.start,
            size: r.size,
            kind: E820Type::Reserved,
        }));
        out.sort_by_key(|e| e.addr);
        out
    }
}

impl fmt::Display for GuestLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.regions {
            writeln!(
                f,
                "{:#014x}-{:#014x} {:<8?} {}",
                r.start,
                r.end() - 1,
                r.kind,
                r.name
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    const GIB: u64 = 1 << 30;

    fn b() -> GuestLayoutBuilder {
        GuestLayout::builder().max_phys_bits(46)
    }

    #[test]
    fn e820_for_3g_plus_1g_split() {
        let l = b()
            .ram_size(4 * GIB)
            .reserved("bios", 0xF_0000, 0x1_0000)
            .build()
            .unwrap();
        let expected = vec![
            E820Entry {
                addr: 0,
                size: 0xF_0000,
                kind: E820Type::Ram,
            },
            E820Entry {
                addr: 0xF_0000,
                size: 0x1_0000,
                kind: E820Type::Reserved,
            },
            E820Entry {
                addr: 0x10_0000,
                size: 0xBFF0_0000,
                kind: E820Type::Ram,
            },
            E820Entry {
                addr: 0x1_0000_0000,
                size: 0x4000_0000,
                kind: E820Type::Ram,
            },
        ];
        assert_eq!(l.e820(), expected);
        assert_eq!(l.ram_size(), 4 * GIB);
    }

    #[test]
    fn bad_layouts_are_rejected_with_their_error() {
        type Case = (GuestLayoutBuilder, fn(&LayoutError) -> bool);
        let cases: Vec<Case> = vec![
            (b().ram_size(0), |e| {
                matches!(e, LayoutError::ZeroSize { .. })
            }),
            (b().ram_size(0x1800), |e| {
                matches!(e, LayoutError::Misaligned { .. })
            }),
            (
                b().ram_size(GIB).mmio_window("w", 0xD000_0000, 0),
                |e| matches!(e, LayoutError::ZeroSize { name } if name == "w"),
            ),
            (
                b().ram_size(GIB).mmio_window("w", 0xD000_0010, 0x1000),
                |e| matches!(e, LayoutError::Misaligned { name, .. } if name == "w"),
            ),
            (
                b().ram_size(GIB).mmio_window("w", 0x1000, 0x1000),
                |e| matches!(e, LayoutError::Overlap { first, second } if first == "ram-low" && second == "w"),
            ),
            (
                b().ram_size(GIB)
                    .mmio_window("a", 0xD000_0000, 0x2000)
                    .mmio_window("b", 0xD000_1000, 0x1000),
                |e| matches!(e, LayoutError::Overlap { first, second } if first == "a" && second == "b"),
            ),
            (
                b().ram_size(GIB).mmio_window("x", 0xBFFF_F000, 0x2000),
                |e| matches!(e, LayoutError::CrossesHole { name } if name == "x"),
            ),
            (
                b().ram_size(4 * GIB).reserved("r", 0xFFFF_F000, 0x2000),
                |e| matches!(e, LayoutError::CrossesHole { .. }),
            ),
            (b().ram_size(GIB).reserved("r", GIB - 0x1000, 0x2000), |e| {
                matches!(e, LayoutError::PartlyRam { .. })
            }),
            (b().ram_size(GIB).mmio_window("far", 1 << 46, 0x1000), |e| {
                matches!(
                    e,
                    LayoutError::BeyondHostLimit {
                        max_phys_bits: 46,
                        ..
                    }
                )
            }),
            (
                b().ram_size(GIB)
                    .mmio_window("wrap", u64::MAX - 0xfff, 0x2000),
                |e| {
                    matches!(
                        e,
                        LayoutError::Misaligned { .. } | LayoutError::AddressOverflow { .. }
                    )
                },
            ),
            (
                b().ram_size(GIB).mmio_hole(0xE000_0000, 0x1_1000_0000),
                |e| matches!(e, LayoutError::InvalidHole { .. }),
            ),
            (b().ram_size(GIB).max_phys_bits(60), |e| {
                matches!(e, LayoutError::InvalidPhysBits(60))
            }),
        ];
        for (i, (builder, check)) in cases.into_iter().enumerate() {
            let err = builder.build().unwrap_err();
            assert!(check(&err), "case {i}: unexpected error {err:?}");
        }
    }

    #[test]
    fn classify_and_render() {
        let l = b()
            .ram_size(4 * GIB)
            .mmio_window("ecam", 0xE000_0000, 0x1000_0000)
            .reserved("acpi", 0x9_F000, 0x1000)
            .build()
            .unwrap();
        assert_eq!(l.classify(0x9_F800).unwrap().kind, RegionKind::Reserved);
        assert_eq!(l.classify(0x1000).unwrap().kind, RegionKind::Ram);
        assert_eq!(l.classify(0xE000_1000).unwrap().name, "ecam");
        assert!(l.classify(0xD000_0000).is_none());
        let text = l.to_string();
        assert!(text.contains("ecam"), "{text}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn ram_reachable_hole_not(
            pages in 1u64..(5 * GIB / PAGE_SIZE),
            probes in proptest::collection::vec(any::<u64>(), 64),
        ) {
            let l = b().ram_size(pages * PAGE_SIZE).build().unwrap();
            let mem = l.create_memory().unwrap();
            let total: u64 = mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
            prop_assert_eq!(total, pages * PAGE_SIZE);
            let ram = l.ram_ranges();
            for p in probes {
                // Half of the probes land in RAM, half anywhere below 8 GiB.
                let addr = if p & 1 == 0 {
                    let (s, sz) = ram[(p as usize >> 1) % ram.len()];
                    s + (p >> 8) % sz
                } else {
                    (p >> 1) % (8 * GIB)
                };
                let in_ram = ram.iter().any(|&(s, sz)| addr >= s && addr < s + sz);
                let ok = mem.write_obj(0xa5u8, GuestAddress(addr)).is_ok();
                prop_assert_eq!(ok, in_ram, "addr {:#x}", addr);
                if in_ram {
                    prop_assert_eq!(mem.read_obj::<u8>(GuestAddress(addr)).unwrap(), 0xa5);
                }
                let (hs, he) = l.mmio_hole();
                if addr >= hs && addr < he {
                    prop_assert!(!ok);
                }
            }
        }
    }
}
