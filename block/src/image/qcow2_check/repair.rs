//! Repair of a dirty qcow2 image (lazy refcounts left stale by a crash): the refcounts are
//! rebuilt from the references the check computes, as `qemu-img check -r all` rebuilds them,
//! then the dirty bit is cleared.
//!
//! The repair writes into the refcount blocks the image already has. An image whose stale
//! refcount structure does not cover every referenced cluster (the crash came while a new
//! refcount block was being added) would need new blocks allocated: that is refused with
//! [`ImageError::Dirty`], which names `qemu-img check -r all` for it. Everything is computed
//! and validated before the first byte is written.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::refs::Src;
use super::{Checker, REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use crate::image::ImageError;
use crate::image::qcow2_header::be64_at;

/// Byte offset of `incompatible_features` in a version 3 header.
const INCOMPATIBLE_FEATURES_OFFSET: u64 = 72;
/// Incompatible feature bit 0: the dirty bit.
const INCOMPAT_DIRTY: u64 = 1;

/// Store refcount entry `i` of `order` (as `refs::refcount_entry` reads it) in block `b`.
fn set_refcount_entry(b: &mut [u8], i: u64, order: u32, v: u64) {
    let bits = 1u64 << order;
    let bit = i * bits;
    let byte = (bit / 8) as usize;
    if bits < 8 {
        let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
        if let Some(x) = b.get_mut(byte) {
            *x = (*x & !mask) | (((v as u8) << (bit % 8)) & mask);
        }
        return;
    }
    let n = (bits / 8) as usize;
    if let Some(s) = b.get_mut(byte..byte + n) {
        s.copy_from_slice(&v.to_be_bytes()[8 - n..]);
    }
}

/// Rebuild the refcounts of the dirty qcow2 image in `file` and clear its dirty bit.
pub(crate) fn repair(file: &File) -> Result<(), ImageError> {
    let len = file.metadata().map_err(ImageError::Io)?.len();
    let src = Src { file, len };
    let checker = Checker::references_only(&src)?;
    let h = &checker.h;
    let cs = h.cluster_size();
    let rb_bits = h.cluster_bits + 3 - h.refcount_order;
    let per_block = 1u64 << rb_bits;
    let reftable = checker.reftable()?;
    let max = if h.refcount_order == 6 {
        u64::MAX
    } else {
        (1u64 << (1u64 << h.refcount_order)) - 1
    };
    // Validate: every referenced cluster has a usable block, no count overflows.
    let clusters = checker.refs.len();
    let block_of = |k: u64| -> Option<u64> {
        let e = *reftable.get(usize::try_from(k >> rb_bits).ok()?)?;
        let off = e & REFT_OFFSET_MASK;
        (e & REFT_RESERVED_MASK == 0 && off != 0 && off.is_multiple_of(cs) && off + cs <= len)
            .then_some(off)
    };
    for k in 0..clusters {
        let refs = checker.refs.get(k);
        if refs > 0 && (block_of(k).is_none() || refs > max) {
            return Err(ImageError::Dirty);
        }
    }
    if checker.out.corruptions > 0 {
        // References beyond the file, misaligned or reserved entries: not a refcount matter.
        return Err(ImageError::Dirty);
    }
    // Write: each block covering the file, rebuilt whole.
    let mut block = vec![0u8; cs as usize];
    for (i, _) in reftable.iter().enumerate() {
        let first = i as u64 * per_block;
        if first >= clusters {
            break;
        }
        let Some(off) = block_of(first) else { continue };
        block.fill(0);
        for k in first..(first + per_block).min(clusters) {
            set_refcount_entry(&mut block, k - first, h.refcount_order, checker.refs.get(k));
        }
        file.write_all_at(&block, off).map_err(ImageError::Io)?;
    }
    file.sync_data().map_err(ImageError::Io)?;
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, INCOMPATIBLE_FEATURES_OFFSET)
        .map_err(ImageError::Io)?;
    let incompat = be64_at(&b, 0) & !INCOMPAT_DIRTY;
    file.write_all_at(&incompat.to_be_bytes(), INCOMPATIBLE_FEATURES_OFFSET)
        .map_err(ImageError::Io)?;
    file.sync_data().map_err(ImageError::Io)
}

#[cfg(test)]
mod tests {
    use super::super::refs::refcount_entry;
    use super::*;

    #[test]
    fn stored_entries_read_back_at_every_width() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 64];
            let bits = 1u64 << order;
            let n = 64 * 8 / bits;
            let max = if order == 6 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            for i in 0..n {
                set_refcount_entry(&mut b, i, order, (i * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    refcount_entry(&b, i, order),
                    (i * 7 + 3) & max,
                    "order {order}"
                );
            }
        }
    }
}
