//! The header, its extensions, the snapshot table and the bitmap directory, read with the
//! limits QEMU applies when it opens an image (`block/qcow2.c` `qcow2_do_open`): an image QEMU
//! would not open is refused here with [`ImageError::Format`].

use super::refs::Src;
use crate::image::ImageError;
use crate::image::qcow2_header::{FIXED_HEADER_BYTES, HeaderFields, be32_at, be64_at};

/// Largest L1 table QEMU accepts, in bytes (`QCOW_MAX_L1_SIZE`).
pub(super) const QCOW_MAX_L1_SIZE: u64 = 32 << 20;
/// Largest refcount table QEMU accepts, in bytes (`QCOW_MAX_REFTABLE_SIZE`).
const QCOW_MAX_REFTABLE_SIZE: u64 = 8 << 20;
/// Most internal snapshots (`QCOW_MAX_SNAPSHOTS`).
const QCOW_MAX_SNAPSHOTS: u64 = 65536;
/// Largest snapshot table, in bytes (`QCOW_MAX_SNAPSHOTS_SIZE`).
const QCOW_MAX_SNAPSHOTS_SIZE: u64 = 1024 * QCOW_MAX_SNAPSHOTS;
/// Largest extra data of one snapshot table entry (`QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
const QCOW_MAX_SNAPSHOT_EXTRA_DATA: u64 = 1024;
/// Most persistent bitmaps (`QCOW2_MAX_BITMAPS`).
const QCOW2_MAX_BITMAPS: u64 = 65535;
/// Largest bitmap directory, in bytes (`QCOW2_MAX_BITMAP_DIRECTORY_SIZE`).
const QCOW2_MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * QCOW2_MAX_BITMAPS;
/// Largest bitmap table, in entries (`BME_MAX_TABLE_SIZE`).
const BME_MAX_TABLE_SIZE: u64 = 0x800_0000;

/// Incompatible feature bits this check understands: dirty, corrupt, external data file,
/// compression type, extended L2 entries (qcow2 specification, "incompatible_features").
const KNOWN_INCOMPATIBLE: u64 = 0x1f;
/// Incompatible feature bit 2: guest data lives in an external data file.
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not zlib.
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (32 subclusters per cluster).
const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
const AUTOCLEAR_BITMAPS: u64 = 1;
/// `crypt_method` of LUKS encryption.
const QCOW_CRYPT_LUKS: u32 = 2;

/// Header extension types (qcow2 specification, "Header extensions").
const EXT_END: u32 = 0;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;

/// What the check needs from the header.
pub(super) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub l1_size: u64,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u64,
    pub nb_snapshots: u64,
    pub snapshots_offset: u64,
    pub refcount_order: u32,
    pub data_file: bool,
    pub extended_l2: bool,
    /// The LUKS header's `(offset, length)`.
    pub crypto: Option<(u64, u64)>,
    /// The bitmap directory's `(offset, size, nb_bitmaps)`.
    pub bitmaps: Option<(u64, u64, u64)>,
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Bytes of one L2 entry: 16 with extended L2 entries, else 8.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 { 16 } else { 8 }
    }
}

pub(super) use crate::image::qcow2_header::bad;

/// Whether `offset` is a valid table offset for `bytes` of table (QEMU's
/// `validate_table_offset`: no overflow, cluster aligned).
fn table_ok(offset: u64, bytes: u64, cs: u64) -> bool {
    offset
        .checked_add(bytes)
        .is_some_and(|e| e <= i64::MAX as u64)
        && offset.is_multiple_of(cs)
}

