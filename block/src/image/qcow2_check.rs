//! A consistency check of qcow2 images, computing what `qemu-img check` computes.
//!
//! imago, which [`Qcow2Image`](super::Qcow2Image) uses, trusts an image's refcounts: in an
//! image whose refcounts mark referenced clusters free, a write can reuse a metadata cluster
//! and lose data inside that image. [`check`] finds such images before they are opened
//! writable. It reads the file directly (not through imago, so it works on images imago would
//! mis-handle) and, like QEMU's `qcow2_check_refcounts` (`block/qcow2-refcount.c`), counts the
//! references to every cluster of the file from the metadata:
//!
//! * the header cluster (header extensions live there), the active L1 table, the refcount
//!   table, every refcount block, every L2 table, every data cluster (also zero clusters that
//!   keep an offset), every host cluster a compressed cluster touches (one reference per
//!   compressed cluster touching it), the snapshot table and each snapshot's L1 table, L2
//!   tables and data (shared clusters get several references), the persistent bitmaps'
//!   directory, tables and data, and the LUKS header;
//!
//! then compares the counts with the stored refcounts: a stored refcount lower than the
//! references is a *corruption* (the cluster could be allocated again and overwritten), a
//! higher one a *leak* (space wasted, nothing at risk). Like QEMU it also counts as
//! corruptions: misaligned tables and clusters, regions reaching a cluster or more past the end
//! of the file, reserved bits set in L1/L2/refcount-table/bitmap-table entries, a refcount
//! block whose own refcount is not 1, references overflowing the refcount width, and a
//! `QCOW_OFLAG_COPIED` flag that disagrees with `refcount == 1` (imago writes in place where
//! it is set: on a cluster shared with a snapshot that would change the snapshot).
//!
//! Versions 2 and 3, refcount widths 1 to 64 bits, cluster sizes 512 B to 2 MiB, extended L2
//! entries, and external data files (their data clusters are not in this file and are not
//! counted). The counts equal `qemu-img check`'s on every image of `tests/qcow2_check.rs`.
//!
//! **Hostile input.** The file is arbitrary bytes: an image QEMU would refuse to open
//! (bad magic or version, out-of-range `cluster_bits`/`refcount_order`, tables larger than
//! QEMU's limits, unknown incompatible features) is refused with [`ImageError::Format`];
//! otherwise the check never panics, overflows or loops, and allocates in proportion to the
//! file's cluster count (5 bytes a cluster, at most [`MAX_CLUSTERS`]) plus bounded buffers:
//! L1, L2 and bitmap tables are streamed in chunks of at most 256 KiB, refcount blocks read
//! one cluster at a time, and the refcount table (at most 8 MiB) and bitmap directory (at most
//! 64 MiB, QEMU's limits) only as far as the file holds them. Tables named many times (a
//! million L1 entries on one L2 table, 65,536 snapshots on one L1 table) are read once and
//! counted with their multiplicity, by a sweep over the table regions; L2 tables are gathered
//! in batches of 65,536 distinct offsets, each batch reading at most the whole file once.
//!
//! **Cost.** It reads the header, every L1 table, every L2 table (twice for the active
//! ones — references, then `COPIED` flags), the refcount table and every refcount block, but
//! never guest data; measured figures are in the crate README.

mod layout;
mod refs;
mod repair;
mod report;

pub(crate) use repair::repair;

pub use report::{CheckReport, Finding, MAX_FINDINGS, Referrer};

use std::path::Path;

use super::ImageError;
use super::qcow2_header::be64_at;
use layout::{Header, QCOW_MAX_L1_SIZE, bad};
use refs::{RefMap, Regions, Src, Sweep, refcount_entry};

/// Most clusters a checked file may have (QEMU refuses more than `INT_MAX` too).
pub const MAX_CLUSTERS: u64 = i32::MAX as u64;

