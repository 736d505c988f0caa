//! Queue-level tests: every request type through the worker, for each engine and format.

use std::sync::Mutex;

use vmkit_block::config::BlockConfig;
use vmkit_block::defs::*;
use vmkit_block::image::{DiskImage, Qcow2Image};
use vmkit_block::metrics::BlockMetrics;
use vmkit_block::rate_limiter::{BucketConfig, RateLimiter, RateLimiterConfig};
use vmkit_block::test_utils::{BlockHarness, TempImages};
use vmkit_block::worker::{BlockShared, EngineKind, QueueWorker};

const DISK: u64 = 4 << 20;
const ALL: u64 =
    1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;

struct Rig {
    h: BlockHarness,
    shared: BlockShared,
    worker: QueueWorker,
    _dir: TempImages,
}

fn rig(engine: EngineKind, qcow2: bool, cfg: BlockConfig) -> Rig {
    let dir = TempImages::new(true).unwrap();
    let disk: Box<dyn DiskImage> = if qcow2 {
        let p = dir.path("d.qcow2");
        Qcow2Image::create(&p, DISK, None).unwrap();
        Box::new(Qcow2Image::open(&p, false).unwrap())
    } else {
        Box::new(dir.raw("d.raw", DISK).unwrap())
    };
    let worker = QueueWorker::new(engine, &*disk, cfg.id_bytes()).unwrap();
    let shared = BlockShared {
        parse_cfg: cfg.parse_config(DISK / 512, ALL, false),
        disk: Mutex::new(disk),
        metrics: BlockMetrics::default(),
        limiter: Mutex::new(RateLimiter::new(cfg.rate_limiter)),
    };
    Rig {
        h: BlockHarness::new(64),
        shared,
        worker,
        _dir: dir,
    }
}

impl Rig {
    fn run(&mut self) -> Vec<(u16, u32)> {
        let Rig {
            h, shared, worker, ..
        } = self;
        worker.process(&mut h.queue, &h.mem, shared).unwrap();
        worker.drain(&mut h.queue, &h.mem, shared).unwrap();
        h.used()
    }
}

fn engines() -> Vec<(EngineKind, bool)> {
    vec![
        (EngineKind::Sync, false),
        (EngineKind::Sync, true),
        (EngineKind::IoUring { depth: 8 }, false),
        (EngineKind::IoUring { depth: 8 }, true),
        (EngineKind::Auto { depth: 8 }, false),
    ]
}

#[test]
fn auto_engine_uses_io_uring_only_where_reads_complete_inline() {
    use vmkit_block::uring::completes_reads_inline;
    let id = BlockConfig::default().id_bytes();
    for tmpfs in [true, false] {
        let dir = TempImages::new(tmpfs).unwrap();
        let raw = dir.raw("a.raw", DISK).unwrap();
        let inline = completes_reads_inline(raw.raw_fd().unwrap());
        // Which filesystems support RWF_NOWAIT depends on the kernel; print it for the log.
        println!("tmpfs={tmpfs}: reads complete inline: {inline}");
        let auto = QueueWorker::new(EngineKind::Auto { depth: 8 }, &raw, id).unwrap();
        let want = if inline {
            EngineKind::IoUring { depth: 8 }
        } else {
            EngineKind::Sync
        };
        assert_eq!(auto.engine(), want, "tmpfs={tmpfs}");
        assert_eq!(auto.uring().is_some(), inline);
        for engine in [EngineKind::Sync, EngineKind::IoUring { depth: 8 }] {
            let w = QueueWorker::new(engine, &raw, id).unwrap();
            assert_eq!(w.engine(), engine);
        }
        // qcow2 images always run synchronously.
        let p = dir.path("a.qcow2");
        Qcow2Image::create(&p, DISK, None).unwrap();
        let q = Qcow2Image::open(&p, false).unwrap();
        for engine in [
            EngineKind::Auto { depth: 8 },
            EngineKind::IoUring { depth: 8 },
        ] {
            let w = QueueWorker::new(engine, &q, id).unwrap();
            assert_eq!(w.engine(), EngineKind::Sync);
        }
    }
}

#[test]
fn inline_probe_reads_only_and_fails_closed() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    use vmkit_block::uring::completes_reads_inline;
    let dir = TempImages::new(false).unwrap();
    let p = dir.path("probe");
    std::fs::write(&p, [0x5a; 512]).unwrap();
    let before = std::fs::metadata(&p).unwrap().modified().unwrap();
    let f = std::fs::File::open(&p).unwrap();
    // Read-only descriptors and empty files can be probed too.
    let _ = completes_reads_inline(f.as_raw_fd());
    let empty = std::fs::File::create(dir.path("empty")).unwrap();
    let _ = completes_reads_inline(empty.as_raw_fd());
    let mut back = [0u8; 512];
    f.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(back, [0x5a; 512]);
    assert_eq!(std::fs::metadata(&p).unwrap().modified().unwrap(), before);
    // Not a readable file: no.
    assert!(!completes_reads_inline(-1));
    let wo = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    assert!(!completes_reads_inline(wo.as_raw_fd()));
}

