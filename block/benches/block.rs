//! 4 KiB random reads and writes through the device model (harness queue, images on tmpfs)
//! against a plain `pread`/`pwrite` loop of the same pattern (the limit: same offsets, into and
//! out of the same guest buffers the requests name), sync and io_uring engines, raw and qcow2.
//! A fifth variant, `virtio_queue_floor`, does only virtio-queue's part of each request (pop the
//! chain, walk its descriptors, add it to the used ring): the least any device built on
//! virtio-queue adds to the limit. A sixth, `minimal_device`, is a device with no checks at all
//! (header, data and status descriptor taken on trust, the limit's own system call): how close
//! to the limit virtio-queue lets a device come once a real system call runs between requests.
//! Three more variants repeat the limit, raw sync and raw io_uring on a page-cached file of the
//! disk filesystem (under the temporary directory), where the kernel can complete io_uring
//! reads inline; on tmpfs it hands them to io-wq threads (`uring::completes_reads_inline` tells
//! which); three more on that file opened with `O_DIRECT`, where requests reach the disk and
//! io_uring can overlap them. The engine variants also run at queue depth 1 and 8 (the driver
//! places `depth` requests, the device serves them in one pass). After criterion's groups, an
//! interleaved run prints the ratios (median batch times).

use std::hint::black_box;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend};
use vmkit_block::config::BlockConfig;
use vmkit_block::defs::*;
use vmkit_block::image::{DiskImage, Qcow2Image, RawImage};
use vmkit_block::metrics::BlockMetrics;
use vmkit_block::rate_limiter::RateLimiter;
use vmkit_block::test_utils::{BlockHarness, Placed, RawDesc, TempImages};
use vmkit_block::worker::{BlockShared, EngineKind, QueueWorker};
use vmkit_virtio::memory::CachedMemory;

const DISK: u64 = 32 << 20;
const BLOCK: usize = 4096;
const BATCH: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Limit,
    RawSync,
    RawUring,
    Qcow2Sync,
    QueueFloor,
    Minimal,
    DiskLimit,
    DiskRawSync,
    DiskRawUring,
    DirectLimit,
    DirectRawSync,
    DirectRawUring,
}

impl Variant {
    /// On the disk filesystem rather than tmpfs.
    fn on_disk(self) -> bool {
        matches!(
            self,
            Self::DiskLimit
                | Self::DiskRawSync
                | Self::DiskRawUring
                | Self::DirectLimit
                | Self::DirectRawSync
                | Self::DirectRawUring
        )
    }

    /// The image opened with `O_DIRECT` (on the disk filesystem): every request reaches the
    /// disk, data buffers 4 KiB-aligned.
    fn direct(self) -> bool {
        matches!(
            self,
            Self::DirectLimit | Self::DirectRawSync | Self::DirectRawUring
        )
    }

    fn limit(self) -> bool {
        matches!(self, Self::Limit | Self::DiskLimit | Self::DirectLimit)
    }
}

struct Rig {
    _dir: TempImages,
    file: std::fs::File,
    h: BlockHarness,
    shared: BlockShared,
    worker: QueueWorker,
    seed: u64,
    placed: Vec<Placed>,
}

impl Rig {
    fn new(v: Variant) -> Self {
        let dir = TempImages::new(!v.on_disk()).unwrap();
        let fill = vec![0x5au8; 1 << 20];
        let disk: Box<dyn DiskImage> = if v == Variant::Qcow2Sync {
            let p = dir.path("b.qcow2");
            Qcow2Image::create(&p, DISK, None).unwrap();
            let mut q = Qcow2Image::open(&p, false).unwrap();
            for off in (0..DISK).step_by(fill.len()) {
                q.write_at(&fill, off).unwrap();
            }
            Box::new(q)
        } else {
            let mut r = dir.raw("b.raw", DISK).unwrap();
            for off in (0..DISK).step_by(fill.len()) {
                r.write_at(&fill, off).unwrap();
            }
            Box::new(r)
        };
        let direct = if v.direct() { libc::O_DIRECT } else { 0 };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(direct)
            .open(dir.path("b.raw"))
            .or_else(|_| std::fs::File::open(dir.path("b.qcow2")))
            .unwrap();
        if v.on_disk() {
            // Write the fill back now, not while other variants are measured.
            file.sync_all().unwrap();
        }
        let disk: Box<dyn DiskImage> = if v.direct() {
            drop(disk);
            let f = file.try_clone().unwrap();
            Box::new(RawImage::from_file(f, false).unwrap())
        } else {
            disk
        };
        let engine = match v {
            Variant::RawUring | Variant::DiskRawUring | Variant::DirectRawUring => {
                EngineKind::IoUring { depth: 64 }
            }
            _ => EngineKind::Sync,
        };
        let cfg = BlockConfig::default();
        let worker = QueueWorker::new(engine, &*disk, cfg.id_bytes()).unwrap();
        let shared = BlockShared {
            parse_cfg: cfg.parse_config(DISK / 512, cfg.features(false), false),
            disk: Mutex::new(disk),
            metrics: BlockMetrics::default(),
            limiter: Mutex::new(RateLimiter::new(cfg.rate_limiter)),
        };
        Self {
            _dir: dir,
            file,
            h: BlockHarness::new(256),
            shared,
            worker,
            seed: 0x2545_f491_4f6c_dd1d,
            placed: Vec::with_capacity(BATCH),
        }
    }