/// Largest offset QEMU's block layer reads (`BDRV_MAX_LENGTH`: `INT64_MAX` aligned down to
/// 1 GiB); reads reaching beyond it fail with `EIO`, which its check counts as check errors.
const BDRV_MAX_LENGTH: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

/// Whether QEMU can read `len` bytes at `offset` (else `EIO`).
fn readable(offset: u64, len: u64) -> bool {
    offset <= BDRV_MAX_LENGTH && len <= BDRV_MAX_LENGTH - offset
}

/// Distinct L2 tables gathered before they are read (bounds the gathering map).
const L2_BATCH: usize = 1 << 16;

/// L1 entry bits 9..55: the L2 table offset (qcow2 specification, "L1 table entry").
const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry bits that must be zero.
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry bits 9..55: the host cluster offset.
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Standard L2 entry bits that must be zero.
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Refcount table entry bits 9..63: the refcount block offset.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Refcount table entry bits that must be zero.
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Bitmap table entry bits 9..55: the bitmap data cluster offset.
const BME_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry bits that must be zero.
const BME_TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry bit 0: the cluster reads as all ones.
const BME_TABLE_ENTRY_FLAG_ALL_ONES: u64 = 1;
/// L1/L2 entry bit 63: refcount is exactly 1 (the cluster may be written in place).
const QCOW_OFLAG_COPIED: u64 = 1 << 63;
/// L2 entry bit 62: compressed cluster.
const QCOW_OFLAG_COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry bit 0: the cluster reads as zeroes.
const QCOW_OFLAG_ZERO: u64 = 1;
/// Extended L2 bitmap: the 32 "allocated" bits.
const QCOW_L2_BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;

/// Check the qcow2 image at `path` as `qemu-img check` does (see the [module](self) docs).
///
/// Returns [`ImageError::Format`] for files that are not qcow2 images QEMU would open, and
/// [`ImageError::Io`] when the file cannot be read.
///
/// ```
/// use vmkit_block::image::{DiskImage, Qcow2Image, qcow2_check};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.qcow2");
/// Qcow2Image::create(&path, 1 << 20, None).unwrap();
/// let mut img = Qcow2Image::open(&path, false).unwrap();
/// img.write_at(&[7u8; 4096], 65536).unwrap();
/// img.flush().unwrap();
/// drop(img);
/// let report = qcow2_check::check(&path).unwrap();
/// assert!(report.is_consistent());
/// assert_eq!((report.corruptions, report.leaks), (0, 0));
/// ```
pub fn check(path: &Path) -> Result<CheckReport, ImageError> {
    let file = std::fs::File::open(path).map_err(ImageError::Io)?;
    check_file(&file)
}

/// [`check`] on an image file already open (read from only).
///
/// # Errors
/// As [`check`].
pub fn check_file(file: &std::fs::File) -> Result<CheckReport, ImageError> {
    let len = file.metadata().map_err(ImageError::Io)?.len();
    Checker::run(&Src { file, len })
}

/// The walk over one image.
struct Checker<'a> {
    src: &'a Src<'a>,
    h: Header,
    refs: RefMap,
    regions: Regions,
    out: CheckReport,
    buf: Vec<u8>,
}

/// What an L2 entry maps (QEMU's `qcow2_get_cluster_type`).
#[derive(PartialEq)]
enum Kind {
    Compressed,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Unallocated,
}

impl<'a> Checker<'a> {
    fn run(src: &'a Src<'a>) -> Result<CheckReport, ImageError> {
        let mut c = Self::references_only(src)?;
        let stored = c.compare()?;
        c.copied(&stored)?;
        Ok(c.out)
    }

