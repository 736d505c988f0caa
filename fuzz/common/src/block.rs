//! Fuzz vmkit-block.
//!
//! * [`run_request`]: arbitrary descriptor table, available ring and guest memory contents fed
//!   to the virtio-blk queue worker (parser + execution) over a raw image on a temp file, with
//!   the synchronous or the io_uring engine. Invariants: nothing panics or hangs; every used
//!   entry names a head that was published; used lengths never exceed what the chain could
//!   hold; and with the synchronous engine, the worker's fast path for single-buffer reads and
//!   writes and its general path leave the same used ring, guest memory, image and counters.
//! * [`run_qcow2`]: arbitrary bytes checked with `qcow2_check::check`, then opened as a qcow2
//!   image (nothing it names is opened), read at a few offsets and, on a writable copy,
//!   written, flushed and read back. Invariants: nothing panics or hangs; the check keeps at
//!   most `MAX_FINDINGS` findings; and an image the check finds consistent gets no harmful
//!   finding from the writes (imago's allocations, trusted only on such images, never overlap
//!   live clusters; see `harmless_after_writes`). Read-after-write equality does not hold for corrupt images: with refcounts
//!   claiming referenced clusters are free, a write may reuse a metadata cluster — the fuzzer
//!   found such an image, kept as the `corrupt_refcounts` seed; the check reports it, and
//!   a checked writable open (`Qcow2Image::open`) refuses it.
//!
//! Input of [`run_request`] (all little-endian):
//! `flags: u8` (bit0 read-only, bit1 FLUSH, bit2 DISCARD, bit3 WRITE_ZEROES, bit4 io_uring),
//! `seg_max: u8`, `ndesc: u8` (mod 17), `ndesc` raw 16-byte `virtq_desc`s, `nheads: u8`
//! (mod 33), `nheads` u16 heads, then bytes copied to guest memory at `BUF_START`.

use std::io::Write;
use std::sync::{Mutex, OnceLock};

use vm_memory::{Bytes, GuestAddress};

/// `VRING_DESC_F_INDIRECT` (virtio 1.2 §2.7.5.3).
const VRING_DESC_F_INDIRECT: u16 = 4;
use vmkit_block::config::BlockConfig;
use vmkit_block::image::qcow2_check::{self, MAX_FINDINGS};
use vmkit_block::image::{
    BackingPolicy, DiskImage, ImageFormat, OpenOptions, Qcow2Image, RawImage,
};
use vmkit_block::metrics::BlockMetrics;
use vmkit_block::rate_limiter::RateLimiter;
use vmkit_block::test_utils::{BUF_START, BlockHarness, TempImages};
use vmkit_block::worker::{BlockShared, EngineKind, QueueWorker};

/// Queue size of the fuzzed device.
pub const QSIZE: u16 = 16;
/// Guest memory of the fuzzed device.
pub const MEM: u64 = 256 * 1024;
/// Disk size of the fuzzed device.
pub const DISK: u64 = 1 << 20;

fn images() -> &'static Mutex<TempImages> {
    static DIR: OnceLock<Mutex<TempImages>> = OnceLock::new();
    DIR.get_or_init(|| Mutex::new(TempImages::new(true).expect("temp dir")))
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

