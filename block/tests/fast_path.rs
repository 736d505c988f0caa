//! The queue worker's fast path for single-buffer reads and writes against its general path
//! (parser + executor): random chains around every check the fast path makes, run by two
//! workers that differ only in `with_fast_path`, must leave the same used ring, guest memory,
//! image contents and metrics. Plus: the fast path is really taken for the common request,
//! for each way it does I/O.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};
use vmkit_block::config::BlockConfig;
use vmkit_block::defs::*;
use vmkit_block::image::{DiskImage, ImageError, ImageFormat, Qcow2Image, RawImage};
use vmkit_block::metrics::{BlockMetrics, BlockMetricsSnapshot};
use vmkit_block::rate_limiter::RateLimiter;
use vmkit_block::test_utils::{BUF_START, BlockHarness, TempImages, read_all};
use vmkit_block::worker::{BlockShared, EngineKind, QueueWorker};

const DISK: u64 = 256 << 10;
const MEM: u64 = 1 << 20;
/// Guest memory per chain: header at +0, data at +0x1000, status at +0xc000.
const SLOT: u64 = 0x10000;

/// How the image does I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Raw: the fast path calls `pread`/`pwrite` on its file descriptor.
    Raw,
    /// Raw behind a wrapper without a file descriptor: the fast path calls
    /// `read_vectored`/`write_vectored`.
    RawNoFd,
    /// qcow2 (no file descriptor either).
    Qcow2,
}

/// An image that counts its vectored calls and may hide its file descriptor.
struct Probe<D> {
    inner: D,
    vectored: Arc<AtomicUsize>,
    expose_fd: bool,
}

impl<D: DiskImage> DiskImage for Probe<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn format(&self) -> ImageFormat {
        self.inner.format()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&mut self) -> Result<(), ImageError> {
        self.inner.flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), ImageError> {
        self.inner.write_zeroes(offset, len, unmap)
    }
    fn read_vectored(
        &mut self,
        bufs: &mut [IoSliceMut<'_>],
        offset: u64,
    ) -> Result<(), ImageError> {
        self.vectored.fetch_add(1, Ordering::Relaxed);
        self.inner.read_vectored(bufs, offset)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>], offset: u64) -> Result<(), ImageError> {
        self.vectored.fetch_add(1, Ordering::Relaxed);
        self.inner.write_vectored(bufs, offset)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        self.inner.raw_fd().filter(|_| self.expose_fd)
    }
}

struct Rig {
    h: BlockHarness,
    shared: BlockShared,
    worker: QueueWorker,
    vectored: Arc<AtomicUsize>,
    _dir: TempImages,
}

/// The device settings the fast path checks requests against.
#[derive(Debug, Clone, Copy)]
struct Limits {
    read_only: bool,
    size_max: u32,
    seg_max: u32,
}

const USUAL: Limits = Limits {
    read_only: false,
    size_max: u32::MAX,
    seg_max: 128,
};

fn limits() -> impl Strategy<Value = Limits> {
    (
        prop::bool::weighted(0.2),
        prop_oneof![4 => Just(u32::MAX), 1 => Just(4096u32), 1 => Just(2048u32)],
        prop_oneof![4 => Just(128u32), 1 => Just(1u32), 1 => Just(0u32)],
    )
        .prop_map(|(read_only, size_max, seg_max)| Limits {
            read_only,
            size_max,
            seg_max,
        })
}