    /// The references of every cluster, without comparing them to the stored refcounts.
    fn references_only(src: &'a Src<'a>) -> Result<Self, ImageError> {
        let h = layout::header(src)?;
        let cs = h.cluster_size();
        let nb = src.len.div_ceil(cs);
        if nb > MAX_CLUSTERS {
            return Err(bad("file has too many clusters to check"));
        }
        let max = if h.refcount_order == 6 {
            u64::MAX
        } else {
            (1 << (1u64 << h.refcount_order)) - 1
        };
        let mut c = Checker {
            src,
            refs: RefMap::new(nb, nb + 1, max, true),
            h,
            regions: Regions::default(),
            out: CheckReport {
                cluster_size: cs,
                ..CheckReport::default()
            },
            buf: Vec::new(),
        };
        c.references()?;
        Ok(c)
    }

    /// Count one reference of `mult` tables to `size` bytes at `offset` (QEMU's
    /// `qcow2_inc_refcounts_imrt`); whole-table regions are collected in `regions` instead.
    fn inc(&mut self, offset: u64, size: u64, mult: u64, who: Referrer, region: bool) {
        if size == 0 || mult == 0 {
            return;
        }
        let cs = self.h.cluster_size();
        let end = offset.checked_add(size);
        // QEMU's block layer reports file lengths in whole 512-byte sectors.
        let file_len = self.src.len.div_ceil(512) * 512;
        if end.is_none_or(|e| e.saturating_sub(file_len) >= cs) {
            self.out.corrupt(
                mult,
                Finding::BeyondEnd {
                    offset,
                    len: size,
                    referrer: who,
                },
            );
            return;
        }
        let last = (offset + size - 1) >> self.h.cluster_bits;
        let first = offset >> self.h.cluster_bits;
        if region {
            self.regions.push(first, last, who);
            return;
        }
        for k in first..=last {
            let over = self.refs.add(k, mult, who);
            if over > 0 {
                let f = Finding::RefcountOverflow {
                    cluster: k,
                    referrer: who,
                };
                self.out.corrupt(over, f);
            }
        }
    }

    /// Every reference the metadata makes (QEMU's `calculate_refcounts`).
    fn references(&mut self) -> Result<(), ImageError> {
        let cs = self.h.cluster_size();
        self.inc(0, cs, 1, Referrer::Header, true);
        let mut l1s = vec![(self.h.l1_table_offset, self.h.l1_size)];
        self.inc(
            self.h.l1_table_offset,
            self.h.l1_size * 8,
            1,
            Referrer::L1Table,
            true,
        );
        let (snaps, snap_bytes) = layout::snapshots(self.src, &self.h)?;
        if self.h.data_file && !snaps.is_empty() {
            let index = snaps.len() as u64;
            self.out.corrupt(1, Finding::BadSnapshot { index });
        }
        for (index, s) in snaps.iter().enumerate() {
            if s.incomplete {
                let index = index as u64;
                self.out.corrupt(1, Finding::BadSnapshot { index });
            }
            if !s.offset.is_multiple_of(cs) {
                let f = Finding::Misaligned {
                    offset: s.offset,
                    referrer: Referrer::SnapshotL1Table,
                };
                self.out.corrupt(1, f);
            } else if s.size * 8 > QCOW_MAX_L1_SIZE {
                let index = index as u64;
                self.out.corrupt(1, Finding::BadSnapshot { index });
            } else if s.size > 0 {
                self.inc(s.offset, s.size * 8, 1, Referrer::SnapshotL1Table, true);
                if readable(s.offset, s.size * 8) {
                    l1s.push((s.offset, s.size));
                } else {
                    // QEMU fails to read it (EIO), counts a check error and stops its check;
                    // this check goes on without that table.
                    self.out.check_errors += 1;
                }
            }
        }
        self.l1_tables(&l1s)?;
        self.inc(
            self.h.snapshots_offset,
            snap_bytes,
            1,
            Referrer::SnapshotTable,
            true,
        );
        let rt_bytes = self.h.refcount_table_clusters * cs;
        self.inc(
            self.h.refcount_table_offset,
            rt_bytes,
            1,
            Referrer::RefcountTable,
            true,
        );
        if let Some((o, l)) = self.h.crypto {
            self.inc(o, l, 1, Referrer::EncryptionHeader, true);
        }
        self.bitmaps()?;
        let (over, first) = std::mem::take(&mut self.regions).apply(&mut self.refs);
        if let Some((cluster, referrer)) = first {
            let f = Finding::RefcountOverflow { cluster, referrer };
            self.out.corrupt(over, f);
        }
        self.refblocks()
    }