/// Build the [`run_request`] input for the given descriptors `(addr, len, flags, next)`,
/// heads and memory contents.
pub fn encode_request(
    flags: u8,
    seg_max: u8,
    descs: &[(u64, u32, u16, u16)],
    heads: &[u16],
    memory: &[u8],
) -> Vec<u8> {
    let mut v = vec![flags, seg_max, descs.len() as u8];
    for (a, l, f, n) in descs {
        v.extend_from_slice(&a.to_le_bytes());
        v.extend_from_slice(&l.to_le_bytes());
        v.extend_from_slice(&f.to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
    }
    v.push(heads.len() as u8);
    for h in heads {
        v.extend_from_slice(&h.to_le_bytes());
    }
    v.extend_from_slice(memory);
    v
}

/// What a request stream leaves behind: used ring, guest memory, counters (the image stays in
/// its file).
struct Outcome {
    used: Vec<(u16, u32)>,
    mem: vm_memory::GuestMemoryMmap,
    metrics: vmkit_block::metrics::BlockMetricsSnapshot,
}

impl Outcome {
    /// All of guest memory, as the host sees it.
    fn memory(&self) -> &[u8] {
        use vm_memory::GuestMemoryBackend;
        let host = self.mem.get_host_address(GuestAddress(0)).expect("memory");
        // SAFETY: the harness maps `MEM` bytes from guest address 0 in one region, alive as
        // long as `self.mem`; nothing writes it while the comparison reads.
        unsafe { std::slice::from_raw_parts(host, MEM as usize) }
    }
}

/// Whether two image files hold the same bytes. Only the stretches either file has data in are
/// read (`SEEK_DATA`/`SEEK_HOLE`): elsewhere both read as zeroes. Reading two whole 1 MiB
/// images per input made the target ten times slower.
fn same_images(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let (Ok(fa), Ok(fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else {
        return false;
    };
    let extents = |f: &std::fs::File| {
        let mut out = Vec::new();
        let mut off = 0i64;
        loop {
            // SAFETY: plain system calls on an open file descriptor.
            let data = unsafe { libc::lseek(f.as_raw_fd(), off, libc::SEEK_DATA) };
            if data < 0 {
                return out;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
            if hole <= data {
                return out;
            }
            out.push((data as u64, hole as u64));
            off = hole;
        }
    };
    let mut ranges = extents(&fa);
    ranges.extend(extents(&fb));
    let (mut x, mut y) = (Vec::new(), Vec::new());
    ranges.iter().all(|&(start, end)| {
        let n = (end - start) as usize;
        x.resize(n, 0);
        y.resize(n, 0);
        fa.read_exact_at(&mut x, start).is_ok() && fb.read_exact_at(&mut y, start).is_ok() && x == y
    })
}

/// One fuzz iteration of the request path. With the synchronous engine the input runs twice,
/// with the worker's fast path for single-buffer reads and writes on and off, on two fresh
/// images: both runs must leave the same used ring, guest memory, image and counters.
pub fn run_request(data: &[u8]) {
    let uring = data.first().is_some_and(|f| f & 16 != 0);
    let dir = images().lock().unwrap_or_else(|e| e.into_inner());
    if uring {
        run_request_once(data, &dir, "fuzz.raw", true);
        return;
    }
    let fast = run_request_once(data, &dir, "fuzz_fast.raw", true);
    let general = run_request_once(data, &dir, "fuzz_general.raw", false);
    if let (Some(fast), Some(general)) = (fast, general) {
        assert_eq!(fast.used, general.used, "used rings differ");
        assert_eq!(fast.metrics, general.metrics, "metrics differ");
        assert!(fast.memory() == general.memory(), "guest memory differs");
        assert!(
            same_images(&dir.path("fuzz_fast.raw"), &dir.path("fuzz_general.raw")),
            "images differ"
        );
    }
}

/// Run `data` on a fresh image `name`, with the fast path on or off.
fn run_request_once(data: &[u8], dir: &TempImages, name: &str, fast: bool) -> Option<Outcome> {
    let mut r = Reader(data);
    let flags = r.u8();
    let seg_max = u32::from(r.u8()).max(1);
    let mut h = BlockHarness::with_mem_size(QSIZE, MEM);
    let ndesc = r.u8() % (QSIZE as u8 + 1);
    // Whether every buffer lies above the rings: a driver may point a buffer at its own rings
    // (the device then writes there as asked, e.g. a GET_ID into the used ring), and then the
    // used ring can hold anything.
    let mut rings_untouched = true;
    for i in 0..u16::from(ndesc) {
        let d = r.bytes(16);
        let mut raw = [0u8; 16];
        raw[..d.len()].copy_from_slice(d);
        let addr = u64::from_le_bytes([
            raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
        ]);
        let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let f = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        rings_untouched &= addr >= BUF_START && f & VRING_DESC_F_INDIRECT == 0;
        h.write_desc(i, addr, len, f, next);
    }
    let nheads = r.u8() % 33;
    let mut heads = Vec::new();
    for _ in 0..nheads {
        let b = r.bytes(2);
        let head = u16::from_le_bytes([
            b.first().copied().unwrap_or(0),
            b.get(1).copied().unwrap_or(0),
        ]);
        heads.push(head);
    }
    let memory = r.bytes(usize::MAX);
    let n = memory.len().min((MEM - BUF_START) as usize);
    let _ = h.mem.write_slice(&memory[..n], GuestAddress(BUF_START));
    for &head in &heads {
        h.publish(head);
    }

    let read_only = flags & 1 != 0;
    let cfg = BlockConfig {
        read_only,
        flush: flags & 2 != 0,
        discard: flags & 4 != 0,
        write_zeroes: flags & 8 != 0,
        seg_max,
        ..Default::default()
    };
    let engine = if flags & 16 != 0 {
        EngineKind::IoUring { depth: 4 }
    } else {
        EngineKind::Sync
    };
    let path = dir.path(name);
    let disk = match RawImage::create(&path, DISK) {
        Ok(d) if !read_only => d,
        Ok(_) => RawImage::open(&path, true).expect("fuzz image"),
        Err(e) => panic!("fuzz image: {e}"),
    };
    let mut worker = QueueWorker::new(engine, &disk, cfg.id_bytes())
        .ok()?
        .with_fast_path(fast);
    let shared = BlockShared {
        parse_cfg: cfg.parse_config(DISK / 512, cfg.features(read_only), read_only),
        disk: Mutex::new(Box::new(disk)),
        metrics: BlockMetrics::default(),
        limiter: Mutex::new(RateLimiter::new(cfg.rate_limiter)),
    };
    let _ = worker.process(&mut h.queue, &h.mem, &shared);
    let _ = worker.drain(&mut h.queue, &h.mem, &shared);
    let used = h.used();
    for &(id, len) in &used {
        if !rings_untouched {
            continue;
        }
        assert!(heads.contains(&id), "used id {id} was never published");
        assert!(len <= (1 << 20) + 1 + 16 * 1024, "used len {len} too large");
    }
    Some(Outcome {
        used,
        mem: h.mem,
        metrics: shared.metrics.snapshot(),
    })
}

/// One fuzz iteration of qcow2 parsing (inputs starting with `CHAIN` are backing chains:
/// [`crate::qcow2_chain`]).
pub fn run_qcow2(data: &[u8]) {
    if data.len() > 4 << 20 {
        return;
    }
    if data.starts_with(crate::qcow2_chain::CHAIN_MAGIC) {
        return crate::qcow2_chain::run(data);
    }
    let dir = images().lock().unwrap_or_else(|e| e.into_inner());
    let path = dir.path("fuzz.qcow2");
    let Ok(mut f) = std::fs::File::create(&path) else {
        return;
    };
    if f.write_all(data).is_err() {
        return;
    }
    drop(f);
    let report = qcow2_check::check(&path);
    if let Ok(r) = &report {
        assert!(r.findings.len() <= MAX_FINDINGS);
        let corrupt = r
            .findings
            .iter()
            .filter(|f| counts_as_corruption(f))
            .count();
        assert!(r.corruptions >= corrupt as u64, "{r:?}");
    }
    let consistent = report.as_ref().is_ok_and(|r| r.is_consistent());
    // The fuzzed file is opened as the image it claims to be, naming no other file: a
    // backing name is refused, the consistency check is off (the write guard stands alone).
    let opts = |read_only| {
        OpenOptions::new(ImageFormat::Qcow2)
            .read_only(read_only)
            .backing(BackingPolicy::Deny)
            .check_consistency(false)
    };
    if let Ok(mut img) = Qcow2Image::open_with(&path, &opts(true)) {
        let size = img.size();
        let mut buf = vec![0u8; 65536];
        for off in [0, size / 2, size.saturating_sub(65536)] {
            let n = (size - off.min(size)).min(buf.len() as u64) as usize;
            let _ = img.read_at(&mut buf[..n], off);
        }
    }
    if let Ok(mut img) = Qcow2Image::open_with(&path, &opts(false)) {
        let size = img.size();
        let mut wrote = false;
        if size >= 4096 {
            for (i, off) in [size / 3, 0, size - 4096].into_iter().enumerate() {
                let off = off & !511;
                if img.write_at(&[0xa5 ^ i as u8; 4096], off).is_ok() && img.flush().is_ok() {
                    wrote = true;
                    let mut back = [0u8; 4096];
                    let _ = img.read_at(&mut back, off);
                }
            }
        }
        drop(img);
        if consistent && wrote {
            let after = qcow2_check::check(&path);
            let Ok(r) = &after else {
                panic!("a consistent image became unreadable after writes: {after:?}");
            };
            assert!(
                r.findings.iter().all(harmless_after_writes),
                "a consistent image became inconsistent after writes: {r:?}"
            );
        }
    }
}

/// Whether a finding of the check after writes to a consistent image is harmless: a leak, or a
/// `COPIED` flag *clear* on a cluster of refcount 1 (imago then copies before writing, wasting
/// a cluster). That one is reachable: in a consistent image where one cluster is both an L2
/// table and a data cluster of that table (refcount 2, `COPIED` clear — `qemu-img check`
/// accepts it), the copy-on-write of the L2 table drops the refcount to 1 and leaves the
/// entry's flag clear (fuzz finding). Anything else — a refcount below the references, or
/// `COPIED` set on a shared cluster — would let imago overwrite live data.
fn harmless_after_writes(f: &qcow2_check::Finding) -> bool {
    use qcow2_check::Finding;
    const QCOW_OFLAG_COPIED: u64 = 1 << 63;
    match f {
        Finding::Leaked { .. } => true,
        Finding::CopiedFlag {
            entry, refcount, ..
        } => entry & QCOW_OFLAG_COPIED == 0 && *refcount == 1,
        _ => false,
    }
}

/// Generated `qcow2_image` seeds for the consistency check: tiny hand-built v3 images (512-byte
/// clusters, 64 KiB disk, 16-bit refcounts) — `check_snapshot_shared`, consistent, with one
/// internal snapshot whose L1 table shares the L2 table and data cluster (refcount 2, `COPIED`
/// clear); `check_l2_refcount_0`, the same without the snapshot and with the L2 table's
/// refcount 0 (the image imago would overwrite metadata in).
pub fn qcow2_seeds() -> Vec<(String, Vec<u8>)> {
    vec![
        ("check_snapshot_shared".into(), qcow2_seed(true)),
        ("check_l2_refcount_0".into(), qcow2_seed(false)),
    ]
}

/// Cluster `n` of a seed (512-byte clusters).
const fn c(n: u64) -> u64 {
    n * 512
}

/// The consistent single-layer image of the seeds (no snapshot, every refcount 1).
pub(crate) fn qcow2_seed_layer() -> Vec<u8> {
    let mut b = qcow2_seed(false);
    // Cluster 4 (the L2 table) back to refcount 1 and COPIED set as for refcount 1.
    b[c(2) as usize + 8..c(2) as usize + 10].copy_from_slice(&1u16.to_be_bytes());
    b
}

fn qcow2_seed(snapshot: bool) -> Vec<u8> {
    const COPIED: u64 = 1 << 63;
    let clusters = if snapshot { 8 } else { 6 };
    let mut b = vec![0u8; clusters * 512];
    let mut put = |at: u64, v: &[u8]| {
        let at = at as usize;
        b[at..at + v.len()].copy_from_slice(v);
    };
    // Header (qcow2 specification, "Header"): version 3, cluster_bits 9, 64 KiB, L1 of 2
    // entries at cluster 3, refcount table (1 cluster) at 1, refcount_order 4, length 104.
    put(0, b"QFI\xfb");
    put(4, &3u32.to_be_bytes());
    put(20, &9u32.to_be_bytes());
    put(24, &(64u64 << 10).to_be_bytes());
    put(36, &2u32.to_be_bytes());
    put(40, &c(3).to_be_bytes());
    put(48, &c(1).to_be_bytes());
    put(56, &1u32.to_be_bytes());
    put(96, &4u32.to_be_bytes());
    put(100, &104u32.to_be_bytes());
    put(c(1), &c(2).to_be_bytes()); // refcount table → refcount block at cluster 2
    let shared = if snapshot { 0 } else { COPIED };
    put(c(3), &(c(4) | shared).to_be_bytes()); // L1[0] → L2 at cluster 4
    put(c(4), &(c(5) | shared).to_be_bytes()); // L2[0] → data at cluster 5
    put(c(5), &[0x5a; 512]);
    let mut refcounts = vec![1u16; clusters];
    if snapshot {
        // One snapshot (table at cluster 6, its L1 copy at cluster 7); id "1", name "s1",
        // 24 bytes of extra data (vm_state_size_large 0, disk_size 64 KiB, icount -1).
        put(60, &1u32.to_be_bytes());
        put(64, &c(6).to_be_bytes());
        put(c(6), &c(7).to_be_bytes());
        put(c(6) + 8, &2u32.to_be_bytes());
        put(c(6) + 12, &[0, 1, 0, 2]);
        put(c(6) + 36, &24u32.to_be_bytes());
        put(c(6) + 48, &(64u64 << 10).to_be_bytes());
        put(c(6) + 56, &u64::MAX.to_be_bytes());
        put(c(6) + 64, b"1s1");
        put(c(7), &c(4).to_be_bytes());
        refcounts[4] = 2;
        refcounts[5] = 2;
    } else {
        refcounts[4] = 0;
    }
    for (i, r) in refcounts.iter().enumerate() {
        put(c(2) + 2 * i as u64, &r.to_be_bytes());
    }
    b
}

/// Whether a finding is counted in `corruptions` (leaks and unreadable refcounts are not).
fn counts_as_corruption(f: &qcow2_check::Finding) -> bool {
    !matches!(
        f,
        qcow2_check::Finding::Leaked { .. } | qcow2_check::Finding::UnreadableRefcount { .. }
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn replay_corpus_blk_request() {
        let seeds = crate::corpus("blk_request");
        assert!(!seeds.is_empty());
        for s in seeds {
            super::run_request(&s);
        }
    }

    #[test]
    fn qcow2_seeds_are_in_the_corpus_and_check_as_expected() {
        use vmkit_block::image::qcow2_check::check;
        let dir = vmkit_block::test_utils::TempImages::new(false).unwrap();
        for (name, data) in super::qcow2_seeds() {
            let path = dir.path(&name);
            std::fs::write(&path, &data).unwrap();
            let r = check(&path).unwrap();
            let expect = if name == "check_l2_refcount_0" { 2 } else { 0 };
            assert_eq!((r.corruptions, r.leaks), (expect, 0), "{name}: {r:?}");
        }
        crate::check_seed_files("qcow2_image", super::qcow2_seeds());
    }

    #[test]
    fn replay_corpus_qcow2_image() {
        let seeds = crate::corpus("qcow2_image");
        assert!(!seeds.is_empty());
        for s in seeds {
            super::run_qcow2(&s);
        }
    }
}