/// A device over a fresh image of `kind` holding a byte pattern, with the fast path on or off.
fn rig(kind: Kind, fast: bool, limits: Limits) -> Rig {
    let Limits {
        read_only,
        size_max,
        seg_max,
    } = limits;
    let dir = TempImages::new(true).unwrap();
    static PATTERNS: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    let (pattern, fill) = PATTERNS.get_or_init(|| {
        (
            (0..DISK).map(|i| (i * 7 % 251) as u8).collect(),
            (0..MEM - BUF_START).map(|i| (i * 13 % 241) as u8).collect(),
        )
    });
    let vectored = Arc::new(AtomicUsize::new(0));
    let disk: Box<dyn DiskImage> = if kind == Kind::Qcow2 {
        let p = dir.path("d.qcow2");
        Qcow2Image::create(&p, DISK, None).unwrap();
        let mut q = Qcow2Image::open(&p, false).unwrap();
        q.write_at(pattern, 0).unwrap();
        drop(q);
        Box::new(Probe {
            inner: Qcow2Image::open(&p, read_only).unwrap(),
            vectored: vectored.clone(),
            expose_fd: false,
        })
    } else {
        dir.raw("d.raw", DISK)
            .unwrap()
            .write_at(pattern, 0)
            .unwrap();
        Box::new(Probe {
            inner: RawImage::open(&dir.path("d.raw"), read_only).unwrap(),
            vectored: vectored.clone(),
            expose_fd: kind == Kind::Raw,
        })
    };
    let cfg = BlockConfig {
        read_only,
        ..Default::default()
    };
    let worker = QueueWorker::new(EngineKind::Sync, &*disk, cfg.id_bytes())
        .unwrap()
        .with_fast_path(fast);
    let mut parse_cfg = cfg.parse_config(DISK / 512, cfg.features(read_only), read_only);
    parse_cfg.size_max = size_max;
    parse_cfg.seg_max = seg_max;
    let shared = BlockShared {
        parse_cfg,
        disk: Mutex::new(disk),
        metrics: BlockMetrics::default(),
        limiter: Mutex::new(RateLimiter::new(cfg.rate_limiter)),
    };
    let h = BlockHarness::with_mem_size(64, MEM);
    h.mem.write_slice(fill, GuestAddress(BUF_START)).unwrap();
    Rig {
        h,
        shared,
        worker,
        vectored,
        _dir: dir,
    }
}

/// Everything a request can change.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    used: Vec<(u16, u32)>,
    memory: Vec<u8>,
    disk: Vec<u8>,
    metrics: BlockMetricsSnapshot,
}

impl Rig {
    fn run(&mut self) -> Outcome {
        let mem = self.h.mem.clone();
        self.run_through(&mem)
    }

    /// [`Rig::run`] with the device reaching guest memory through `mem` (e.g. an IOMMU view of
    /// it); the outcome is read from the memory itself.
    fn run_through<M: vm_memory::GuestMemory>(&mut self, mem: &M) -> Outcome {
        self.worker
            .process(&mut self.h.queue, mem, &self.shared)
            .unwrap();
        let mut memory = vec![0u8; MEM as usize];
        self.h.mem.read_slice(&mut memory, GuestAddress(0)).unwrap();
        Outcome {
            used: self.h.used(),
            memory,
            disk: read_all(&mut **self.shared.disk.lock().unwrap()).unwrap(),
            metrics: self.shared.metrics.snapshot(),
        }
    }
}

/// Where a buffer goes.
#[derive(Debug, Clone, Copy)]
enum Place {
    /// Its own place in the chain's slot.
    Own,
    /// So that it ends 8 bytes past the end of guest memory.
    AcrossEnd,
    /// Outside guest memory.
    Outside,
}

#[derive(Debug, Clone)]
struct Desc {
    place: Place,
    len: u32,
    /// The direction is the wrong one for its place in the request.
    flip: bool,
}

#[derive(Debug, Clone)]
struct Chain {
    req_type: u32,
    sector: u64,
    descs: Vec<Desc>,
    /// The last descriptor has NEXT set, pointing back at the head (a loop).
    looped: bool,
}

/// One way a chain differs from the request a driver sends.
#[derive(Debug, Clone, Copy)]
enum Twist {
    Type(u32),
    Sector(u64),
    HeaderLen(u32),
    DataLen(u32),
    StatusLen(u32),
    /// Descriptor `n % len` gets this place.
    Place(usize, Place),
    /// Descriptor `n % len` gets the other direction.
    Flip(usize),
    /// No data descriptor.
    NoData,
    /// A second data descriptor of this length.
    MoreData(u32),
    Loop,
}

fn twist() -> impl Strategy<Value = Twist> {
    let cap = DISK / 512;
    let place = prop_oneof![Just(Place::AcrossEnd), Just(Place::Outside)];
    prop_oneof![
        prop::sample::select(vec![
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            99
        ])
        .prop_map(Twist::Type),
        prop::sample::select(vec![cap - 8, cap - 1, cap, u64::MAX - 3, u64::MAX >> 9])
            .prop_map(Twist::Sector),
        prop::sample::select(vec![0u32, 15, 17, 4096]).prop_map(Twist::HeaderLen),
        prop::sample::select(vec![0u32, 1, 511, 513, 2048, 2560, 8192]).prop_map(Twist::DataLen),
        prop::sample::select(vec![0u32, 2]).prop_map(Twist::StatusLen),
        (0..3usize, place).prop_map(|(n, p)| Twist::Place(n, p)),
        (0..3usize).prop_map(Twist::Flip),
        Just(Twist::NoData),
        prop::sample::select(vec![512u32, 4096]).prop_map(Twist::MoreData),
        Just(Twist::Loop),
    ]
}