    /// The entries of every L1 table (QEMU's `check_refcounts_l1`), then their L2 tables.
    fn l1_tables(&mut self, l1s: &[(u64, u64)]) -> Result<(), ImageError> {
        let mut sweep = Sweep::new(
            l1s.iter().map(|&(o, n)| (o, o.saturating_add(n * 8), 1)),
            self.src.len.div_ceil(8) * 8,
        );
        let mut l2s: std::collections::HashMap<u64, u64> = Default::default();
        let mut buf = std::mem::take(&mut self.buf);
        while let Some((_, mult)) = sweep.next(self.src, &mut buf)? {
            for e in buf.chunks_exact(8).map(|b| be64_at(b, 0)) {
                if e == 0 {
                    continue;
                }
                if e & L1E_RESERVED_MASK != 0 {
                    let f = Finding::ReservedBits {
                        entry: e,
                        referrer: Referrer::L2Table,
                    };
                    self.out.corrupt(mult, f);
                }
                let l2 = e & L1E_OFFSET_MASK;
                let cs = self.h.cluster_size();
                self.inc(l2, cs, mult, Referrer::L2Table, false);
                if !l2.is_multiple_of(cs) {
                    let f = Finding::Misaligned {
                        offset: l2,
                        referrer: Referrer::L2Table,
                    };
                    self.out.corrupt(mult, f);
                }
                if l2 < self.src.len {
                    let m = l2s.entry(l2).or_default();
                    *m = m.saturating_add(mult);
                }
            }
            if l2s.len() >= L2_BATCH {
                self.l2_tables(std::mem::take(&mut l2s), Self::l2_refs)?;
            }
        }
        self.buf = buf;
        self.l2_tables(l2s, Self::l2_refs)
    }

    /// Run `each` over every entry of the L2 tables `l2s` (offset → multiplicity), reading
    /// every byte once.
    fn l2_tables(
        &mut self,
        l2s: std::collections::HashMap<u64, u64>,
        mut each: impl FnMut(&mut Self, u64, u64, u64) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        let cs = self.h.cluster_size();
        let es = self.h.l2_entry_size() as usize;
        let mut sweep = Sweep::new(
            l2s.into_iter().map(|(o, m)| (o, o + cs, m)),
            self.src.len.div_ceil(16) * 16,
        );
        let mut buf = std::mem::take(&mut self.buf);
        while let Some((_, mult)) = sweep.next(self.src, &mut buf)? {
            for b in buf.chunks_exact(es) {
                let (e, bitmap) = (be64_at(b, 0), be64_at(b, 8));
                if e != 0 || bitmap != 0 {
                    each(self, e, if es == 16 { bitmap } else { 0 }, mult)?;
                }
            }
        }
        self.buf = buf;
        Ok(())
    }

    fn kind(&self, e: u64) -> Kind {
        if e & QCOW_OFLAG_COMPRESSED != 0 {
            Kind::Compressed
        } else if e & QCOW_OFLAG_ZERO != 0 && !self.h.extended_l2 {
            if e & L2E_OFFSET_MASK != 0 {
                Kind::ZeroAlloc
            } else {
                Kind::ZeroPlain
            }
        } else if e & L2E_OFFSET_MASK == 0 {
            if self.h.data_file && e & QCOW_OFLAG_COPIED != 0 {
                Kind::Normal
            } else {
                Kind::Unallocated
            }
        } else {
            Kind::Normal
        }
    }

