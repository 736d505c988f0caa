//! The bad-input table: every malformed request gets the exact status byte (or used length 0
//! when no status can be written), bumps exactly the expected counter, and touches no guest
//! memory except its status byte and the used ring.

use std::sync::Mutex;

use vm_memory::{Bytes, GuestAddress};
use vmkit_block::config::BlockConfig;
use vmkit_block::defs::*;
use vmkit_block::metrics::{BlockMetrics, BlockMetricsSnapshot};
use vmkit_block::rate_limiter::RateLimiter;
use vmkit_block::test_utils::{BlockHarness, MEM_SIZE, RawDesc, TempImages, USED_RING};
use vmkit_block::worker::{BlockShared, EngineKind, QueueWorker, WorkerError};

const QSIZE: u16 = 16;
const CAPACITY: u64 = 2048; // sectors (1 MiB)
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counter {
    InvalidChains,
    InvalidRequests,
    Unsupported,
}

struct Case {
    name: &'static str,
    read_only: bool,
    flush: bool,
    /// Builds the chain; returns the status address to check (None: no status expected).
    build: fn(&mut BlockHarness) -> Option<GuestAddress>,
    status: Option<u8>,
    counter: Counter,
}

fn rd(addr: GuestAddress, len: u32) -> RawDesc {
    RawDesc {
        addr: addr.0,
        len,
        writable: false,
    }
}
fn wr(addr: GuestAddress, len: u32) -> RawDesc {
    RawDesc {
        addr: addr.0,
        len,
        writable: true,
    }
}

/// header + one data descriptor + status
fn simple(h: &mut BlockHarness, t: u32, sector: u64, data: RawDesc) -> Option<GuestAddress> {
    let hdr = h.header(t, sector);
    let st = h.alloc(1);
    h.add_chain(&[rd(hdr, 16), data, wr(st, 1)]);
    Some(st)
}

fn discard(h: &mut BlockHarness, t: u32, segs: &[(u64, u32, u32)]) -> Option<GuestAddress> {
    let p = h.add_discard(t, segs);
    Some(p.status)
}

