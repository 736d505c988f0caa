//! proptest: random writes, discards and write-zeroes on raw and qcow2 images (directly and
//! through the device) give the same bytes as a plain in-memory model.

use std::sync::Mutex;

use proptest::prelude::*;
use vmkit_block::config::BlockConfig;
use vmkit_block::defs::*;
use vmkit_block::image::{DiskImage, Qcow2Image};
use vmkit_block::metrics::BlockMetrics;
use vmkit_block::rate_limiter::RateLimiter;
use vmkit_block::test_utils::{BlockHarness, TempImages, read_all};
use vmkit_block::worker::{BlockShared, EngineKind, QueueWorker};

const SIZE: u64 = 1 << 20;
const SECTORS: u64 = SIZE / 512;

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        count: u64,
        byte: u8,
    },
    Discard {
        sector: u64,
        count: u64,
    },
    WriteZeroes {
        sector: u64,
        count: u64,
        unmap: bool,
    },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..SECTORS).prop_flat_map(|s| (Just(s), 1..=(SECTORS - s).min(300)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((sector, count), byte)| Op::Write { sector, count, byte }),
        2 => range.clone().prop_map(|(sector, count)| Op::Discard { sector, count }),
        2 => (range, any::<bool>()).prop_map(|((sector, count), unmap)| Op::WriteZeroes { sector, count, unmap }),
        1 => Just(Op::Flush),
    ]
}

fn apply_model(model: &mut [u8], op: &Op) {
    let span = |s: u64, c: u64| (s * 512) as usize..((s + c) * 512) as usize;
    match *op {
        Op::Write {
            sector,
            count,
            byte,
        } => model[span(sector, count)].fill(byte),
        Op::Discard { sector, count } | Op::WriteZeroes { sector, count, .. } => {
            model[span(sector, count)].fill(0)
        }
        Op::Flush => {}
    }
}

fn open(dir: &TempImages, qcow2: bool) -> Box<dyn DiskImage> {
    if qcow2 {
        let p = dir.path("m.qcow2");
        Qcow2Image::create(&p, SIZE, None).unwrap();
        Box::new(Qcow2Image::open(&p, false).unwrap())
    } else {
        Box::new(dir.raw("m.raw", SIZE).unwrap())
    }
}

fn check_image(qcow2: bool, ops: &[Op]) {
    let dir = TempImages::new(true).unwrap();
    let mut img = open(&dir, qcow2);
    let mut model = vec![0u8; SIZE as usize];
    for op in ops {
        match *op {
            Op::Write {
                sector,
                count,
                byte,
            } => img
                .write_at(&vec![byte; (count * 512) as usize], sector * 512)
                .unwrap(),
            Op::Discard { sector, count } => img.discard(sector * 512, count * 512).unwrap(),
            Op::WriteZeroes {
                sector,
                count,
                unmap,
            } => img.write_zeroes(sector * 512, count * 512, unmap).unwrap(),
            Op::Flush => img.flush().unwrap(),
        }
        apply_model(&mut model, op);
    }
    assert!(read_all(&mut *img).unwrap() == model);
}

fn check_device(qcow2: bool, engine: EngineKind, ops: &[Op]) {
    let dir = TempImages::new(true).unwrap();
    let disk = open(&dir, qcow2);
    let cfg = BlockConfig::default();
    let mut worker = QueueWorker::new(engine, &*disk, cfg.id_bytes()).unwrap();
    let shared = BlockShared {
        parse_cfg: cfg.parse_config(SECTORS, cfg.features(false), false),
        disk: Mutex::new(disk),
        metrics: BlockMetrics::default(),
        limiter: Mutex::new(RateLimiter::new(cfg.rate_limiter)),
    };
    let mut h = BlockHarness::new(256);
    let mut model = vec![0u8; SIZE as usize];
    for chunk in ops.chunks(16) {
        h.reset_buffers();
        let mut placed = Vec::new();
        for op in chunk {
            let p = match *op {
                Op::Write {
                    sector,
                    count,
                    byte,
                } => h.add_request(
                    VIRTIO_BLK_T_OUT,
                    sector,
                    &vec![byte; (count * 512) as usize],
                    false,
                ),
                Op::Discard { sector, count } => {
                    h.add_discard(VIRTIO_BLK_T_DISCARD, &[(sector, count as u32, 0)])
                }
                Op::WriteZeroes {
                    sector,
                    count,
                    unmap,
                } => h.add_discard(
                    VIRTIO_BLK_T_WRITE_ZEROES,
                    &[(sector, count as u32, u32::from(unmap))],
                ),
                Op::Flush => h.add_request(VIRTIO_BLK_T_FLUSH, 0, &[], false),
            };
            placed.push(p);
            apply_model(&mut model, op);
        }
        // The synchronous engine executes in ring order, so overlapping requests of one batch
        // follow the model's order (io_uring may reorder them, as virtio allows).
        worker.process(&mut h.queue, &h.mem, &shared).unwrap();
        worker.drain(&mut h.queue, &h.mem, &shared).unwrap();
        for p in &placed {
            assert_eq!(h.status(p), VIRTIO_BLK_S_OK as u8);
        }
    }
    let mut disk = shared.disk.lock().unwrap();
    assert!(read_all(&mut **disk).unwrap() == model);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn raw_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        check_image(false, &ops);
    }

    #[test]
    fn qcow2_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        check_image(true, &ops);
    }

    #[test]
    fn device_sync_matches_model(qcow2 in any::<bool>(), ops in proptest::collection::vec(op(), 1..40)) {
        check_device(qcow2, EngineKind::Sync, &ops);
    }
}