    /// References of one L2 entry (QEMU's `check_refcounts_l2`).
    fn l2_refs(&mut self, e: u64, bitmap: u64, mult: u64) -> Result<(), ImageError> {
        let kind = self.kind(e);
        let cs = self.h.cluster_size();
        if kind != Kind::Compressed && e & L2E_STD_RESERVED_MASK != 0 {
            let f = Finding::ReservedBits {
                entry: e,
                referrer: Referrer::Data,
            };
            self.out.corrupt(mult, f);
        }
        match kind {
            Kind::Compressed => {
                if e & QCOW_OFLAG_COPIED != 0 {
                    self.out
                        .corrupt(mult, Finding::BadCompressedEntry { entry: e });
                }
                if self.h.data_file || bitmap != 0 {
                    self.out
                        .corrupt(mult, Finding::BadCompressedEntry { entry: e });
                    return Ok(());
                }
                // Compressed cluster descriptor (qcow2 specification): x = 62 - (cluster_bits
                // - 8); bits 0..x-1 host offset, bits x..61 additional 512-byte sectors.
                let x = 62 - (self.h.cluster_bits - 8);
                let coffset = e & ((1 << x) - 1);
                let sectors = ((e >> x) & ((1 << (self.h.cluster_bits - 8)) - 1)) + 1;
                let csize = sectors * 512 - (coffset & 511);
                self.inc(coffset, csize, mult, Referrer::Compressed, false);
            }
            Kind::Normal | Kind::ZeroAlloc => {
                let off = e & L2E_OFFSET_MASK;
                if (bitmap >> 32) & bitmap != 0 {
                    self.out
                        .corrupt(mult, Finding::BadSubclusterBitmap { entry: e, bitmap });
                }
                if !off.is_multiple_of(cs) {
                    let f = Finding::Misaligned {
                        offset: off,
                        referrer: Referrer::Data,
                    };
                    self.out.corrupt(mult, f);
                }
                if !self.h.data_file {
                    self.inc(off, cs, mult, Referrer::Data, false);
                }
            }
            Kind::ZeroPlain => {}
            Kind::Unallocated => {
                if bitmap & QCOW_L2_BITMAP_ALL_ALLOC != 0 {
                    self.out
                        .corrupt(mult, Finding::BadSubclusterBitmap { entry: e, bitmap });
                }
            }
        }
        Ok(())
    }

    /// Persistent bitmaps (QEMU's `qcow2_check_bitmaps_refcounts`).
    fn bitmaps(&mut self) -> Result<(), ImageError> {
        let Some(dir) = self.h.bitmaps else {
            return Ok(());
        };
        self.inc(dir.0, dir.1, 1, Referrer::BitmapDirectory, true);
        let Some(tables) = layout::bitmap_tables(self.src, &self.h, dir)? else {
            self.out.corrupt(1, Finding::BadBitmapDirectory);
            return Ok(());
        };
        for t in &tables {
            self.inc(t.offset, t.entries * 8, 1, Referrer::BitmapTable, true);
        }
        let cs = self.h.cluster_size();
        let mut sweep = Sweep::new(
            tables
                .iter()
                .map(|t| (t.offset, t.offset.saturating_add(t.entries * 8), 1)),
            self.src.len.div_ceil(8) * 8,
        );
        let mut buf = std::mem::take(&mut self.buf);
        while let Some((_, mult)) = sweep.next(self.src, &mut buf)? {
            for e in buf.chunks_exact(8).map(|b| be64_at(b, 0)) {
                let off = e & BME_TABLE_ENTRY_OFFSET_MASK;
                if e & BME_TABLE_ENTRY_RESERVED_MASK != 0
                    || (off != 0
                        && (e & BME_TABLE_ENTRY_FLAG_ALL_ONES != 0 || !off.is_multiple_of(cs)))
                {
                    self.out.corrupt(mult, Finding::BadBitmapEntry { entry: e });
                } else if off != 0 {
                    self.inc(off, cs, mult, Referrer::BitmapData, false);
                }
            }
        }
        self.buf = buf;
        Ok(())
    }