fn cases() -> Vec<Case> {
    use Counter::*;
    vec![
        Case {
            name: "header shorter than 16 bytes",
            read_only: false,
            flush: true,
            build: |h| {
                let hdr = h.header(VIRTIO_BLK_T_IN, 0);
                let d = h.alloc(512);
                let st = h.alloc(1);
                h.add_chain(&[rd(hdr, 15), wr(d, 512), wr(st, 1)]);
                Some(st)
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "header alone (chain of one descriptor)",
            read_only: false,
            flush: true,
            build: |h| {
                let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
                h.add_chain(&[wr(hdr, 16)]);
                Some(hdr)
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "header device-writable",
            read_only: false,
            flush: true,
            build: |h| {
                let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
                let st = h.alloc(1);
                h.add_chain(&[wr(hdr, 16), wr(st, 1)]);
                Some(st)
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "status descriptor not writable",
            read_only: false,
            flush: true,
            build: |h| {
                let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
                let st = h.alloc(1);
                h.add_chain(&[rd(hdr, 16), rd(st, 1)]);
                None
            },
            status: None,
            counter: InvalidChains,
        },
        Case {
            name: "status descriptor too short",
            read_only: false,
            flush: true,
            build: |h| {
                let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
                let st = h.alloc(1);
                h.add_chain(&[rd(hdr, 16), wr(st, 0)]);
                None
            },
            status: None,
            counter: InvalidChains,
        },
        Case {
            name: "status descriptor outside guest memory",
            read_only: false,
            flush: true,
            build: |h| {
                let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
                h.add_chain(&[rd(hdr, 16), wr(GuestAddress(MEM_SIZE), 1)]);
                None
            },
            status: None,
            counter: InvalidChains,
        },
        Case {
            name: "read into a device-readable buffer",
            read_only: false,
            flush: true,
            build: |h| {
                let d = h.alloc(512);
                simple(h, VIRTIO_BLK_T_IN, 0, rd(d, 512))
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "write from a device-writable buffer",
            read_only: false,
            flush: true,
            build: |h| {
                let d = h.alloc(512);
                simple(h, VIRTIO_BLK_T_OUT, 0, wr(d, 512))
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "get-id into a device-readable buffer",
            read_only: false,
            flush: true,
            build: |h| {
                let d = h.alloc(20);
                simple(h, VIRTIO_BLK_T_GET_ID, 0, rd(d, 20))
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "sector + length beyond capacity",
            read_only: false,
            flush: true,
            build: |h| {
                let d = h.alloc(1024);
                simple(h, VIRTIO_BLK_T_IN, CAPACITY - 1, wr(d, 1024))
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "sector + length overflows u64",
            read_only: false,
            flush: true,
            build: |h| {
                let d = h.alloc(512);
                simple(h, VIRTIO_BLK_T_OUT, u64::MAX, rd(d, 512))
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "data length not a multiple of 512",
            read_only: false,
            flush: true,
            build: |h| {
                let d = h.alloc(100);
                simple(h, VIRTIO_BLK_T_IN, 0, wr(d, 100))
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "data descriptor outside guest memory",
            read_only: false,
            flush: true,
            build: |h| simple(h, VIRTIO_BLK_T_IN, 0, wr(GuestAddress(MEM_SIZE - 256), 512)),
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "data descriptor address wraps around",
            read_only: false,
            flush: true,
            build: |h| {
                simple(
                    h,
                    VIRTIO_BLK_T_OUT,
                    0,
                    rd(GuestAddress(u64::MAX - 100), 512),
                )
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "header outside guest memory",
            read_only: false,
            flush: true,
            build: |h| {
                let st = h.alloc(1);
                h.add_chain(&[rd(GuestAddress(MEM_SIZE + 4096), 16), wr(st, 1)]);
                Some(st)
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "write to a read-only device",
            read_only: true,
            flush: true,
            build: |h| {
                let d = h.alloc(512);
                simple(h, VIRTIO_BLK_T_OUT, 0, rd(d, 512))
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "write-zeroes to a read-only device",
            read_only: true,
            flush: true,
            build: |h| discard(h, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 0)]),
            // RO devices do not offer WRITE_ZEROES, so it was not negotiated.
            status: Some(UNSUPP),
            counter: Unsupported,
        },
        Case {
            name: "discard with the UNMAP flag",
            read_only: false,
            flush: true,
            build: |h| {
                discard(
                    h,
                    VIRTIO_BLK_T_DISCARD,
                    &[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
                )
            },
            status: Some(UNSUPP),
            counter: Unsupported,
        },
        Case {
            name: "write-zeroes with a reserved flag bit",
            read_only: false,
            flush: true,
            build: |h| discard(h, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 0x4)]),
            status: Some(UNSUPP),
            counter: Unsupported,
        },
        Case {
            name: "discard with too many segments",
            read_only: false,
            flush: true,
            build: |h| discard(h, VIRTIO_BLK_T_DISCARD, &[(0, 1, 0); 33]),
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "discard segment beyond capacity",
            read_only: false,
            flush: true,
            build: |h| discard(h, VIRTIO_BLK_T_DISCARD, &[(CAPACITY, 1, 0)]),
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "discard sector overflows u64",
            read_only: false,
            flush: true,
            build: |h| discard(h, VIRTIO_BLK_T_DISCARD, &[(u64::MAX, 2, 0)]),
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "discard payload not a multiple of 16 bytes",
            read_only: false,
            flush: true,
            build: |h| {
                let d = h.alloc(20);
                simple(h, VIRTIO_BLK_T_DISCARD, 0, rd(d, 20))
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "discard without segments",
            read_only: false,
            flush: true,
            build: |h| discard(h, VIRTIO_BLK_T_DISCARD, &[]),
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "unknown request type",
            read_only: false,
            flush: true,
            build: |h| {
                let d = h.alloc(512);
                simple(h, 99, 0, wr(d, 512))
            },
            status: Some(UNSUPP),
            counter: Unsupported,
        },
        Case {
            name: "flush when FLUSH was not negotiated",
            read_only: false,
            flush: false,
            build: |h| {
                let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
                let st = h.alloc(1);
                h.add_chain(&[rd(hdr, 16), wr(st, 1)]);
                Some(st)
            },
            status: Some(UNSUPP),
            counter: Unsupported,
        },
        Case {
            name: "too many data segments (seg_max)",
            read_only: false,
            flush: true,
            build: |h| {
                let hdr = h.header(VIRTIO_BLK_T_IN, 0);
                let mut descs = vec![rd(hdr, 16)];
                for _ in 0..6 {
                    descs.push(wr(h.alloc(512), 512));
                }
                let st = h.alloc(1);
                descs.push(wr(st, 1));
                h.add_chain(&descs);
                Some(st)
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "data segment larger than size_max",
            read_only: false,
            flush: true,
            build: |h| {
                let d = h.alloc(8192);
                simple(h, VIRTIO_BLK_T_IN, 0, wr(d, 8192))
            },
            status: Some(IOERR),
            counter: InvalidRequests,
        },
        Case {
            name: "chain longer than the queue (loop)",
            read_only: false,
            flush: true,
            build: |h| {
                let hdr = h.header(VIRTIO_BLK_T_IN, 0);
                let d = h.alloc(512);
                let next = 0x1 | 0x2; // NEXT | WRITE
                h.write_desc(0, hdr.0, 16, 0x1, 1);
                h.write_desc(1, d.0, 512, next as u16, 0);
                h.publish(0);
                None
            },
            status: None,
            counter: InvalidChains,
        },
        Case {
            name: "next index beyond the queue",
            read_only: false,
            flush: true,
            build: |h| {
                let hdr = h.header(VIRTIO_BLK_T_FLUSH, 0);
                h.write_desc(0, hdr.0, 16, 0x1, QSIZE + 3);
                h.publish(0);
                None
            },
            status: None,
            counter: InvalidChains,
        },
        Case {
            name: "indirect table outside guest memory",
            read_only: false,
            flush: true,
            build: |h| {
                h.write_desc(0, MEM_SIZE + 0x1000, 64, 0x4, 0);
                h.publish(0);
                None
            },
            status: None,
            counter: InvalidChains,
        },
    ]
}

fn counter(m: &BlockMetricsSnapshot, c: Counter) -> u64 {
    match c {
        Counter::InvalidChains => m.invalid_chains,
        Counter::InvalidRequests => m.invalid_requests,
        Counter::Unsupported => m.unsupported_requests,
    }
}

#[test]
fn bad_input_table() {
    for engine in [EngineKind::Sync, EngineKind::IoUring { depth: 4 }] {
        for case in cases() {
            let dir = TempImages::new(true).unwrap();
            let disk = dir.raw("d.raw", CAPACITY * 512).unwrap();
            // Mark the disk so reads would show (they must not happen).
            let cfg = BlockConfig {
                read_only: case.read_only,
                flush: case.flush,
                seg_max: 4,
                size_max: 4096,
                ..Default::default()
            };
            let acked = cfg.features(case.read_only);
            let worker = QueueWorker::new(engine, &disk, cfg.id_bytes()).unwrap();
            let shared = BlockShared {
                parse_cfg: cfg.parse_config(CAPACITY, acked, case.read_only),
                disk: Mutex::new(Box::new(disk)),
                metrics: BlockMetrics::default(),
                limiter: Mutex::new(RateLimiter::new(cfg.rate_limiter)),
            };
            let mut worker = worker;
            let mut h = BlockHarness::new(QSIZE);
            let status_addr = (case.build)(&mut h);
            let before = h.read(GuestAddress(0), MEM_SIZE as usize);

            let pass = worker.process(&mut h.queue, &h.mem, &shared).unwrap();
            worker.drain(&mut h.queue, &h.mem, &shared).unwrap();
            let used = h.used();
            assert_eq!(pass.completed, 1, "{}", case.name);
            assert_eq!(used.len(), 1, "{}", case.name);
            let want_len = if case.status.is_some() { 1 } else { 0 };
            assert_eq!(used[0].1, want_len, "used len: {}", case.name);
            if let (Some(addr), Some(st)) = (status_addr, case.status) {
                assert_eq!(
                    h.mem.read_obj::<u8>(addr).unwrap(),
                    st,
                    "status: {}",
                    case.name
                );
            }
            let m = shared.metrics.snapshot();
            assert_eq!(counter(&m, case.counter), 1, "counter: {} {m:?}", case.name);
            assert_eq!(
                m.invalid_chains + m.invalid_requests + m.unsupported_requests,
                1,
                "exactly one counter: {}",
                case.name
            );
            assert_eq!(
                m.reads + m.writes + m.flushes + m.discards,
                0,
                "{}",
                case.name
            );

            // Nothing but the status byte and the used ring changed.
            let mut after = h.read(GuestAddress(0), MEM_SIZE as usize);
            let used_ring = USED_RING as usize..(USED_RING as usize + 4 + 8 * QSIZE as usize + 2);
            after[used_ring.clone()].copy_from_slice(&before[used_ring]);
            if let Some(s) = status_addr.filter(|s| s.0 < MEM_SIZE) {
                after[s.0 as usize] = before[s.0 as usize];
            }
            assert!(before == after, "guest memory changed: {}", case.name);
        }
    }
}

/// A head index beyond the queue is no bad request but a corrupt ring (no used entry can name
/// it): the worker reports it as a queue error — vmkit-virtio's one policy, after which the
/// transport sets DEVICE_NEEDS_RESET (`corrupt_ring_needs_reset_for_every_device`) — and
/// touches neither the used ring nor the per-request counters. (It used to drop the chain and
/// count it in `invalid_chains`, unlike every other device.)
#[test]
fn head_index_beyond_the_queue_is_a_corrupt_ring() {
    let dir = TempImages::new(true).unwrap();
    let disk = dir.raw("d.raw", CAPACITY * 512).unwrap();
    let cfg = BlockConfig::default();
    let mut worker = QueueWorker::new(EngineKind::Sync, &disk, cfg.id_bytes()).unwrap();
    let shared = BlockShared {
        parse_cfg: cfg.parse_config(CAPACITY, cfg.features(false), false),
        disk: Mutex::new(Box::new(disk)),
        metrics: BlockMetrics::default(),
        limiter: Mutex::new(RateLimiter::new(cfg.rate_limiter)),
    };
    let mut h = BlockHarness::new(QSIZE);
    h.publish(QSIZE + 1);
    let r = worker.process(&mut h.queue, &h.mem, &shared);
    assert!(
        matches!(
            r,
            Err(WorkerError::Queue(
                virtio_queue::Error::InvalidDescriptorIndex
            ))
        ),
        "{r:?}"
    );
    assert!(h.used().is_empty());
    assert_eq!(shared.metrics.snapshot(), BlockMetricsSnapshot::default());
}
