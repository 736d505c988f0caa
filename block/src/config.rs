//! Device options, the feature bits they offer and the configuration space they show
//! (`struct virtio_blk_config`, virtio 1.2 §5.2.4).

use serde::{Deserialize, Serialize};

use crate::defs::*;
use crate::rate_limiter::RateLimiterConfig;
use crate::request::ParseConfig;
use crate::worker::EngineKind;

/// Offsets of `struct virtio_blk_config` fields (virtio 1.2 §5.2.4).
pub mod offsets {
    /// `le64 capacity` (512-byte sectors).
    pub const CAPACITY: usize = 0;
    /// `le32 size_max`.
    pub const SIZE_MAX: usize = 8;
    /// `le32 seg_max`.
    pub const SEG_MAX: usize = 12;
    /// `le32 blk_size`.
    pub const BLK_SIZE: usize = 20;
    /// `u8 physical_block_exp`.
    pub const PHYSICAL_BLOCK_EXP: usize = 24;
    /// `u8 alignment_offset`.
    pub const ALIGNMENT_OFFSET: usize = 25;
    /// `le16 min_io_size`.
    pub const MIN_IO_SIZE: usize = 26;
    /// `le32 opt_io_size`.
    pub const OPT_IO_SIZE: usize = 28;
    /// `u8 writeback`.
    pub const WRITEBACK: usize = 32;
    /// `le16 num_queues`.
    pub const NUM_QUEUES: usize = 34;
    /// `le32 max_discard_sectors`.
    pub const MAX_DISCARD_SECTORS: usize = 36;
    /// `le32 max_discard_seg`.
    pub const MAX_DISCARD_SEG: usize = 40;
    /// `le32 discard_sector_alignment`.
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    /// `le32 max_write_zeroes_sectors`.
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    /// `le32 max_write_zeroes_seg`.
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    /// `u8 write_zeroes_may_unmap`.
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
}

/// How a block device is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockConfig {
    /// Offer `VIRTIO_BLK_F_RO` and refuse writes (also forced by a read-only image).
    pub read_only: bool,
    /// Queues; more than one offers `VIRTIO_BLK_F_MQ` (typically one per vCPU).
    pub num_queues: u16,
    /// Maximum size of each queue.
    pub queue_size: u16,
    /// `seg_max`: data segments per request (`VIRTIO_BLK_F_SEG_MAX`).
    pub seg_max: u32,
    /// `size_max`: bytes per segment (`VIRTIO_BLK_F_SIZE_MAX`).
    pub size_max: u32,
    /// `blk_size`: logical block size (`VIRTIO_BLK_F_BLK_SIZE`).
    pub blk_size: u32,
    /// `physical_block_exp` of the topology (`VIRTIO_BLK_F_TOPOLOGY`).
    pub physical_block_exp: u8,
    /// `min_io_size` in logical blocks.
    pub min_io_size: u16,
    /// `opt_io_size` in logical blocks.
    pub opt_io_size: u32,
    /// Offer `VIRTIO_BLK_F_FLUSH`.
    pub flush: bool,
    /// Offer `VIRTIO_BLK_F_DISCARD`.
    pub discard: bool,
    /// Offer `VIRTIO_BLK_F_WRITE_ZEROES`.
    pub write_zeroes: bool,
    /// `max_discard_sectors` and `max_write_zeroes_sectors`.
    pub max_discard_sectors: u32,
    /// `max_discard_seg` and `max_write_zeroes_seg`.
    pub max_discard_seg: u32,
    /// The GET_ID answer (at most 20 bytes are used).
    pub serial: String,
    /// Execution engine.
    pub engine: EngineKind,
    /// Rate limits.
    pub rate_limiter: RateLimiterConfig,
}

impl Default for BlockConfig {
    fn default() -> Self {
        Self {
            read_only: false,
            num_queues: 1,
            queue_size: 256,
            seg_max: 126,
            size_max: 1 << 20,
            blk_size: 512,
            physical_block_exp: 0,
            min_io_size: 1,
            opt_io_size: 0,
            flush: true,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 1 << 22,
            max_discard_seg: 32,
            serial: String::from("vmkit-block"),
            engine: EngineKind::Sync,
            rate_limiter: RateLimiterConfig::default(),
        }
    }
}

impl BlockConfig {
    /// Feature bits offered for an image that is read-only or not (`VIRTIO_F_VERSION_1`
    /// included).
    pub fn features(&self, image_read_only: bool) -> u64 {
        let mut f = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_TOPOLOGY;
        let ro = self.read_only || image_read_only;
        if ro {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.flush {
            f |= 1 << VIRTIO_BLK_F_FLUSH;
        }
        if self.discard && !ro {
            f |= 1 << VIRTIO_BLK_F_DISCARD;
        }
        if self.write_zeroes && !ro {
            f |= 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if self.num_queues > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        f
    }

    /// The configuration space for a disk of `capacity` sectors.
    pub fn config_space(&self, capacity: u64) -> [u8; VIRTIO_BLK_CONFIG_SIZE] {
        use offsets::*;
        let mut c = [0u8; VIRTIO_BLK_CONFIG_SIZE];
        let mut put = |off: usize, bytes: &[u8]| {
            if let Some(dst) = c.get_mut(off..off + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        };
        put(CAPACITY, &capacity.to_le_bytes());
        put(SIZE_MAX, &self.size_max.to_le_bytes());
        put(SEG_MAX, &self.seg_max.to_le_bytes());
        put(BLK_SIZE, &self.blk_size.to_le_bytes());
        put(PHYSICAL_BLOCK_EXP, &[self.physical_block_exp]);
        put(ALIGNMENT_OFFSET, &[0]);
        put(MIN_IO_SIZE, &self.min_io_size.to_le_bytes());
        put(OPT_IO_SIZE, &self.opt_io_size.to_le_bytes());
        put(WRITEBACK, &[0]);
        put(NUM_QUEUES, &self.num_queues.max(1).to_le_bytes());
        put(MAX_DISCARD_SECTORS, &self.max_discard_sectors.to_le_bytes());
        put(MAX_DISCARD_SEG, &self.max_discard_seg.to_le_bytes());
        put(
            DISCARD_SECTOR_ALIGNMENT,
            &(self.blk_size >> SECTOR_SHIFT).max(1).to_le_bytes(),
        );
        put(
            MAX_WRITE_ZEROES_SECTORS,
            &self.max_discard_sectors.to_le_bytes(),
        );
        put(MAX_WRITE_ZEROES_SEG, &self.max_discard_seg.to_le_bytes());
        put(WRITE_ZEROES_MAY_UNMAP, &[1]);
        c
    }

    /// The GET_ID answer: the serial, NUL-padded to 20 bytes.
    pub fn id_bytes(&self) -> [u8; VIRTIO_BLK_ID_BYTES] {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        for (d, s) in id.iter_mut().zip(self.serial.bytes()) {
            *d = s;
        }
        id
    }

    /// The parser's view given the disk capacity and the features the driver accepted.
    pub fn parse_config(&self, capacity: u64, acked: u64, image_read_only: bool) -> ParseConfig {
        let has = |bit: u32| acked & (1u64 << bit) != 0;
        ParseConfig {
            capacity,
            read_only: self.read_only || image_read_only,
            seg_max: self.seg_max,
            size_max: self.size_max,
            flush: has(VIRTIO_BLK_F_FLUSH),
            discard: has(VIRTIO_BLK_F_DISCARD),
            write_zeroes: has(VIRTIO_BLK_F_WRITE_ZEROES),
            max_discard_sectors: self.max_discard_sectors,
            max_discard_seg: self.max_discard_seg,
        }
    }
}