/// A read or write as a driver sends it, then up to two twists (none in about a third).
fn chain() -> impl Strategy<Value = Chain> {
    (
        prop::bool::ANY,
        0..DISK / 512 - 16,
        prop::sample::select(vec![4096u32, 512, 1024]),
        prop::collection::vec(twist(), 0..3),
        prop::bool::weighted(0.35),
    )
        .prop_map(|(write, sector, len, twists, plain)| {
            twisted(write, sector, len, if plain { &[] } else { &twists })
        })
}

/// A `len`-byte read or write of `sector` as a driver sends it, with `twists` applied.
fn twisted(write: bool, sector: u64, len: u32, twists: &[Twist]) -> Chain {
    let own = |len| Desc {
        place: Place::Own,
        len,
        flip: false,
    };
    let mut c = Chain {
        req_type: if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        },
        sector,
        descs: vec![own(16), own(len), own(1)],
        looped: false,
    };
    for t in twists {
        let n = c.descs.len();
        match *t {
            Twist::Type(t) => c.req_type = t,
            Twist::Sector(s) => c.sector = s,
            Twist::HeaderLen(l) => c.descs[0].len = l,
            Twist::DataLen(l) if n > 2 => c.descs[1].len = l,
            Twist::StatusLen(l) => c.descs[n - 1].len = l,
            Twist::Place(i, p) => c.descs[i % n].place = p,
            Twist::Flip(i) => c.descs[i % n].flip ^= true,
            Twist::NoData if n > 2 => {
                c.descs.remove(1);
            }
            Twist::MoreData(l) if n < 4 => c.descs.insert(1, own(l)),
            Twist::Loop => c.looped = true,
            _ => {}
        }
    }
    c
}

/// Put `chains` (at most 8) on `h`'s queue: descriptors `4 i ..`, buffers in slot `i`; each descriptor
/// device-writable if a driver would make it so (status, data of IN and GET_ID), unless
/// flipped.
fn place_chains(h: &mut BlockHarness, chains: &[Chain]) {
    for (i, c) in chains.iter().enumerate() {
        let base = BUF_START + i as u64 * SLOT;
        let first = 4 * i as u16;
        for (j, d) in c.descs.iter().enumerate() {
            let own = base + [0, 0x1000, 0x4000, 0x7000][j.min(3)];
            let own = if j + 1 == c.descs.len() {
                base + 0xc000
            } else {
                own
            };
            let addr = match d.place {
                Place::Own => own,
                Place::AcrossEnd => MEM + 8 - u64::from(d.len.max(16)),
                Place::Outside => MEM + 0x1000,
            };
            let last = j + 1 == c.descs.len();
            let device_writes =
                last || (j > 0 && matches!(c.req_type, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID));
            let mut flags = if device_writes != d.flip {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let next = if last && c.looped {
                flags |= VRING_DESC_F_NEXT as u16;
                first
            } else if last {
                0
            } else {
                flags |= VRING_DESC_F_NEXT as u16;
                first + j as u16 + 1
            };
            h.write_desc(first + j as u16, addr, d.len, flags, next);
        }
        // The header, where the header descriptor points (if that is in memory).
        let hdr_addr = match c.descs[0].place {
            Place::Own => base,
            Place::AcrossEnd => MEM + 8 - u64::from(c.descs[0].len.max(16)),
            Place::Outside => continue,
        };
        let mut raw = [0u8; 16];
        raw[..4].copy_from_slice(&c.req_type.to_le_bytes());
        raw[8..].copy_from_slice(&c.sector.to_le_bytes());
        let n = (MEM - hdr_addr).min(16) as usize;
        h.mem
            .write_slice(&raw[..n], GuestAddress(hdr_addr))
            .unwrap();
    }
    for i in 0..chains.len() {
        h.publish(4 * i as u16);
    }
}

/// The two paths' outcomes are equal (`what` names the case).
fn assert_same(fast: &Outcome, general: &Outcome, what: &str) {
    assert_eq!(fast.used, general.used, "{what}");
    assert_eq!(fast.metrics, general.metrics, "{what}");
    assert!(
        fast.memory == general.memory,
        "guest memory differs: {what}"
    );
    assert!(fast.disk == general.disk, "image contents differ: {what}");
}

fn run_both(kind: Kind, limits: Limits, chains: &[Chain]) -> (Outcome, Outcome) {
    let mut fast = rig(kind, true, limits);
    let mut general = rig(kind, false, limits);
    place_chains(&mut fast.h, chains);
    place_chains(&mut general.h, chains);
    (fast.run(), general.run())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 192, ..ProptestConfig::default() })]

    #[test]
    fn fast_path_and_general_path_agree(
        kind in prop_oneof![Just(Kind::Raw), Just(Kind::RawNoFd), Just(Kind::Qcow2)],
        limits in limits(),
        chains in prop::collection::vec(chain(), 1..9),
    ) {
        let (fast, general) = run_both(kind, limits, &chains);
        prop_assert_eq!(&fast.used, &general.used);
        prop_assert_eq!(fast.metrics, general.metrics);
        prop_assert!(fast.memory == general.memory, "guest memory differs");
        prop_assert!(fast.disk == general.disk, "image contents differ");
    }
}