    /// The refcount table's entries.
    fn reftable(&self) -> Result<Vec<u64>, ImageError> {
        let bytes = self.h.refcount_table_clusters << self.h.cluster_bits;
        let o = self.h.refcount_table_offset;
        let inside = bytes.min(self.src.len.saturating_sub(o));
        let mut b = vec![0u8; inside.div_ceil(8) as usize * 8];
        self.src.read(&mut b, o)?;
        Ok(b.chunks_exact(8).map(|e| be64_at(e, 0)).collect())
    }

    /// References of the refcount blocks (QEMU's `check_refblocks`).
    fn refblocks(&mut self) -> Result<(), ImageError> {
        let cs = self.h.cluster_size();
        for (i, e) in self.reftable()?.into_iter().enumerate() {
            let off = e & REFT_OFFSET_MASK;
            let cluster = off >> self.h.cluster_bits;
            if e & REFT_RESERVED_MASK != 0 {
                let f = Finding::ReservedBits {
                    entry: e,
                    referrer: Referrer::RefcountBlock,
                };
                self.out.corrupt(1, f);
            } else if !off.is_multiple_of(cs) {
                let f = Finding::Misaligned {
                    offset: off,
                    referrer: Referrer::RefcountBlock,
                };
                self.out.corrupt(1, f);
            } else if cluster >= self.refs.len() {
                let f = Finding::BeyondEnd {
                    offset: off,
                    len: cs,
                    referrer: Referrer::RefcountBlock,
                };
                self.out.corrupt(1, f);
            } else if off != 0 {
                self.inc(off, cs, 1, Referrer::RefcountBlock, false);
                let references = self.refs.get(cluster);
                if references != 1 {
                    let index = i as u64;
                    let f = Finding::RefcountBlockShared { index, references };
                    self.out.corrupt(1, f);
                }
            }
        }
        Ok(())
    }

    /// Compare stored refcounts with the references (QEMU's `compare_refcounts`); returns
    /// the stored refcounts and the refcount table.
    fn compare(&mut self) -> Result<Stored, ImageError> {
        let stored = Stored {
            reftable: self.reftable()?,
            map: RefMap::new(0, self.refs.len(), u64::MAX, false),
        };
        let mut stored = stored;
        let rb_bits = self.h.cluster_bits + 3 - self.h.refcount_order;
        let cs = self.h.cluster_size();
        let mut block = vec![0u8; cs as usize];
        let mut loaded = None;
        let mut highest = 0;
        for k in 0..self.refs.len() {
            let Some(rb) = stored.block(k, rb_bits, cs) else {
                self.out.check_errors += 1;
                self.out.note(Finding::UnreadableRefcount { cluster: k });
                continue;
            };
            let refcount = match rb {
                0 => 0,
                rb => {
                    if loaded != Some(rb) {
                        self.src.read(&mut block, rb)?;
                        loaded = Some(rb);
                    }
                    let i = k & ((1 << rb_bits) - 1);
                    refcount_entry(&block, i, self.h.refcount_order)
                }
            };
            stored.map.set(k, refcount);
            let references = self.refs.get(k);
            if refcount > 0 || references > 0 {
                highest = k;
            }
            if refcount < references {
                let referrer = self.refs.referrer(k);
                let f = Finding::RefcountTooLow {
                    cluster: k,
                    refcount,
                    references,
                    referrer,
                };
                self.out.corrupt(1, f);
            } else if refcount > references {
                self.out.leaks += 1;
                let f = Finding::Leaked {
                    cluster: k,
                    refcount,
                    references,
                };
                self.out.note(f);
            }
        }
        self.out.image_end_offset = (highest + 1) * cs;
        Ok(stored)
    }