#[test]
fn write_read_flush_getid_every_engine() {
    for (engine, qcow2) in engines() {
        let mut r = rig(engine, qcow2, BlockConfig::default());
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let w = r.h.add_request(VIRTIO_BLK_T_OUT, 8, &data, false);
        let f = r.h.add_request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
        let used = r.run();
        assert_eq!(
            used,
            vec![(w.head, 1), (f.head, 1)],
            "{engine:?} qcow2={qcow2}"
        );
        assert_eq!(r.h.status(&w), VIRTIO_BLK_S_OK as u8);
        assert_eq!(r.h.status(&f), VIRTIO_BLK_S_OK as u8);

        let rd = r.h.add_request(VIRTIO_BLK_T_IN, 8, &[0u8; 4096], true);
        let id = r.h.add_request(VIRTIO_BLK_T_GET_ID, 0, &[0u8; 20], true);
        let mut used = r.run();
        used.sort();
        let mut want = vec![(rd.head, 4097), (id.head, 21)];
        want.sort();
        assert_eq!(used, want, "io_uring may complete out of order");
        assert_eq!(r.h.read(rd.data, 4096), data);
        assert_eq!(&r.h.read(id.data, 20)[..11], b"vmkit-block");

        let mut on_disk = vec![0u8; 4096];
        r.shared
            .disk
            .lock()
            .unwrap()
            .read_at(&mut on_disk, 8 * 512)
            .unwrap();
        assert_eq!(on_disk, data);
        let m = r.shared.metrics.snapshot();
        assert_eq!((m.reads, m.writes, m.flushes, m.get_ids), (1, 1, 1, 1));
        assert_eq!((m.read_bytes, m.write_bytes), (4096, 4096));
    }
}

#[test]
fn discard_and_write_zeroes_every_engine() {
    for (engine, qcow2) in engines() {
        let mut r = rig(engine, qcow2, BlockConfig::default());
        let w =
            r.h.add_request(VIRTIO_BLK_T_OUT, 0, &[0xaa; 65536 * 2], false);
        r.run();
        assert_eq!(r.h.status(&w), 0);
        let d = r.h.add_discard(VIRTIO_BLK_T_DISCARD, &[(0, 128, 0)]);
        let z = r.h.add_discard(
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(128, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), (200, 8, 0)],
        );
        let used = r.run();
        assert_eq!(used, vec![(d.head, 1), (z.head, 1)]);
        assert_eq!((r.h.status(&d), r.h.status(&z)), (0, 0));
        let mut buf = vec![1u8; 65536 * 2];
        r.shared.disk.lock().unwrap().read_at(&mut buf, 0).unwrap();
        for (i, b) in buf.iter().enumerate() {
            let sector = i / 512;
            let zero = sector < 136 || (200..208).contains(&sector);
            assert_eq!(
                *b,
                if zero { 0 } else { 0xaa },
                "byte {i} {engine:?} {qcow2}"
            );
        }
        let m = r.shared.metrics.snapshot();
        assert_eq!((m.discards, m.write_zeroes), (1, 1));
    }
}

#[test]
fn multi_segment_read_write() {
    for (engine, qcow2) in engines() {
        let mut r = rig(engine, qcow2, BlockConfig::default());
        let hdr = r.h.header(VIRTIO_BLK_T_OUT, 3);
        let a = r.h.alloc(512);
        let b = r.h.alloc(1024);
        r.h.mem.write_slice(&[1u8; 512], a).unwrap();
        r.h.mem.write_slice(&[2u8; 1024], b).unwrap();
        let st = r.h.alloc(1);
        use vm_memory::Bytes;
        use vmkit_block::test_utils::RawDesc;
        r.h.add_chain(&[
            RawDesc {
                addr: hdr.0,
                len: 16,
                writable: false,
            },
            RawDesc {
                addr: a.0,
                len: 512,
                writable: false,
            },
            RawDesc {
                addr: b.0,
                len: 1024,
                writable: false,
            },
            RawDesc {
                addr: st.0,
                len: 1,
                writable: true,
            },
        ]);
        assert_eq!(r.run().len(), 1);
        let mut buf = vec![0u8; 1536];
        r.shared
            .disk
            .lock()
            .unwrap()
            .read_at(&mut buf, 3 * 512)
            .unwrap();
        assert_eq!(&buf[..512], &[1u8; 512][..]);
        assert_eq!(&buf[512..], &[2u8; 1024][..]);
    }
}

#[test]
fn rate_limiter_throttles_then_resumes() {
    let cfg = BlockConfig {
        rate_limiter: RateLimiterConfig {
            bandwidth: None,
            ops: Some(BucketConfig {
                rate: 1000,
                capacity: 2,
                one_time_burst: 0,
            }),
        },
        ..Default::default()
    };
    let mut r = rig(EngineKind::Sync, false, cfg);
    for i in 0..4 {
        r.h.add_request(VIRTIO_BLK_T_OUT, i, &[0u8; 512], false);
    }
    let Rig {
        h, shared, worker, ..
    } = &mut r;
    let pass = worker.process(&mut h.queue, &h.mem, shared).unwrap();
    assert_eq!(pass.completed, 2);
    assert!(pass.throttled.is_some());
    assert_eq!(shared.metrics.snapshot().throttled_events, 1);
    std::thread::sleep(pass.throttled.unwrap() + std::time::Duration::from_millis(3));
    let pass = worker.process(&mut h.queue, &h.mem, shared).unwrap();
    assert_eq!(pass.completed, 2);
    assert_eq!(h.used().len(), 4);
}

#[test]
fn corrupt_available_index_is_an_error_not_a_hang() {
    use vm_memory::{Bytes, GuestAddress};
    for engine in [EngineKind::Sync, EngineKind::IoUring { depth: 4 }] {
        let mut r = rig(engine, false, BlockConfig::default());
        r.h.add_request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
        // The driver claims 1000 new entries in a 64-entry queue.
        let avail_idx = GuestAddress(vmkit_block::test_utils::AVAIL_RING + 2);
        r.h.mem.write_obj(1000u16, avail_idx).unwrap();
        let Rig {
            h, shared, worker, ..
        } = &mut r;
        let err = worker.process(&mut h.queue, &h.mem, shared).unwrap_err();
        assert!(matches!(
            err,
            vmkit_block::worker::WorkerError::Queue(virtio_queue::Error::InvalidAvailRingIndex)
        ));
    }
}