    fn next_offset(&mut self) -> u64 {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        (self.seed % (DISK / BLOCK as u64)) * BLOCK as u64
    }

    /// Time one batch of `BATCH` requests (driver-side placement is not timed).
    fn batch(&mut self, v: Variant, write: bool, depth: usize) -> Duration {
        if v.limit() {
            // The buffers the device variants' requests use, allocated in the same order.
            self.h.reset_buffers();
            let mut ios = Vec::with_capacity(BATCH);
            for _ in 0..BATCH {
                let (_, data, _) = self.buffers(v);
                let host = self.h.mem.get_host_address(data).unwrap();
                ios.push((host, self.next_offset()));
            }
            let t = Instant::now();
            for (host, off) in ios {
                // SAFETY: `host` maps BLOCK bytes of the harness's guest memory, which nothing
                // else touches during the batch.
                let buf = unsafe { std::slice::from_raw_parts_mut(host, BLOCK) };
                if write {
                    self.file.write_all_at(buf, off).unwrap();
                } else {
                    self.file.read_exact_at(buf, off).unwrap();
                }
            }
            return t.elapsed();
        }
        let mut total = Duration::ZERO;
        self.h.reset_buffers();
        let mut done = 0;
        while done < BATCH {
            // `depth` requests in flight: the driver places them, the device takes them in one
            // pass and completes them all before the driver places the next ones.
            let n = depth.clamp(1, BATCH - done);
            total += self.round(v, write, n);
            done += n;
        }
        total
    }

    /// Header, data and status buffers of one request; the data 4 KiB-aligned for `O_DIRECT`.
    fn buffers(&mut self, v: Variant) -> (GuestAddress, GuestAddress, GuestAddress) {
        let hdr = self.h.alloc(VIRTIO_BLK_REQ_HDR_SIZE);
        if v.direct() {
            let at = self.h.alloc(0).0;
            self.h.alloc((at.next_multiple_of(4096) - at) as u32);
        }
        let data = self.h.alloc(BLOCK as u32);
        (hdr, data, self.h.alloc(1))
    }

    /// Place `n` requests, then time the device serving them.
    fn round(&mut self, v: Variant, write: bool, n: usize) -> Duration {
        self.placed.clear();
        let data = [0xa5u8; BLOCK];
        for _ in 0..n {
            let sector = self.next_offset() / 512;
            let (hdr, buf, status) = self.buffers(v);
            let t = if write {
                VIRTIO_BLK_T_OUT
            } else {
                VIRTIO_BLK_T_IN
            };
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&t.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.h.mem.write_slice(&h, hdr).unwrap();
            if write {
                self.h.mem.write_slice(&data, buf).unwrap();
            }
            let head = self.h.add_chain(&[
                RawDesc {
                    addr: hdr.0,
                    len: VIRTIO_BLK_REQ_HDR_SIZE,
                    writable: false,
                },
                RawDesc {
                    addr: buf.0,
                    len: BLOCK as u32,
                    writable: !write,
                },
                RawDesc {
                    addr: status.0,
                    len: 1,
                    writable: true,
                },
            ]);
            self.placed.push(Placed {
                head,
                data: buf,
                status,
            });
        }
        let t = Instant::now();
        if v == Variant::Minimal {
            self.minimal_device(write);
            let d = t.elapsed();
            assert_eq!(self.h.used().len(), n);
            return d;
        }
        if v == Variant::QueueFloor {
            let mem = CachedMemory::new(&self.h.mem);
            while let Some(chain) = self.h.queue.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                let walked: u32 = chain.map(|d| d.len()).sum();
                self.h
                    .queue
                    .add_used(&mem, head, black_box(walked) & 1)
                    .unwrap();
            }
            let d = t.elapsed();
            assert_eq!(self.h.used().len(), n);
            return d;
        }
        self.worker
            .process(&mut self.h.queue, &self.h.mem, &self.shared)
            .unwrap();
        if self.worker.in_flight() > 0 {
            self.worker
                .drain(&mut self.h.queue, &self.h.mem, &self.shared)
                .unwrap();
        }
        let d = t.elapsed();
        assert_eq!(self.h.used().len(), n);
        d
    }
}

