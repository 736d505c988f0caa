//! Pure parsing of virtio-blk requests (virtio 1.2 §5.2.6): descriptor chain → [`Request`].
//!
//! No disk I/O happens here; guest memory is only read (the 16-byte header and the
//! discard/write-zeroes segments) and every buffer is checked to lie inside guest memory with
//! the right direction. The layout accepted is the one every driver uses: the header in the
//! first descriptor (device-readable, at least 16 bytes), data in the middle descriptors, the
//! status byte in the last descriptor (device-writable, at least 1 byte).
//!
//! A chain that cannot be parsed becomes a [`Rejected`] that says which status byte to write
//! (`VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`) — or none at all when no valid status
//! descriptor exists, in which case the chain is returned with used length 0.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress, GuestMemory, Permissions};

use crate::defs::*;

/// Errors a guest's request can contain. Each maps to a status byte via [`RequestError::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain yielded no descriptor (bad head index or descriptor table outside memory).
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain continues past the queue size, loops, or its next descriptor is unreadable.
    #[error("descriptor chain longer than the queue or broken")]
    ChainTooLong,
    /// The last descriptor is device-readable, so it cannot hold the status.
    #[error("status descriptor is not writable")]
    StatusNotWritable,
    /// The last descriptor has length 0.
    #[error("status descriptor too short")]
    StatusTooShort,
    /// The status byte lies outside guest memory.
    #[error("status descriptor outside guest memory")]
    StatusOutsideMemory,
    /// The first descriptor is shorter than the 16-byte header.
    #[error("request header shorter than 16 bytes")]
    HeaderTooShort,
    /// The first descriptor is device-writable.
    #[error("request header is device-writable")]
    HeaderNotReadable,
    /// The header lies outside guest memory.
    #[error("request header outside guest memory")]
    HeaderOutsideMemory,
    /// The request type is not one this device implements.
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    /// The request type needs a feature that was not negotiated.
    #[error("request type {0} needs a feature that was not negotiated")]
    FeatureNotNegotiated(u32),
    /// A data descriptor has the wrong direction for the request type.
    #[error("data descriptor has the wrong direction")]
    DataWrongDirection,
    /// A data descriptor lies outside guest memory.
    #[error("data descriptor outside guest memory")]
    DataOutsideMemory,
    /// Data length of a read/write is not a multiple of 512.
    #[error("data length is not a multiple of the sector size")]
    DataNotSectorMultiple,
    /// More data segments than `seg_max`.
    #[error("too many data segments")]
    TooManySegments,
    /// The access reaches beyond the disk capacity (or overflows u64).
    #[error("access beyond the disk capacity")]
    BeyondCapacity,
    /// A write-class request on a read-only device.
    #[error("write to a read-only device")]
    ReadOnly,
    /// A discard/write-zeroes segment has reserved or disallowed flag bits.
    #[error("bad discard/write-zeroes flags {0:#x}")]
    BadFlags(u32),
    /// Discard/write-zeroes data is not a whole number of 16-byte segments, or is empty.
    #[error("bad discard/write-zeroes segment layout")]
    BadSegmentLayout,
    /// A data segment exceeds `size_max`, or a discard/write-zeroes segment exceeds
    /// `max_discard_sectors`.
    #[error("segment too large")]
    SegmentTooLarge,
}

impl RequestError {
    /// The status byte the device writes for this error, or `None` when there is no usable
    /// status descriptor (the chain is returned with used length 0).
    pub fn status(&self) -> Option<u8> {
        use RequestError::*;
        match self {
            EmptyChain | ChainTooLong | StatusNotWritable | StatusTooShort
            | StatusOutsideMemory => None,
            UnsupportedType(_) | FeatureNotNegotiated(_) | BadFlags(_) => {
                Some(VIRTIO_BLK_S_UNSUPP as u8)
            }
            _ => Some(VIRTIO_BLK_S_IOERR as u8),
        }
    }
}

