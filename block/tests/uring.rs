//! The io_uring engine's system calls and wake-ups: a request the kernel completes inside
//! `io_uring_enter` costs that one call and no eventfd traffic; one completed later wakes the
//! completion eventfd.
//!
//! The oracle for system calls is the kernel's own count of read-type calls of this thread
//! (`syscr` in `/proc/thread-self/io`, proc(5)): `read`, `pread64`, `readv` and `preadv2` add
//! one each, io_uring operations add none.

use std::os::fd::AsRawFd;
use std::sync::Mutex;

use vmkit_block::config::BlockConfig;
use vmkit_block::defs::*;
use vmkit_block::image::DiskImage;
use vmkit_block::metrics::BlockMetrics;
use vmkit_block::rate_limiter::RateLimiter;
use vmkit_block::test_utils::{BlockHarness, TempImages};
use vmkit_block::uring::completes_reads_inline;
use vmkit_block::worker::{BlockShared, EngineKind, QueueWorker};

const DISK: u64 = 4 << 20;
const REQUESTS: u64 = 64;

struct Rig {
    h: BlockHarness,
    shared: BlockShared,
    worker: QueueWorker,
    _dir: TempImages,
}

fn rig(engine: EngineKind, tmpfs: bool) -> Rig {
    let dir = TempImages::new(tmpfs).unwrap();
    let mut raw = dir.raw("d.raw", DISK).unwrap();
    // Written through the page cache, so every read below is a cache hit.
    raw.write_at(&vec![0x3c; DISK as usize], 0).unwrap();
    let cfg = BlockConfig::default();
    let worker = QueueWorker::new(engine, &raw, cfg.id_bytes()).unwrap();
    let shared = BlockShared {
        parse_cfg: cfg.parse_config(DISK / 512, 0, false),
        disk: Mutex::new(Box::new(raw)),
        metrics: BlockMetrics::default(),
        limiter: Mutex::new(RateLimiter::new(cfg.rate_limiter)),
    };
    Rig {
        h: BlockHarness::new(256),
        shared,
        worker,
        _dir: dir,
    }
}

/// This thread's read-type system calls so far (reading the file adds a constant few).
fn syscr() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/io").expect("task I/O accounting");
    s.lines()
        .find_map(|l| l.strip_prefix("syscr: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("a syscr line")
}

/// Read-type system calls of `f`, less those of reading the counter itself.
fn reads_during(f: impl FnOnce()) -> u64 {
    let a = syscr();
    let b = syscr();
    f();
    let c = syscr();
    (c - b).saturating_sub(b - a)
}

/// `REQUESTS` 4 KiB reads one at a time (queue depth 1), each placed, then one pass.
fn reads_at_depth_1(r: &mut Rig) {
    for i in 0..REQUESTS {
        let p = r.h.add_request(VIRTIO_BLK_T_IN, i * 8, &[0u8; 4096], true);
        r.worker
            .process(&mut r.h.queue, &r.h.mem, &r.shared)
            .unwrap();
        assert_eq!(r.worker.in_flight(), 0, "completed inside the pass");
        assert_eq!(r.h.used(), vec![(p.head, 4097)]);
        assert_eq!(r.h.status(&p), VIRTIO_BLK_S_OK as u8);
    }
}

#[test]
fn inline_completions_cost_no_eventfd_reads() {
    let dir = TempImages::new(false).unwrap();
    let probe = dir.raw("probe.raw", 4096).unwrap();
    assert!(
        completes_reads_inline(probe.raw_fd().unwrap()),
        "this test needs a disk filesystem whose page-cached reads io_uring completes inline \
         (RWF_NOWAIT): ext4, xfs or btrfs under the temporary directory"
    );

    // The counter's own check: the sync engine's fast path is one pread64 per request.
    let mut sync = rig(EngineKind::Sync, false);
    let n = reads_during(|| reads_at_depth_1(&mut sync));
    assert_eq!(n, REQUESTS, "one pread64 per sync request");

    // io_uring: the read is done inside io_uring_enter and reaped in the same pass; the
    // completion eventfd is neither signalled nor read (before the fix: one eventfd read
    // per pass, so REQUESTS here).
    let mut uring = rig(EngineKind::IoUring { depth: 8 }, false);
    let fd = uring.worker.uring().unwrap().completion_fd().as_raw_fd();
    let n = reads_during(|| reads_at_depth_1(&mut uring));
    assert_eq!(
        n, 0,
        "no read-type system call for inline io_uring completions"
    );
    assert!(
        !readable(fd, 0),
        "no completion was left for the event loop"
    );
    assert_eq!(uring.shared.metrics.snapshot().read_bytes, REQUESTS * 4096);
}

/// Whether `fd` polls readable within `ms` milliseconds.
fn readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on this stack frame; poll writes only its `revents`.
    let rc = unsafe { libc::poll(&mut p, 1, ms) };
    rc == 1 && p.revents & libc::POLLIN != 0
}

#[test]
fn completions_after_the_pass_wake_the_eventfd() {
    // On tmpfs (no RWF_NOWAIT on this kernel) and for buffered ext4 writes, io_uring hands
    // requests to io-wq workers: they complete after the pass, and must wake the event loop
    // even though the pass muted the eventfd while submitting.
    for (tmpfs, write) in [(true, false), (true, true), (false, true)] {
        let mut r = rig(EngineKind::IoUring { depth: 16 }, tmpfs);
        let fd = r.worker.uring().unwrap().completion_fd().as_raw_fd();
        // Round 0 submits with the eventfd muted; having seen requests left in flight after
        // that submission, the engine submits round 1 unmuted.
        for round in 0..2 {
            wake_after_pass(&mut r, fd, tmpfs, write, round);
        }
    }
}

fn wake_after_pass(r: &mut Rig, fd: i32, tmpfs: bool, write: bool, round: u64) {
    {
        let mut heads = Vec::new();
        for i in 0..8u64 {
            let sector = (round * 8 + i) * 8;
            let p = if write {
                r.h.add_request(VIRTIO_BLK_T_OUT, sector, &[0x77; 4096], false)
            } else {
                r.h.add_request(VIRTIO_BLK_T_IN, sector, &[0u8; 4096], true)
            };
            heads.push(p);
        }
        r.worker
            .process(&mut r.h.queue, &r.h.mem, &r.shared)
            .unwrap();
        let mut done = r.h.used().len();
        while done < heads.len() {
            assert!(
                readable(fd, 10_000),
                "tmpfs={tmpfs} write={write} round {round}: requests in flight but no wake-up \
                 ({done} done)"
            );
            r.worker
                .complete(&mut r.h.queue, &r.h.mem, &r.shared)
                .unwrap();
            done += r.h.used().len();
        }
        assert_eq!(r.worker.in_flight(), 0);
        for p in &heads {
            assert_eq!(r.h.status(p), VIRTIO_BLK_S_OK as u8);
        }
    }
}