impl Rig {
    /// The `minimal_device` variant: the least a virtio-blk device on virtio-queue and
    /// vm-memory can do per request, with none of the checks a hostile guest calls for. Pop the
    /// chain, take header, data and status descriptor on trust, read the sector, do the
    /// limit's own `pread`/`pwrite` call on the data buffer, store status 0, add the chain to
    /// the used ring. Per request it runs two thirds of our device's instructions on half its
    /// code (callgrind: ~960 against ~1,480, on ~52 distinct 64-byte lines against ~104): how
    /// much of the gap to the limit is virtio-queue, vm-memory and the system call
    /// alone, measured in the same interleaved run rather than estimated from the floor.
    fn minimal_device(&mut self, write: bool) {
        let mem = CachedMemory::new(&self.h.mem);
        while let Some(mut chain) = self.h.queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let (Some(hdr), Some(data), Some(status)) = (chain.next(), chain.next(), chain.next())
            else {
                panic!("the harness builds three-descriptor chains");
            };
            let sector: u64 = mem.read_obj(hdr.addr().unchecked_add(8)).unwrap();
            let perm = if write {
                vm_memory::Permissions::Read
            } else {
                vm_memory::Permissions::Write
            };
            let len = data.len() as usize;
            let slice = mem
                .get_slices(data.addr(), len, perm)
                .unwrap()
                .next()
                .unwrap()
                .unwrap();
            let guard = slice.ptr_guard_mut();
            // SAFETY: the slice maps `len` bytes of the harness's guest memory (one region),
            // which nothing else touches while the batch runs.
            let buf = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), len) };
            if write {
                self.file.write_all_at(buf, sector * 512).unwrap();
            } else {
                self.file.read_exact_at(buf, sector * 512).unwrap();
            }
            mem.write_obj(0u8, status.addr()).unwrap();
            let used = if write { 1 } else { data.len() + 1 };
            self.h.queue.add_used(&mem, head, used).unwrap();
        }
    }
}

const VARIANTS: [(Variant, &str); 12] = [
    (Variant::Limit, "pread_pwrite_limit"),
    (Variant::RawSync, "device_raw_sync"),
    (Variant::RawUring, "device_raw_io_uring"),
    (Variant::Qcow2Sync, "device_qcow2_sync"),
    (Variant::QueueFloor, "virtio_queue_floor"),
    (Variant::Minimal, "minimal_device"),
    (Variant::DiskLimit, "disk_fs_pread_pwrite_limit"),
    (Variant::DiskRawSync, "disk_fs_device_raw_sync"),
    (Variant::DiskRawUring, "disk_fs_device_raw_io_uring"),
    (Variant::DirectLimit, "o_direct_pread_pwrite_limit"),
    (Variant::DirectRawSync, "o_direct_device_raw_sync"),
    (Variant::DirectRawUring, "o_direct_device_raw_io_uring"),
];

/// Requests in flight per round ([`Rig::batch`]); the full variant list runs at
/// [`BATCH`], the engine comparison at every depth.
const DEPTHS: [usize; 3] = [1, 8, BATCH];

/// The variants measured at every depth: the limit, sync and io_uring, on tmpfs and on the
/// disk filesystem.
fn at_depth(v: Variant) -> bool {
    use Variant::*;
    matches!(
        v,
        Limit
            | RawSync
            | RawUring
            | DiskLimit
            | DiskRawSync
            | DiskRawUring
            | DirectLimit
            | DirectRawSync
            | DirectRawUring
    )
}

fn bench(c: &mut Criterion) {
    for (write, name) in [(false, "4k_random_read"), (true, "4k_random_write")] {
        let mut g = c.benchmark_group(name);
        g.throughput(criterion::Throughput::Elements(BATCH as u64));
        for depth in DEPTHS {
            for (v, label) in VARIANTS {
                if depth != BATCH && !at_depth(v) {
                    continue;
                }
                // Built on first use, so a filtered-out variant costs nothing.
                let mut rig: Option<Rig> = None;
                g.bench_function(format!("{label}/qd{depth}"), |b| {
                    let rig = rig.get_or_insert_with(|| Rig::new(v));
                    b.iter_custom(|iters| (0..iters).map(|_| rig.batch(v, write, depth)).sum())
                });
            }
        }
        g.finish();
    }
}