/// Every twist the generator knows, one at a time, on reads and writes of three sizes, for each
/// image kind and under each limit: the paths agree (a deterministic sweep of what the
/// proptest samples).
#[test]
fn every_single_twist_agrees() {
    let cap = DISK / 512;
    let mut twists = vec![Twist::Loop, Twist::NoData];
    twists.extend(
        [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            99,
        ]
        .map(Twist::Type),
    );
    twists.extend(
        [
            0,
            cap - 8,
            cap - 2,
            cap - 1,
            cap,
            u64::MAX - 3,
            u64::MAX >> 9,
        ]
        .map(Twist::Sector),
    );
    twists.extend([0, 15, 17, 4096].map(Twist::HeaderLen));
    twists.extend([0, 1, 511, 513, 2048, 2560, 8192].map(Twist::DataLen));
    twists.extend([0, 2].map(Twist::StatusLen));
    twists.extend([512, 4096].map(Twist::MoreData));
    for n in 0..3 {
        twists.push(Twist::Flip(n));
        twists.push(Twist::Place(n, Place::AcrossEnd));
        twists.push(Twist::Place(n, Place::Outside));
    }
    let mut cases = Vec::new();
    for write in [false, true] {
        for len in [512, 1024, 4096] {
            for t in &twists {
                cases.push(twisted(write, 8, len, std::slice::from_ref(t)));
            }
        }
    }
    let limits = [
        USUAL,
        Limits {
            read_only: true,
            ..USUAL
        },
        Limits {
            size_max: 2048,
            ..USUAL
        },
        Limits {
            seg_max: 0,
            ..USUAL
        },
    ];
    for kind in [Kind::Raw, Kind::RawNoFd, Kind::Qcow2] {
        for l in limits {
            for batch in cases.chunks(8) {
                let (fast, general) = run_both(kind, l, batch);
                assert_same(&fast, &general, &format!("{kind:?} {l:?} {batch:?}"));
            }
        }
    }
}

/// One 4 KiB request of `req_type` at sector 8, as a driver sends it.
fn one_request(req_type: u32) -> Vec<Chain> {
    vec![twisted(false, 8, 4096, &[Twist::Type(req_type)])]
}

#[test]
fn the_fast_path_serves_single_buffer_reads_and_writes() {
    for kind in [Kind::Raw, Kind::RawNoFd, Kind::Qcow2] {
        for req_type in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
            for fast in [true, false] {
                let mut r = rig(kind, fast, USUAL);
                place_chains(&mut r.h, &one_request(req_type));
                let out = r.run();
                let want_used = if req_type == VIRTIO_BLK_T_IN { 4097 } else { 1 };
                assert_eq!(out.used, vec![(0, want_used)], "{kind:?} {req_type} {fast}");
                assert_eq!(
                    out.memory[(BUF_START + 0xc000) as usize],
                    VIRTIO_BLK_S_OK as u8
                );
                let data = &out.memory[(BUF_START + 0x1000) as usize..][..4096];
                assert_eq!(
                    data,
                    &out.disk[8 * 512..][..4096],
                    "{kind:?} {req_type} {fast}"
                );
                // The raw fast path does its own system call; everything else goes through the
                // image's vectored call once.
                let calls = r.vectored.load(Ordering::Relaxed);
                let want = usize::from(!(fast && kind == Kind::Raw));
                assert_eq!(calls, want, "{kind:?} {req_type} fast={fast}");
            }
        }
    }
}

