//! Driver-side helpers (feature `test-utils`): guest memory with one split virtqueue that tests,
//! benches and fuzz targets fill the way a virtio-blk driver would, plus image helpers.
//!
//! Layout of the harness memory: descriptor table at [`DESC_TABLE`], available ring at
//! [`AVAIL_RING`], used ring at [`USED_RING`], buffers from [`BUF_START`] on.

use std::path::{Path, PathBuf};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::defs::*;
use crate::image::{DiskImage, ImageError, RawImage};

/// Guest address of the descriptor table.
pub const DESC_TABLE: u64 = 0x0;
/// Guest address of the available ring.
pub const AVAIL_RING: u64 = 0x4000;
/// Guest address of the used ring.
pub const USED_RING: u64 = 0x8000;
/// First guest address handed out for buffers.
pub const BUF_START: u64 = 0x10000;
/// Guest memory size of the harness.
pub const MEM_SIZE: u64 = 16 << 20;

/// One descriptor as a driver would write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub writable: bool,
}

/// A request placed by [`BlockHarness::add_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    /// Head descriptor index.
    pub head: u16,
    /// Where the data buffer is.
    pub data: GuestAddress,
    /// Where the status byte is.
    pub status: GuestAddress,
}

/// Guest memory with one queue, driven from the driver side.
///
/// ```
/// use vmkit_block::test_utils::BlockHarness;
/// use vmkit_block::defs::VIRTIO_BLK_T_OUT;
/// let mut h = BlockHarness::new(16);
/// let r = h.add_request(VIRTIO_BLK_T_OUT, 0, &[1u8; 512], false);
/// assert_eq!(h.avail_idx(), 1);
/// assert_eq!(h.status(&r), 0xff); // not written yet
/// ```
#[derive(Debug)]
pub struct BlockHarness {
    /// The guest memory.
    pub mem: GuestMemoryMmap,
    /// The device-side queue, configured and ready.
    pub queue: Queue,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
    buf_next: u64,
    mem_size: u64,
}

impl BlockHarness {
    /// Memory and a ready queue of `size` entries (a power of two ≤ 1024).
    pub fn new(size: u16) -> Self {
        Self::with_mem_size(size, MEM_SIZE)
    }