/// What the parser needs to know about the device and the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseConfig {
    /// Disk capacity in 512-byte sectors.
    pub capacity: u64,
    /// The device is read-only (`VIRTIO_BLK_F_RO`).
    pub read_only: bool,
    /// Maximum data segments per request (`seg_max`).
    pub seg_max: u32,
    /// Maximum bytes per data segment (`size_max`).
    pub size_max: u32,
    /// `VIRTIO_BLK_F_FLUSH` negotiated.
    pub flush: bool,
    /// `VIRTIO_BLK_F_DISCARD` negotiated.
    pub discard: bool,
    /// `VIRTIO_BLK_F_WRITE_ZEROES` negotiated.
    pub write_zeroes: bool,
    /// `max_discard_sectors` / `max_write_zeroes_sectors` per segment.
    pub max_discard_sectors: u32,
    /// `max_discard_seg` / `max_write_zeroes_seg`.
    pub max_discard_seg: u32,
}

impl ParseConfig {
    /// A configuration with every optional request type enabled.
    pub fn all_features(capacity: u64) -> Self {
        Self {
            capacity,
            read_only: false,
            seg_max: 128,
            size_max: u32::MAX,
            flush: true,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: u32::MAX >> SECTOR_SHIFT,
            max_discard_seg: 32,
        }
    }
}

/// One guest buffer of a read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSegment {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// One `struct virtio_blk_discard_write_zeroes` range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardSegment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP` (write-zeroes only).
    pub unmap: bool,
}

/// A parsed request: what to do, without having done anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`: read `sector..` into the (device-writable) segments.
    In {
        /// First sector.
        sector: u64,
        /// Destination buffers.
        data: Vec<DataSegment>,
    },
    /// `VIRTIO_BLK_T_OUT`: write the (device-readable) segments at `sector`.
    Out {
        /// First sector.
        sector: u64,
        /// Source buffers.
        data: Vec<DataSegment>,
    },
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: write the 20-byte ID into the segments.
    GetId {
        /// Destination buffers.
        data: Vec<DataSegment>,
    },
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard(Vec<DiscardSegment>),
    /// `VIRTIO_BLK_T_WRITE_ZEROES`.
    WriteZeroes(Vec<DiscardSegment>),
}

/// A request ready for execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Head index of its descriptor chain (for the used ring).
    pub head_index: u16,
    /// What to do.
    pub kind: RequestKind,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

impl Request {
    /// Total bytes of the data segments (read/write/get-id payload).
    #[inline]
    pub fn data_len(&self) -> u64 {
        match &self.kind {
            RequestKind::In { data, .. }
            | RequestKind::Out { data, .. }
            | RequestKind::GetId { data } => data.iter().map(|d| u64::from(d.len)).sum(),
            _ => 0,
        }
    }
}

impl Request {
    /// The request's data segments vector (emptied), to hand to [`parse_reusing`] for the
    /// next request; `None` for requests without data segments.
    #[inline]
    pub fn into_segments(self) -> Option<Vec<DataSegment>> {
        match self.kind {
            RequestKind::In { mut data, .. }
            | RequestKind::Out { mut data, .. }
            | RequestKind::GetId { mut data } => {
                data.clear();
                Some(data)
            }
            _ => None,
        }
    }
}

/// A chain that could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// Head index of the chain.
    pub head_index: u16,
    /// Where to write the status byte, when the status descriptor was usable.
    pub status_addr: Option<GuestAddress>,
    /// Why.
    pub error: RequestError,
}

/// Most descriptors a chain can have (the largest split queue).
const MAX_CHAIN: usize = 32768;

/// Parse one descriptor chain.
///
/// ```
/// use virtio_queue::desc::{RawDescriptor, split::Descriptor};
/// use virtio_queue::mock::MockSplitQueue;
/// use virtio_queue::QueueOwnedT;
/// use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
/// use vmkit_block::request::{parse, ParseConfig, RequestKind};
///
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// let q = MockSplitQueue::new(&mem, 16);
/// mem.write_slice(&[0u8; 16], GuestAddress(0x1000)).unwrap(); // type IN, sector 0
/// let descs = [
///     RawDescriptor::from(Descriptor::new(0x1000, 16, 0, 0)),
///     RawDescriptor::from(Descriptor::new(0x2000, 512, VRING_DESC_F_WRITE as u16, 0)),
///     RawDescriptor::from(Descriptor::new(0x3000, 1, VRING_DESC_F_WRITE as u16, 0)),
/// ];
/// q.build_desc_chain(&descs).unwrap();
/// let mut queue = q.create_queue::<virtio_queue::Queue>().unwrap();
/// let chain = queue.iter(&mem).unwrap().next().unwrap();
/// let req = parse(chain, &ParseConfig::all_features(8)).unwrap();
/// assert!(matches!(req.kind, RequestKind::In { sector: 0, .. }));
/// ```
pub fn parse<M>(chain: DescriptorChain<M>, cfg: &ParseConfig) -> Result<Request, Rejected>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    parse_with(chain, cfg, &mut Vec::with_capacity(4))
}