#[test]
fn requests_the_fast_path_leaves_to_the_parser_get_its_statuses() {
    let read_only = Limits {
        read_only: true,
        ..USUAL
    };
    let past_end = twisted(false, DISK / 512 - 1, 4096, &[]);
    // An OUT to a read-only device, a read past the end of the disk: refused by the parser
    // (IOERR, invalid_requests), nothing read or written.
    for (what, limits, chain) in [
        ("read-only", read_only, one_request(VIRTIO_BLK_T_OUT)),
        ("past the end", USUAL, vec![past_end]),
    ] {
        let mut r = rig(Kind::Raw, true, limits);
        place_chains(&mut r.h, &chain);
        let out = r.run();
        assert_eq!(out.used, vec![(0, 1)], "{what}");
        let status = out.memory[(BUF_START + 0xc000) as usize];
        assert_eq!(status, VIRTIO_BLK_S_IOERR as u8, "{what}");
        assert_eq!(out.metrics.invalid_requests, 1, "{what}");
        assert_eq!((out.metrics.reads, out.metrics.writes), (0, 0), "{what}");
    }
}

/// Guest pages the device writes are marked dirty (for live migration) by both paths alike:
/// the data buffer of a read and the status byte; a write's data buffer stays clean.
#[test]
fn both_paths_mark_the_pages_they_write_dirty() {
    use virtio_queue::desc::{RawDescriptor, split::Descriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    let (hdr, data, status) = (0x10000u64, 0x20000u64, 0x30000u64);
    for kind in [Kind::Raw, Kind::RawNoFd, Kind::Qcow2] {
        for req_type in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
            let mut dirty = Vec::new();
            for fast in [true, false] {
                let r = rig(kind, fast, USUAL);
                let Rig {
                    shared, mut worker, ..
                } = r;
                let mem = vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(
                    GuestAddress(0),
                    0x40000,
                )])
                .unwrap();
                let mut raw = [0u8; 16];
                raw[..4].copy_from_slice(&req_type.to_le_bytes());
                raw[8..].copy_from_slice(&8u64.to_le_bytes());
                mem.write_slice(&raw, GuestAddress(hdr)).unwrap();
                let q = MockSplitQueue::new(&mem, 16);
                let w = VRING_DESC_F_WRITE as u16;
                let data_flags = if req_type == VIRTIO_BLK_T_IN { w } else { 0 };
                q.build_desc_chain(&[
                    RawDescriptor::from(Descriptor::new(hdr, 16, 0, 0)),
                    RawDescriptor::from(Descriptor::new(data, 4096, data_flags, 0)),
                    RawDescriptor::from(Descriptor::new(status, 1, w, 0)),
                ])
                .unwrap();
                let mut queue = q.create_queue::<virtio_queue::Queue>().unwrap();
                // The setup wrote the header and the rings, not the data or status pages.
                let region = mem.find_region(GuestAddress(0)).unwrap();
                assert!(!region.bitmap().dirty_at(data as usize));
                assert!(!region.bitmap().dirty_at(status as usize));
                let pass = worker.process(&mut queue, &mem, &shared).unwrap();
                assert_eq!(pass.completed, 1);
                let (data_dirty, status_dirty) = (
                    region.bitmap().dirty_at(data as usize),
                    region.bitmap().dirty_at(status as usize),
                );
                assert!(status_dirty, "{kind:?} {req_type} fast={fast}");
                assert_eq!(
                    data_dirty,
                    req_type == VIRTIO_BLK_T_IN,
                    "{kind:?} {req_type} fast={fast}"
                );
                dirty.push(data_dirty);
            }
            assert_eq!(dirty[0], dirty[1], "{kind:?} {req_type}");
        }
    }
}

/// An IOMMU with fixed mappings: what is not mapped with the access asked for fails.
#[derive(Debug)]
struct FixedIommu(std::sync::RwLock<vm_memory::Iotlb>);