/// Median, minimum and maximum of `rounds` interleaved runs of `rates`.
type Spread = (f64, f64, f64);

/// Requests per second of each of `variants` at `depth`, measured interleaved (one batch of
/// each in turn, so a noisy neighbour hits all alike) and taken as the median batch time.
fn rates(variants: &[Variant], write: bool, depth: usize) -> Vec<f64> {
    let mut rigs: Vec<Rig> = variants.iter().map(|v| Rig::new(*v)).collect();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
    // O_DIRECT requests wait for the disk (~100 µs each): fewer batches.
    let batches = if variants.iter().any(|v| v.direct()) {
        25
    } else {
        600
    };
    for _ in 0..batches {
        for (i, v) in variants.iter().enumerate() {
            times[i].push(rigs[i].batch(*v, write, depth));
        }
    }
    times
        .iter_mut()
        .map(|t| {
            t.sort();
            BATCH as f64 / t[t.len() / 2].as_secs_f64()
        })
        .collect()
}

/// io_uring against sync at each depth, `ROUNDS` interleaved groups ([`rates`]) each:
/// median (min–max) of the per-group ratios. `vs` is limit, sync, io_uring.
fn engine_ratios(vs: [Variant; 3], write: bool) -> Vec<(usize, Spread, Spread)> {
    const ROUNDS: usize = 5;
    DEPTHS
        .iter()
        .map(|&depth| {
            let mut sync_limit = Vec::new();
            let mut uring_sync = Vec::new();
            for _ in 0..ROUNDS {
                let r = rates(&vs, write, depth);
                sync_limit.push(r[1] / r[0]);
                uring_sync.push(r[2] / r[1]);
            }
            (depth, spread(&mut sync_limit), spread(&mut uring_sync))
        })
        .collect()
}

fn spread(v: &mut [f64]) -> Spread {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn ratios() {
    use Variant::*;
    for (write, name) in [(false, "read"), (true, "write")] {
        // The tmpfs variants and the disk-filesystem ones run as separate interleaved groups,
        // the disk ones last: their writeback would otherwise slow the tmpfs limit.
        let r = rates(
            &[Limit, RawSync, RawUring, Qcow2Sync, QueueFloor, Minimal],
            write,
            BATCH,
        );
        let per_req = |rate: f64| 1e9 / rate;
        let (limit_ns, floor_ns) = (per_req(r[0]), per_req(r[4]));
        println!(
            "4k random {name} (qd{BATCH}): limit {:.0} req/s ({limit_ns:.0} ns) | raw sync {:.0} ({:.2}x limit) | raw io_uring {:.0} ({:.2}x limit) | qcow2 sync {:.0} ({:.2}x raw sync) | virtio-queue floor {floor_ns:.0} ns/req: best possible {:.2}x limit | minimal {:.2}x",
            r[0],
            r[1],
            r[1] / r[0],
            r[2],
            r[2] / r[0],
            r[3],
            r[3] / r[1],
            limit_ns / (limit_ns + floor_ns),
            r[5] / r[0],
        );
    }
    for (vs, fs) in [
        ([Limit, RawSync, RawUring], "tmpfs"),
        (
            [DiskLimit, DiskRawSync, DiskRawUring],
            "page-cached file on the disk filesystem",
        ),
        ([DirectLimit, DirectRawSync, DirectRawUring], "O_DIRECT"),
    ] {
        for (write, name) in [(false, "read"), (true, "write")] {
            for (depth, s, u) in engine_ratios(vs, write) {
                println!(
                    "4k random {name}, {fs}, qd{depth}: raw sync {:.2}x limit ({:.2}-{:.2}) | raw io_uring {:.2}x raw sync ({:.2}-{:.2})",
                    s.0, s.1, s.2, u.0, u.1, u.2,
                );
            }
        }
    }
    for tmpfs in [true, false] {
        let dir = TempImages::new(tmpfs).unwrap();
        let raw = dir.raw("probe.raw", 4096).unwrap();
        println!(
            "reads complete inline in io_uring ({}): {}",
            if tmpfs { "tmpfs" } else { "disk filesystem" },
            vmkit_block::uring::completes_reads_inline(raw.raw_fd().unwrap()),
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    // `--profile-time` runs one variant under a profiler: the ratios would only add noise.
    if !std::env::args().any(|a| a == "--profile-time") {
        ratios();
    }
}