    /// The stored refcount of cluster `k`, `None` when unreadable (QEMU's
    /// `qcow2_get_refcount`).
    fn stored(&self, s: &Stored, k: u64) -> Result<Option<u64>, ImageError> {
        let rb_bits = self.h.cluster_bits + 3 - self.h.refcount_order;
        Ok(match s.block(k, rb_bits, self.h.cluster_size()) {
            None => None,
            Some(0) => Some(0),
            Some(_) if k < self.refs.len() => Some(s.map.get(k)),
            Some(rb) => {
                // Past the clusters compared: read the one entry.
                let i = k & ((1 << rb_bits) - 1);
                let byte = (i << self.h.refcount_order) / 8;
                let at = byte & !7;
                let mut b = [0u8; 8];
                self.src.read(&mut b, rb + at)?;
                let first = (at * 8) >> self.h.refcount_order;
                Some(refcount_entry(&b, i - first, self.h.refcount_order))
            }
        })
    }

    /// `QCOW_OFLAG_COPIED` of the active tables (QEMU's `check_oflag_copied`).
    fn copied(&mut self, stored: &Stored) -> Result<(), ImageError> {
        let o = self.h.l1_table_offset;
        let mut sweep = Sweep::new(
            [(o, o + self.h.l1_size * 8, 1)],
            self.src.len.div_ceil(8) * 8,
        );
        let mut l2s: std::collections::HashMap<u64, u64> = Default::default();
        let mut buf = std::mem::take(&mut self.buf);
        let check = |c: &mut Self, e: u64, rc: u64, referrer: Referrer, mult: u64| {
            if (rc == 1) != (e & QCOW_OFLAG_COPIED != 0) {
                let f = Finding::CopiedFlag {
                    entry: e,
                    refcount: rc,
                    referrer,
                };
                c.out.corrupt(mult, f);
            }
        };
        while let Some((_, _)) = sweep.next(self.src, &mut buf)? {
            for e in buf.chunks_exact(8).map(|b| be64_at(b, 0)) {
                let l2 = e & L1E_OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                let Some(rc) = self.stored(stored, l2 >> self.h.cluster_bits)? else {
                    continue;
                };
                check(self, e, rc, Referrer::L2Table, 1);
                if l2 < self.src.len {
                    *l2s.entry(l2).or_default() += 1;
                }
            }
            if l2s.len() >= L2_BATCH {
                self.copied_l2(std::mem::take(&mut l2s), stored, check)?;
            }
        }
        self.buf = buf;
        self.copied_l2(l2s, stored, check)
    }

    /// Check the `COPIED` flag of every data entry of the L2 tables `l2s` against the stored
    /// refcount of its cluster.
    fn copied_l2(
        &mut self,
        l2s: std::collections::HashMap<u64, u64>,
        stored: &Stored,
        check: impl Fn(&mut Self, u64, u64, Referrer, u64),
    ) -> Result<(), ImageError> {
        self.l2_tables(l2s, |this, e, _bitmap, mult| {
            if !matches!(this.kind(e), Kind::Normal | Kind::ZeroAlloc) {
                return Ok(());
            }
            let rc = if this.h.data_file {
                Some(1)
            } else {
                this.stored(stored, (e & L2E_OFFSET_MASK) >> this.h.cluster_bits)?
            };
            if let Some(rc) = rc {
                check(this, e, rc, Referrer::Data, mult);
            }
            Ok(())
        })
    }
}

/// The stored refcounts: the refcount table and the refcounts of the compared clusters.
struct Stored {
    reftable: Vec<u64>,
    map: RefMap,
}

impl Stored {
    /// The refcount block holding cluster `k`'s refcount: `Some(0)` when there is none (the
    /// refcount is 0), `None` when it is misaligned or beyond what QEMU can read (unreadable).
    fn block(&self, k: u64, rb_bits: u32, cs: u64) -> Option<u64> {
        let idx = usize::try_from(k >> rb_bits).unwrap_or(usize::MAX);
        let off = self.reftable.get(idx).copied().unwrap_or(0) & REFT_OFFSET_MASK;
        (off.is_multiple_of(cs) && readable(off, cs)).then_some(off)
    }
}