impl vm_memory::Iommu for FixedIommu {
    type IotlbGuard<'a> = std::sync::RwLockReadGuard<'a, vm_memory::Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: vm_memory::Permissions,
    ) -> Result<vm_memory::iommu::IotlbIterator<Self::IotlbGuard<'_>>, vm_memory::iommu::Error>
    {
        vm_memory::Iotlb::lookup(self.0.read().unwrap(), iova, length, access).map_err(|_| {
            vm_memory::iommu::Error::CannotResolve {
                iova_range: vm_memory::iommu::IovaRange { base: iova, length },
                reason: "not mapped for this access".into(),
            }
        })
    }
}

/// Behind an IOMMU, where a buffer's permissions and contiguity are the IOMMU's, the paths
/// agree too: a plain read (fast), a read into a buffer mapped read-only and a write from one
/// mapped write-only (refused, IOERR), a read into a buffer whose two halves map to distant
/// guest pages (two slices: the general path), a status mapped read-only (no status, used
/// length 0), and an unmapped header (IOERR).
#[test]
fn behind_an_iommu_the_paths_agree() {
    use vm_memory::{IommuMemory, Iotlb, Permissions};
    let chains: Vec<Chain> = [false, false, true, false, false, false]
        .iter()
        .map(|&write| twisted(write, 8 + 16, 4096, &[]))
        .collect();
    let slot = |i: u64| BUF_START + i * SLOT;
    // Rings, descriptor table and slots identity-mapped read-write except slot 5's header;
    // then the twists of slots 1–4 (a later mapping replaces what it overlaps).
    let hole = slot(5);
    let mappings = [
        (0, 0, hole, Permissions::ReadWrite),
        (hole + 16, hole + 16, SLOT - 16, Permissions::ReadWrite),
        (slot(1) + 0x1000, slot(1) + 0x1000, 4096, Permissions::Read),
        (slot(2) + 0x1000, slot(2) + 0x1000, 4096, Permissions::Write),
        (
            slot(3) + 0x1800,
            slot(3) + 0x9000,
            2048,
            Permissions::ReadWrite,
        ),
        (slot(4) + 0xc000, slot(4) + 0xc000, 1, Permissions::Read),
    ];
    let mut outcomes = Vec::new();
    for fast in [true, false] {
        let mut r = rig(Kind::Raw, fast, USUAL);
        place_chains(&mut r.h, &chains);
        let iommu = FixedIommu(std::sync::RwLock::new(Iotlb::new()));
        for (iova, gpa, len, perm) in mappings {
            let mut tlb = iommu.0.write().unwrap();
            tlb.set_mapping(GuestAddress(iova), GuestAddress(gpa), len as usize, perm)
                .unwrap();
        }
        let mem = IommuMemory::new(r.h.mem.clone(), iommu, true, ());
        outcomes.push(r.run_through(&mem));
        // Only the split read goes through the image's vectored call on the fast path; on the
        // general path both reads do.
        assert_eq!(r.vectored.load(Ordering::Relaxed), if fast { 1 } else { 2 });
    }
    let (fast, general) = (&outcomes[0], &outcomes[1]);
    assert_same(fast, general, "behind an IOMMU");
    // What each chain got: slot 0 and 3 read 4 KiB, 1 and 2 were refused, 4 has no status,
    // 5 no header.
    assert_eq!(
        fast.used,
        vec![(0, 4097), (4, 1), (8, 1), (12, 4097), (16, 0), (20, 1)]
    );
    let status = |i: u64| fast.memory[(slot(i) + 0xc000) as usize];
    let ok = VIRTIO_BLK_S_OK as u8;
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    assert_eq!(
        [status(0), status(1), status(2), status(3), status(5)],
        [ok, ioerr, ioerr, ok, ioerr]
    );
    // Slot 3's second half landed where the IOMMU maps it.
    let sector = |s: u64, len: usize| &fast.disk[(s * 512) as usize..][..len];
    let at = |gpa: u64, len: usize| &fast.memory[gpa as usize..][..len];
    assert_eq!(at(slot(3) + 0x1000, 2048), sector(24, 2048));
    assert_eq!(at(slot(3) + 0x9000, 2048), &sector(24, 4096)[2048..]);
    assert_eq!(fast.metrics.reads, 2);
    assert_eq!(fast.metrics.invalid_requests, 3);
    assert_eq!(fast.metrics.invalid_chains, 1);
}