/// Read and validate the header and its extensions.
pub(super) fn header(src: &Src<'_>) -> Result<Header, ImageError> {
    let mut bytes = [0u8; FIXED_HEADER_BYTES];
    src.read(&mut bytes, 0)?;
    let h = HeaderFields::new(bytes);
    let (cluster_bits, header_length) = h.validate_frame(src.len)?;
    let version = h.version();
    let cs = 1u64 << cluster_bits;
    let (incompat, autoclear, refcount_order) = (
        h.incompatible_features(),
        h.autoclear_features(),
        h.refcount_order(),
    );
    if incompat & !KNOWN_INCOMPATIBLE != 0 {
        return Err(bad("unknown incompatible features"));
    }
    if refcount_order > 6 {
        return Err(bad("refcount_order out of range"));
    }
    let extended_l2 = incompat & INCOMPAT_EXTL2 != 0;
    if extended_l2 && cluster_bits < 14 {
        return Err(bad("extended L2 entries need clusters of 16 KiB or more"));
    }
    let l1_size = h.l1_size();
    let l1_table_offset = h.l1_table_offset();
    if l1_size * 8 > QCOW_MAX_L1_SIZE || !table_ok(l1_table_offset, l1_size * 8, cs) {
        return Err(bad("invalid L1 table"));
    }
    let size = h.size();
    let entry = if extended_l2 { 16 } else { 8 };
    // Bytes one L1 entry maps: a cluster of L2 entries, each mapping a cluster.
    let per_l1 = (cs / entry) << cluster_bits;
    let needed = size.div_ceil(per_l1);
    if needed > i32::MAX as u64 {
        return Err(bad("disk size too large"));
    }
    if needed > l1_size {
        return Err(bad("L1 table too small for the disk size"));
    }
    if h.crypt_method() > QCOW_CRYPT_LUKS {
        return Err(bad("unknown encryption method"));
    }
    // Compression type: zlib (0) without incompatible bit 3, zstd (1) with it.
    let compression = h.compression_type();
    if compression > 1 || (compression == 1) != (incompat & INCOMPAT_COMPRESSION != 0) {
        return Err(bad("invalid compression type"));
    }
    let refcount_table_clusters = h.refcount_table_clusters();
    let refcount_table_offset = h.refcount_table_offset();
    if refcount_table_clusters > QCOW_MAX_REFTABLE_SIZE / cs
        || !table_ok(refcount_table_offset, refcount_table_clusters * cs, cs)
    {
        return Err(bad("invalid refcount table"));
    }
    let nb_snapshots = h.nb_snapshots();
    let snapshots_offset = h.snapshots_offset();
    if nb_snapshots > QCOW_MAX_SNAPSHOTS || !table_ok(snapshots_offset, nb_snapshots * 40, cs) {
        return Err(bad("invalid snapshot table"));
    }
    let backing_file_offset = h.backing_file_offset();
    if backing_file_offset > cs {
        return Err(bad("invalid backing file offset"));
    }
    let mut out = Header {
        version,
        cluster_bits,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
        refcount_order,
        data_file: incompat & INCOMPAT_DATA_FILE != 0,
        extended_l2,
        crypto: None,
        bitmaps: None,
    };
    let ext_end = if backing_file_offset != 0 {
        backing_file_offset
    } else {
        cs
    };
    extensions(
        src,
        &mut out,
        header_length,
        ext_end,
        autoclear,
        h.crypt_method(),
    )?;
    Ok(out)
}

/// Walk the header extensions from `start` to `end` (QEMU's `qcow2_read_extensions`).
fn extensions(
    src: &Src<'_>,
    h: &mut Header,
    start: u64,
    end: u64,
    autoclear: u64,
    crypt_method: u32,
) -> Result<(), ImageError> {
    let cs = h.cluster_size();
    let mut off = start;
    while off < end {
        let mut e = [0u8; 8 + 24];
        src.read(&mut e, off)?;
        let (ty, len) = (be32_at(&e, 0), u64::from(be32_at(&e, 4)));
        off += 8;
        if off > end || len > end - off {
            return Err(bad("header extension too large"));
        }
        match ty {
            EXT_END => return Ok(()),
            EXT_BITMAPS if autoclear & AUTOCLEAR_BITMAPS != 0 => {
                if len != 24 || be32_at(&e, 12) != 0 {
                    return Err(bad("invalid bitmaps extension"));
                }
                let nb = u64::from(be32_at(&e, 8));
                let (dir_size, dir_offset) = (be64_at(&e, 16), be64_at(&e, 24));
                if nb == 0
                    || nb > QCOW2_MAX_BITMAPS
                    || dir_size > QCOW2_MAX_BITMAP_DIRECTORY_SIZE
                    || !table_ok(dir_offset, dir_size, cs)
                {
                    return Err(bad("invalid bitmaps extension"));
                }
                h.bitmaps = Some((dir_offset, dir_size, nb));
            }
            EXT_CRYPTO if crypt_method == QCOW_CRYPT_LUKS => {
                if len != 16 {
                    return Err(bad("invalid encryption header extension"));
                }
                let (o, l) = (be64_at(&e, 8), be64_at(&e, 16));
                if !table_ok(o, l, cs) {
                    return Err(bad("invalid encryption header extension"));
                }
                h.crypto = Some((o, l));
            }
            _ => {}
        }
        off += len.div_ceil(8) * 8;
    }
    Ok(())
}

