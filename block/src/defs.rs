//! Constants of virtio 1.2 §5.2 (block device), named as in the specification.
//!
//! The numeric values come from `virtio-bindings` (generated from Linux's `virtio_blk.h`) where
//! that crate has them.

pub use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

/// Sector size of virtio-blk addressing: `sector` fields count 512-byte units (§5.2.6).
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;
/// Size of `struct virtio_blk_req`'s header (type, reserved, sector) (§5.2.6).
pub const VIRTIO_BLK_REQ_HDR_SIZE: u32 = 16;
/// Size of `struct virtio_blk_discard_write_zeroes` (sector, num_sectors, flags) (§5.2.6).
pub const VIRTIO_BLK_DISCARD_WRITE_ZEROES_SIZE: u32 = 16;
/// Length of the GET_ID answer: a 20-byte string, NUL-padded (§5.2.6).
pub const VIRTIO_BLK_ID_BYTES: usize = 20;

/// Size of the device configuration space we expose (`struct virtio_blk_config` up to
/// `write_zeroes_may_unmap` and its padding, §5.2.4).
pub const VIRTIO_BLK_CONFIG_SIZE: usize = 60;