    /// Like [`BlockHarness::new`] with `mem_size` bytes of guest memory (at least 128 KiB).
    pub fn with_mem_size(size: u16, mem_size: u64) -> Self {
        let mem_size = mem_size.max(2 * BUF_START);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size as usize)])
            .expect("harness memory");
        let mut queue = Queue::new(size).expect("queue");
        queue.set_size(size);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        Self {
            mem,
            queue,
            size,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
            buf_next: BUF_START,
            mem_size,
        }
    }

    /// Allocate `len` bytes of buffer space (16-byte aligned), filled with `0xff`.
    pub fn alloc(&mut self, len: u32) -> GuestAddress {
        let addr = self.buf_next;
        self.buf_next = (addr + u64::from(len) + 15) & !15;
        if self.buf_next >= self.mem_size {
            self.buf_next = BUF_START;
            return self.alloc(len);
        }
        let _ = self
            .mem
            .write_slice(&vec![0xff; len as usize], GuestAddress(addr));
        GuestAddress(addr)
    }

    /// Start buffer allocation over (after every placed request completed).
    pub fn reset_buffers(&mut self) {
        self.buf_next = BUF_START;
    }

    /// Write a descriptor chain and publish it on the available ring; returns the head index.
    pub fn add_chain(&mut self, descs: &[RawDesc]) -> u16 {
        let head = self.next_desc;
        let n = descs.len();
        for (i, d) in descs.iter().enumerate() {
            let idx = (head as usize + i) % self.size as usize;
            let next = ((idx + 1) % self.size as usize) as u16;
            let mut flags = 0u16;
            if d.writable {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            self.write_desc(idx as u16, d.addr, d.len, flags, next);
        }
        self.next_desc = ((head as usize + n) % self.size as usize) as u16;
        self.publish(head);
        head
    }

    /// Write descriptor `index` verbatim (for malformed chains).
    pub fn write_desc(&mut self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(DESC_TABLE + 16 * u64::from(index));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = self.mem.write_slice(&raw, at);
    }

    /// Put `head` on the available ring.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        let _ = self
            .mem
            .write_obj(head.to_le(), GuestAddress(AVAIL_RING + 4 + 2 * slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = self
            .mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL_RING + 2));
    }

    /// The available index published so far.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Write a 16-byte request header at a new buffer; returns its address.
    pub fn header(&mut self, req_type: u32, sector: u64) -> GuestAddress {
        let a = self.alloc(VIRTIO_BLK_REQ_HDR_SIZE);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        let _ = self.mem.write_slice(&h, a);
        a
    }

    /// Place a well-formed header/data/status request. For device-readable data
    /// (`device_writes == false`) `data` is copied in; otherwise a buffer of `data.len()` bytes
    /// is reserved. An empty `data` gives a two-descriptor chain.
    pub fn add_request(
        &mut self,
        req_type: u32,
        sector: u64,
        data: &[u8],
        device_writes: bool,
    ) -> Placed {
        let hdr = self.header(req_type, sector);
        let buf = self.alloc(data.len() as u32);
        if !device_writes {
            let _ = self.mem.write_slice(data, buf);
        }
        let status = self.alloc(1);
        let mut descs = vec![RawDesc {
            addr: hdr.0,
            len: VIRTIO_BLK_REQ_HDR_SIZE,
            writable: false,
        }];
        if !data.is_empty() {
            descs.push(RawDesc {
                addr: buf.0,
                len: data.len() as u32,
                writable: device_writes,
            });
        }
        descs.push(RawDesc {
            addr: status.0,
            len: 1,
            writable: true,
        });
        let head = self.add_chain(&descs);
        Placed {
            head,
            data: buf,
            status,
        }
    }

    /// Place a discard or write-zeroes request with the given (sector, num_sectors, flags).
    pub fn add_discard(&mut self, req_type: u32, segs: &[(u64, u32, u32)]) -> Placed {
        let mut bytes = Vec::new();
        for (sector, n, flags) in segs {
            bytes.extend_from_slice(&sector.to_le_bytes());
            bytes.extend_from_slice(&n.to_le_bytes());
            bytes.extend_from_slice(&flags.to_le_bytes());
        }
        self.add_request(req_type, 0, &bytes, false)
    }

    /// The status byte of a placed request.
    pub fn status(&self, p: &Placed) -> u8 {
        self.mem.read_obj::<u8>(p.status).unwrap_or(0xee)
    }

    /// Read `len` guest bytes.
    pub fn read(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        let _ = self.mem.read_slice(&mut v, addr);
        v
    }

    /// Used-ring entries (id, len) added since the last call.
    pub fn used(&mut self) -> Vec<(u16, u32)> {
        let idx: u16 = self
            .mem
            .read_obj(GuestAddress(USED_RING + 2))
            .map(u16::from_le)
            .unwrap_or(0);
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.size);
            let at = GuestAddress(USED_RING + 4 + 8 * slot);
            let id: u32 = self.mem.read_obj(at).unwrap_or(u32::MAX);
            let len: u32 = self.mem.read_obj(GuestAddress(at.0 + 4)).unwrap_or(0);
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A temporary directory holding images; removed on drop.
#[derive(Debug)]
pub struct TempImages {
    dir: tempfile::TempDir,
}

impl TempImages {
    /// A new directory (under `/dev/shm` when `tmpfs` is true and available).
    pub fn new(tmpfs: bool) -> std::io::Result<Self> {
        let dir = if tmpfs && Path::new("/dev/shm").is_dir() {
            tempfile::tempdir_in("/dev/shm")?
        } else {
            tempfile::tempdir()?
        };
        Ok(Self { dir })
    }

    /// Path of `name` inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Create a sparse raw image `name` of `size` bytes.
    pub fn raw(&self, name: &str, size: u64) -> Result<RawImage, ImageError> {
        RawImage::create(&self.path(name), size)
    }
}

/// Read the whole disk through the trait.
pub fn read_all(disk: &mut dyn DiskImage) -> Result<Vec<u8>, ImageError> {
    let mut v = vec![0u8; disk.size() as usize];
    disk.read_at(&mut v, 0)?;
    Ok(v)
}
