//! What a writable qcow2 open checks first, and the last-line check on every data write.
//!
//! imago trusts an image's metadata. Where a table lies past the end of the file, reads of it
//! return zeroes; where a refcount block does, every cluster it covers (the header's among
//! them) counts as free, and the first allocation puts guest data or an L2 table over the
//! header: the write is acknowledged and the image is lost (an interrupted copy is enough to
//! make such a file). So before a writable open, [`MetadataMap::build`] requires:
//!
//! * the refcount table and the active L1 table to be cluster aligned, outside the header
//!   cluster, inside the file and apart from each other;
//! * every refcount block and every L2 table the active L1 table names to be the same:
//!   aligned, a whole cluster inside the file, outside the header cluster, and no cluster to
//!   be two of these at once;
//! * a refcount block for every cluster of the file (imago 0.2.6 otherwise creates the
//!   missing ones recursively on the next allocation: deep enough, the stack overflows).
//!
//! The clusters found form the map that [`MetadataMap::check_write`] holds every guest data
//! write against before it reaches the file, as QEMU's `qcow2_pre_write_overlap_check`
//! ("Preventing invalid allocation") does: a data write whose host range touches the header,
//! a table or a block known at open is refused, and nothing is written. (Metadata imago
//! allocates after the open is not in the map; the refcounts, checked at open, govern it.)
//!
//! It reads the header, the refcount table and the active L1 table — never an L2 table or
//! guest data — and streams both tables in 64 KiB chunks.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::ImageError;
use super::qcow2_header::{HeaderFields, be64_at};

/// L1 entry bits 9..55: the L2 table offset (qcow2 specification, "L1 table entry").
const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Refcount table entry bits 9..63: the refcount block offset.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Entries read from a table at once.
const CHUNK_ENTRIES: u64 = 8 * 1024;

/// The metadata clusters of a qcow2 file known at open, sorted.
#[derive(Debug, Default)]
pub(crate) struct MetadataMap {
    cluster_bits: u32,
    /// Cluster indices of the header, both tables, the refcount blocks and the L2 tables.
    clusters: Vec<u64>,
}

fn unsafe_layout(what: &'static str, offset: u64, why: &'static str) -> ImageError {
    ImageError::UnsafeLayout { what, offset, why }
}

impl MetadataMap {
    /// Check the layout of the qcow2 image in `file` for a writable open (see the
    /// [module](self) docs) and collect its metadata clusters.
    pub(crate) fn build(file: &File) -> Result<Self, ImageError> {
        let h = HeaderFields::read(file)?;
        let bits = h.cluster_bits();
        let order = h.refcount_order();
        if !(9..=21).contains(&bits) || order > 6 {
            return Err(ImageError::Format(std::io::Error::other(
                "qcow2: cluster_bits or refcount_order out of range",
            )));
        }
        let cs = 1u64 << bits;
        let file_len = file.metadata().map_err(ImageError::Io)?.len();
        let mut map = Self {
            cluster_bits: bits,
            clusters: vec![0],
        };
        // A table of `bytes` at `offset`: aligned, past the header cluster, inside the file.
        let table = |map: &mut Self, what, offset: u64, bytes: u64| -> Result<(), ImageError> {
            if bytes == 0 {
                return Ok(());
            }
            if !offset.is_multiple_of(cs) {
                return Err(unsafe_layout(what, offset, "not cluster aligned"));
            }
            if offset < cs {
                return Err(unsafe_layout(what, offset, "inside the header cluster"));
            }
            match offset.checked_add(bytes) {
                Some(end) if end <= file_len => {}
                _ => return Err(unsafe_layout(what, offset, "beyond the end of the file")),
            }
            map.clusters
                .extend((offset >> bits)..=((offset + bytes - 1) >> bits));
            Ok(())
        };
        let rt_offset = h.refcount_table_offset();
        let rt_clusters = h.refcount_table_clusters();
        table(
            &mut map,
            "refcount table",
            rt_offset,
            rt_clusters.saturating_mul(cs),
        )?;
        let l1_offset = h.l1_table_offset();
        let l1_size = h.l1_size();
        table(&mut map, "L1 table", l1_offset, l1_size * 8)?;

        // Refcount blocks: one for every cluster of the file, each a valid cluster.
        let rb_bits = bits + 3 - order;
        let needed = if file_len == 0 {
            0
        } else {
            (((file_len - 1) >> bits) >> rb_bits) + 1
        };
        let rt_entries = rt_clusters << (bits - 3);
        if needed > rt_entries {
            return Err(unsafe_layout(
                "refcount table",
                rt_offset,
                "too small for the file",
            ));
        }
        for_each_entry(file, rt_offset, rt_entries, |i, e| {
            let rb = e & REFT_OFFSET_MASK;
            if rb == 0 {
                if i < needed {
                    return Err(unsafe_layout(
                        "refcount table",
                        rt_offset,
                        "part of the file has no refcount block",
                    ));
                }
                return Ok(());
            }
            table(&mut map, "refcount block", rb, cs)
        })?;
        for_each_entry(file, l1_offset, l1_size, |_, e| {
            let l2 = e & L1E_OFFSET_MASK;
            if l2 == 0 {
                return Ok(());
            }
            table(&mut map, "L2 table", l2, cs)
        })?;
        map.clusters.sort_unstable();
        if let Some(w) = map.clusters.windows(2).find(|w| w[0] == w[1]) {
            return Err(unsafe_layout(
                "metadata cluster",
                w[0] << bits,
                "used twice (by two tables, or a table and a block)",
            ));
        }
        Ok(map)
    }

    /// Refuse a guest data write to `len` bytes at host offset `host` of the image file when
    /// it touches a metadata cluster ([`ImageError::MetadataOverlap`]).
    pub(crate) fn check_write(&self, host: u64, len: u64) -> Result<(), ImageError> {
        if len == 0 || self.clusters.is_empty() {
            return Ok(());
        }
        let first = host >> self.cluster_bits;
        let last = host.saturating_add(len - 1) >> self.cluster_bits;
        let i = self.clusters.partition_point(|&c| c < first);
        match self.clusters.get(i) {
            Some(&c) if c <= last => Err(ImageError::MetadataOverlap {
                host_offset: c << self.cluster_bits,
            }),
            _ => Ok(()),
        }
    }
}

/// Call `each(index, entry)` for the `count` big-endian 64-bit entries at `offset` of `file`,
/// read in chunks.
fn for_each_entry(
    file: &File,
    offset: u64,
    count: u64,
    mut each: impl FnMut(u64, u64) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let mut buf = vec![0u8; (CHUNK_ENTRIES * 8) as usize];
    let mut done = 0u64;
    while done < count {
        let n = (count - done).min(CHUNK_ENTRIES);
        let chunk = &mut buf[..(n * 8) as usize];
        file.read_exact_at(chunk, offset + done * 8)
            .map_err(ImageError::Io)?;
        for (j, e) in chunk.chunks_exact(8).enumerate() {
            each(done + j as u64, be64_at(e, 0))?;
        }
        done += n;
    }
    Ok(())
}