/// [`parse`] collecting the descriptors into `scratch` (cleared first), so a caller parsing
/// many chains allocates once.
pub fn parse_with<M>(
    chain: DescriptorChain<M>,
    cfg: &ParseConfig,
    scratch: &mut Vec<Descriptor>,
) -> Result<Request, Rejected>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    parse_reusing(chain, cfg, scratch, Vec::new())
}

/// [`parse_with`] that also reuses `data` (emptied first) for the request's data segments, so
/// a loop that hands back each finished request's segments ([`Request::into_segments`])
/// parses reads and writes without allocating.
pub fn parse_reusing<M>(
    chain: DescriptorChain<M>,
    cfg: &ParseConfig,
    scratch: &mut Vec<Descriptor>,
    data: Vec<DataSegment>,
) -> Result<Request, Rejected>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let head_index = chain.head_index();
    scratch.clear();
    for d in chain.clone() {
        if scratch.len() >= MAX_CHAIN {
            break;
        }
        scratch.push(d);
    }
    parse_descriptors_into(chain.memory(), head_index, scratch, cfg, data)
}

/// Parse a chain given as the descriptors its iterator yielded (the core of [`parse`]).
///
/// `descs` is what `DescriptorChain` produced: it stops early on a loop, a chain longer than the
/// queue or an unreadable descriptor, which shows as a last descriptor that still has
/// `VIRTQ_DESC_F_NEXT` set.
pub fn parse_descriptors<M: GuestMemory + ?Sized>(
    mem: &M,
    head_index: u16,
    descs: &[Descriptor],
    cfg: &ParseConfig,
) -> Result<Request, Rejected> {
    parse_descriptors_into(mem, head_index, descs, cfg, Vec::new())
}

fn parse_descriptors_into<M: GuestMemory + ?Sized>(
    mem: &M,
    head_index: u16,
    descs: &[Descriptor],
    cfg: &ParseConfig,
    data_buf: Vec<DataSegment>,
) -> Result<Request, Rejected> {
    let reject = |status_addr, error| Rejected {
        head_index,
        status_addr,
        error,
    };
    let (Some(first), Some(last)) = (descs.first(), descs.last()) else {
        return Err(reject(None, RequestError::EmptyChain));
    };
    if last.has_next() {
        return Err(reject(None, RequestError::ChainTooLong));
    }
    // The status descriptor: last, device-writable, at least one byte, inside memory.
    if !last.is_write_only() {
        return Err(reject(None, RequestError::StatusNotWritable));
    }
    if last.len() < 1 {
        return Err(reject(None, RequestError::StatusTooShort));
    }
    if !crate::guest::check(mem, last.addr(), 1, Permissions::Write) {
        return Err(reject(None, RequestError::StatusOutsideMemory));
    }
    let status_addr = last.addr();
    let fail = |error| Err(reject(Some(status_addr), error));
    if descs.len() < 2 {
        return fail(RequestError::HeaderTooShort);
    }

    // The header: first descriptor, device-readable, 16 bytes.
    if first.is_write_only() {
        return fail(RequestError::HeaderNotReadable);
    }
    if first.len() < VIRTIO_BLK_REQ_HDR_SIZE {
        return fail(RequestError::HeaderTooShort);
    }
    let Some(hdr) =
        crate::guest::read_obj::<_, [u8; VIRTIO_BLK_REQ_HDR_SIZE as usize]>(mem, first.addr())
    else {
        return fail(RequestError::HeaderOutsideMemory);
    };
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);

    let data_descs = descs.get(1..descs.len() - 1).unwrap_or(&[]);
    let kind = match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let is_write = req_type == VIRTIO_BLK_T_OUT;
            if is_write && cfg.read_only {
                return fail(RequestError::ReadOnly);
            }
            let data = match data_segments(mem, data_descs, !is_write, cfg, data_buf) {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            let len: u64 = data.iter().map(|d| u64::from(d.len)).sum();
            if !len.is_multiple_of(SECTOR_SIZE) {
                return fail(RequestError::DataNotSectorMultiple);
            }
            if !within_capacity(sector, len >> SECTOR_SHIFT, cfg.capacity) {
                return fail(RequestError::BeyondCapacity);
            }
            if is_write {
                RequestKind::Out { sector, data }
            } else {
                RequestKind::In { sector, data }
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if !cfg.flush {
                return fail(RequestError::FeatureNotNegotiated(req_type));
            }
            RequestKind::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            let data = match data_segments(mem, data_descs, true, cfg, data_buf) {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            RequestKind::GetId { data }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let is_discard = req_type == VIRTIO_BLK_T_DISCARD;
            if (is_discard && !cfg.discard) || (!is_discard && !cfg.write_zeroes) {
                return fail(RequestError::FeatureNotNegotiated(req_type));
            }
            if cfg.read_only {
                return fail(RequestError::ReadOnly);
            }
            let segs = match discard_segments(mem, data_descs, is_discard, cfg) {
                Ok(s) => s,
                Err(e) => return fail(e),
            };
            if is_discard {
                RequestKind::Discard(segs)
            } else {
                RequestKind::WriteZeroes(segs)
            }
        }
        other => return fail(RequestError::UnsupportedType(other)),
    };
    Ok(Request {
        head_index,
        kind,
        status_addr,
    })
}

