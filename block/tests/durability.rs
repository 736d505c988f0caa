//! Durability: data written and FLUSHed through the device survives dropping everything and
//! reopening the image; a qcow2 image stays consistent (`qemu-img check`) after a simulated
//! crash (the process state is abandoned without any cleanup) at random points of a write
//! workload, and every sector last written before an acknowledged flush reads back.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use vmkit_block::config::BlockConfig;
use vmkit_block::defs::*;
use vmkit_block::image::{self, DiskImage, ImageFormat, OpenOptions, Qcow2Image, RawImage};
use vmkit_block::metrics::BlockMetrics;
use vmkit_block::rate_limiter::RateLimiter;
use vmkit_block::test_utils::{BlockHarness, TempImages};
use vmkit_block::worker::{BlockShared, EngineKind, QueueWorker};

const SIZE: u64 = 2 << 20;

fn device(disk: Box<dyn DiskImage>, engine: EngineKind) -> (BlockShared, QueueWorker) {
    let cfg = BlockConfig::default();
    let worker = QueueWorker::new(engine, &*disk, cfg.id_bytes()).unwrap();
    let shared = BlockShared {
        parse_cfg: cfg.parse_config(SIZE / 512, cfg.features(false), false),
        disk: Mutex::new(disk),
        metrics: BlockMetrics::default(),
        limiter: Mutex::new(RateLimiter::new(cfg.rate_limiter)),
    };
    (shared, worker)
}

/// Options to open the test's image, raw or qcow2.
fn opts(qcow2: bool, read_only: bool) -> OpenOptions {
    let format = if qcow2 {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    };
    OpenOptions::new(format).read_only(read_only)
}

#[test]
fn flushed_data_survives_reopen() {
    for qcow2 in [false, true] {
        for engine in [EngineKind::Sync, EngineKind::IoUring { depth: 16 }] {
            let dir = TempImages::new(false).unwrap();
            let path = dir.path("d.img");
            if qcow2 {
                Qcow2Image::create(&path, SIZE, None).unwrap();
            } else {
                RawImage::create(&path, SIZE).unwrap();
            }
            let (shared, mut worker) =
                device(image::open(&path, &opts(qcow2, false)).unwrap(), engine);
            let mut h = BlockHarness::new(64);
            let data: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
            let w = h.add_request(VIRTIO_BLK_T_OUT, 40, &data, false);
            let f = h.add_request(VIRTIO_BLK_T_FLUSH, 0, &[], false);
            worker.process(&mut h.queue, &h.mem, &shared).unwrap();
            worker.drain(&mut h.queue, &h.mem, &shared).unwrap();
            assert_eq!((h.status(&w), h.status(&f)), (0, 0));
            drop(worker);
            drop(shared);

            let mut img = image::open(&path, &opts(qcow2, true)).unwrap();
            let mut back = vec![0u8; 8192];
            img.read_at(&mut back, 40 * 512).unwrap();
            assert_eq!(back, data, "qcow2={qcow2} {engine:?}");
        }
    }
}

fn qemu_check_consistent(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", path.to_str().unwrap()])
        .output()
        .expect("qemu-img not runnable (install qemu-utils)");
    // Exit 0: clean; 3: only leaked clusters (allocated, unreferenced), which a crash may leave
    // and which lose no data. 1 (check failed) and 2 (corruption) are errors.
    let code = out.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "qemu-img check after crash: {code:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn qcow2_consistent_after_crash_at_random_points() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..6 {
        let dir = TempImages::new(false).unwrap();
        let path = dir.path("c.qcow2");
        Qcow2Image::create(&path, SIZE, None).unwrap();
        let mut img = Qcow2Image::open(&path, false).unwrap();
        let sectors = (SIZE / 512) as usize;
        let mut durable = vec![0u8; sectors]; // per-sector fill byte as of the last flush
        let mut current = durable.clone();
        let mut dirty = vec![false; sectors]; // written since the last flush
        let crash_at = 20 + (rnd() % 120) as usize;
        for step in 0..crash_at {
            let r = rnd();
            let first = (r % (sectors as u64 - 64)) as usize;
            let n = 1 + ((r >> 32) % 64) as usize;
            match r % 7 {
                0 => {
                    img.flush().unwrap();
                    durable.copy_from_slice(&current);
                    dirty.fill(false);
                }
                1 => {
                    img.discard(first as u64 * 512, n as u64 * 512).unwrap();
                    current[first..first + n].fill(0);
                    dirty[first..first + n].fill(true);
                }
                _ => {
                    let b = (step as u8).wrapping_mul(37) | 1;
                    img.write_at(&vec![b; n * 512], first as u64 * 512).unwrap();
                    current[first..first + n].fill(b);
                    dirty[first..first + n].fill(true);
                }
            }
        }
        // Crash: no destructor, no cache write-back, no flush.
        std::mem::forget(img);

        qemu_check_consistent(&path);
        let mut img = image::open(&path, &opts(true, true)).unwrap();
        let mut sector = [0u8; 512];
        for s in 0..sectors {
            img.read_at(&mut sector, s as u64 * 512).unwrap();
            if dirty[s] {
                // Written after the last flush: either the old or the new content.
                let ok = sector.iter().all(|&b| b == durable[s])
                    || sector.iter().all(|&b| b == current[s]);
                assert!(ok, "round {round}: torn sector {s}");
            } else {
                assert!(
                    sector.iter().all(|&b| b == durable[s]),
                    "round {round}: flushed sector {s} lost"
                );
            }
        }
    }
}