/// One snapshot's L1 table.
pub(super) struct SnapshotL1 {
    pub offset: u64,
    pub size: u64,
    /// A version 3 entry without the required extra data (VM state size and disk size):
    /// QEMU's check counts it as a corruption ("snapshot table entry is incomplete").
    pub incomplete: bool,
}

/// Read the snapshot table (QEMU's `qcow2_read_snapshots`): the snapshots' L1 tables and the
/// table's length in bytes. Snapshot IDs and names are skipped, never read.
pub(super) fn snapshots(src: &Src<'_>, h: &Header) -> Result<(Vec<SnapshotL1>, u64), ImageError> {
    let mut out = Vec::new();
    let mut off = h.snapshots_offset;
    for _ in 0..h.nb_snapshots {
        off = off.div_ceil(8) * 8;
        let mut e = [0u8; 40];
        src.read(&mut e, off)?;
        let extra = u64::from(be32_at(&e, 36));
        if extra > QCOW_MAX_SNAPSHOT_EXTRA_DATA {
            return Err(bad("snapshot extra data too large"));
        }
        let ids = u64::from(u16::from_be_bytes([e[12], e[13]]));
        let names = u64::from(u16::from_be_bytes([e[14], e[15]]));
        out.push(SnapshotL1 {
            offset: be64_at(&e, 0),
            size: u64::from(be32_at(&e, 8)),
            incomplete: h.version >= 3 && extra < 16,
        });
        off += 40 + extra + ids + names;
        if off - h.snapshots_offset > QCOW_MAX_SNAPSHOTS_SIZE {
            return Err(bad("snapshot table too large"));
        }
    }
    Ok((out, off - h.snapshots_offset))
}

/// One persistent bitmap's table.
pub(super) struct BitmapTable {
    pub offset: u64,
    pub entries: u64,
}

/// Parse the bitmap directory (QEMU's `bitmap_list_load` and `check_dir_entry`); `None` when
/// it is inconsistent, which QEMU counts as one corruption.
pub(super) fn bitmap_tables(
    src: &Src<'_>,
    h: &Header,
    (offset, size, nb): (u64, u64, u64),
) -> Result<Option<Vec<BitmapTable>>, ImageError> {
    // Read only what the file holds; the rest reads as zeroes, which no valid entry is.
    let inside = size.min(src.len.saturating_sub(offset));
    let mut dir = vec![0u8; inside as usize];
    src.read(&mut dir, offset)?;
    let cs = h.cluster_size();
    let mut out = Vec::new();
    let mut at = 0u64;
    while at < size {
        let e = usize::try_from(at).unwrap_or(usize::MAX);
        if at + 24 > size || out.len() as u64 >= nb {
            return Ok(None);
        }
        let table_offset = be64_at(&dir, e);
        let entries = u64::from(be32_at(&dir, e + 8));
        let flags = be32_at(&dir, e + 12);
        let ty = dir.get(e + 16).copied().unwrap_or(0);
        let gran = dir.get(e + 17).copied().unwrap_or(0);
        let name = u64::from(u16::from_be_bytes([
            dir.get(e + 18).copied().unwrap_or(0),
            dir.get(e + 19).copied().unwrap_or(0),
        ]));
        let extra = u64::from(be32_at(&dir, e + 20));
        let len = (24 + name + extra).div_ceil(8) * 8;
        let bad_entry = extra != 0
            || name == 0
            || name > 1023
            || entries == 0
            || table_offset == 0
            || !table_offset.is_multiple_of(cs)
            || entries > BME_MAX_TABLE_SIZE
            || !(9..=31).contains(&gran)
            || flags & !3 != 0
            || ty != 1
            || at + len > size;
        if bad_entry {
            return Ok(None);
        }
        out.push(BitmapTable {
            offset: table_offset,
            entries,
        });
        at += len;
    }
    Ok((out.len() as u64 == nb).then_some(out))
}