/// `sector + count <= capacity`, without overflow.
fn within_capacity(sector: u64, count: u64, capacity: u64) -> bool {
    sector.checked_add(count).is_some_and(|end| end <= capacity)
}

/// Check the data descriptors' direction and memory, and collect them.
fn data_segments<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
    device_writes: bool,
    cfg: &ParseConfig,
    mut out: Vec<DataSegment>,
) -> Result<Vec<DataSegment>, RequestError> {
    if descs.len() > cfg.seg_max as usize {
        return Err(RequestError::TooManySegments);
    }
    let perm = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    out.clear();
    out.reserve(descs.len());
    for d in descs {
        if d.is_write_only() != device_writes {
            return Err(RequestError::DataWrongDirection);
        }
        if d.len() > cfg.size_max {
            return Err(RequestError::SegmentTooLarge);
        }
        if !crate::guest::check(mem, d.addr(), d.len() as usize, perm) {
            return Err(RequestError::DataOutsideMemory);
        }
        out.push(DataSegment {
            addr: d.addr(),
            len: d.len(),
        });
    }
    Ok(out)
}

/// Read and check the `virtio_blk_discard_write_zeroes` segments.
fn discard_segments<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
    is_discard: bool,
    cfg: &ParseConfig,
) -> Result<Vec<DiscardSegment>, RequestError> {
    let mut out = Vec::new();
    for d in descs {
        if d.is_write_only() {
            return Err(RequestError::DataWrongDirection);
        }
        if !d.len().is_multiple_of(VIRTIO_BLK_DISCARD_WRITE_ZEROES_SIZE) {
            return Err(RequestError::BadSegmentLayout);
        }
        let n = d.len() / VIRTIO_BLK_DISCARD_WRITE_ZEROES_SIZE;
        if out.len() as u64 + u64::from(n) > u64::from(cfg.max_discard_seg) {
            return Err(RequestError::TooManySegments);
        }
        for i in 0..n {
            let addr = d
                .addr()
                .checked_add(u64::from(i * VIRTIO_BLK_DISCARD_WRITE_ZEROES_SIZE))
                .ok_or(RequestError::DataOutsideMemory)?;
            let raw = crate::guest::read_obj::<
                _,
                [u8; VIRTIO_BLK_DISCARD_WRITE_ZEROES_SIZE as usize],
            >(mem, addr)
            .ok_or(RequestError::DataOutsideMemory)?;
            let sector = u64::from_le_bytes([
                raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
            ]);
            let num_sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
            let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
            // §5.2.6.2: UNMAP is only meaningful for write-zeroes; a discard with it, or any
            // reserved bit, is unsupported.
            let allowed = if is_discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return Err(RequestError::BadFlags(flags));
            }
            if num_sectors > cfg.max_discard_sectors {
                return Err(RequestError::SegmentTooLarge);
            }
            if !within_capacity(sector, u64::from(num_sectors), cfg.capacity) {
                return Err(RequestError::BeyondCapacity);
            }
            out.push(DiscardSegment {
                sector,
                num_sectors,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            });
        }
    }
    if out.is_empty() {
        return Err(RequestError::BadSegmentLayout);
    }
    Ok(out)
}
