//! `blk_bench`: `qemu-img bench` for vmkit-block — the same options and access pattern, with the
//! requests going through the virtio-blk device model, so one image can be measured by both
//! tools in one run.
//!
//! ```text
//! blk_bench [-c COUNT] [-d DEPTH] [-s SIZE] [-S STEP] [-o OFFSET] [-w] [-f raw|qcow2]
//!           [-t none|writeback] [-i sync|io_uring] IMAGE
//! ```
//!
//! As `qemu-img bench` (qemu-img.c, `img_bench`/`bench_cb`): COUNT requests (default 75000) of
//! SIZE bytes (default 4096; suffixes `k`, `M`, `G`), reads unless `-w` (writes of zeroes), at
//! most DEPTH (default 64) in flight; the first at OFFSET (default 0), each next one STEP bytes
//! further (default SIZE), wrapping at the image size; `-t none` opens the image with
//! `O_DIRECT` (raw only: vmkit-block's qcow2 always goes through the page cache), `-t
//! writeback` (the default) without; `-i` picks the device's engine (`sync`, the default, or
//! `io_uring`; qcow2 always runs synchronously). A request that does not complete with
//! `VIRTIO_BLK_S_OK` ends the run with an error, as in QEMU.
//!
//! The requests are real virtio-blk requests: vmkit-block's driver harness (guest memory and a
//! split virtqueue, filled as a driver would) places header, data and status descriptors, one
//! fixed chain per in-flight slot with its data buffer 4 KiB-aligned (for `O_DIRECT`), and the
//! device's queue worker takes them, as a VMM's queue notification does. With io_uring, when a
//! pass leaves requests in flight, the tool waits on the queue's completion eventfd and then
//! lets the worker complete them, as the VMM's event loop does. No KVM: this measures the
//! block layer, as `qemu-img bench` does for QEMU's.
//!
//! Prints the same two lines as `qemu-img bench` and then `REQ requests/s`. Exit status 0, or
//! 1 with the error on stderr (clap's own usage errors exit with 2).
//!
//! Run: `cargo run --release -p vmkit-examples --bin blk_bench -- -c 100000 -d 32 disk.raw`

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use vm_memory::{Bytes, GuestAddress};
use vmkit_block::config::BlockConfig;
use vmkit_block::defs::*;
use vmkit_block::image::{self, DiskImage, ImageError, ImageFormat};
use vmkit_block::metrics::BlockMetrics;
use vmkit_block::rate_limiter::RateLimiter;
use vmkit_block::test_utils::{BUF_START, BlockHarness};
use vmkit_block::worker::{BlockShared, EngineKind, QueueWorker, WorkerError};
use vmkit_examples::guest::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

/// Image formats (`-f`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    Raw,
    Qcow2,
}

/// Cache modes (`-t`), as QEMU names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Cache {
    /// `O_DIRECT`.
    None,
    /// The page cache.
    Writeback,
}

/// Engines (`-i`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Aio {
    Sync,
    #[value(name = "io_uring")]
    IoUring,
}

/// `qemu-img bench`'s options, for vmkit-block.
#[derive(Debug, Parser)]
#[command(
    name = "blk_bench",
    about = "qemu-img bench through vmkit-block's virtio-blk device"
)]
struct Args {
    /// Number of requests.
    #[arg(short = 'c', long = "count", default_value_t = 75000)]
    count: u64,
    /// Requests in flight at most (1 to 256).
    #[arg(short = 'd', long = "depth", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    depth: u16,
    /// Bytes per request (a multiple of 512).
    #[arg(short = 's', long = "buffer-size", default_value = "4096", value_parser = parse_size)]
    size: u64,
    /// Offset increment between requests (default: SIZE).
    #[arg(short = 'S', long = "step-size", value_parser = parse_size)]
    step: Option<u64>,
    /// Offset of the first request.
    #[arg(short = 'o', long = "offset", default_value = "0", value_parser = parse_size)]
    offset: u64,
    /// Write instead of read.
    #[arg(short = 'w', long = "write")]
    write: bool,
    /// Image format (stated, never guessed).
    #[arg(short = 'f', long = "format", value_enum, default_value_t = Format::Raw)]
    format: Format,
    /// Cache mode.
    #[arg(short = 't', long = "cache", value_enum, default_value_t = Cache::Writeback)]
    cache: Cache,
    /// Engine.
    #[arg(short = 'i', long = "aio", value_enum, default_value_t = Aio::Sync)]
    aio: Aio,
    /// The image file.
    image: PathBuf,
}

/// A size with an optional binary suffix (`k`/`K`, `M`, `G`), like QEMU's `cvtnum`.
fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|e| format!("{s}: {e}"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s}: too large"))
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
enum BenchError {
    #[error("cannot open the image")]
    Image(#[source] ImageError),
    #[error("cannot open the image with O_DIRECT")]
    Direct(#[source] std::io::Error),
    #[error("{0}")]
    Usage(&'static str),
    #[error("the device failed")]
    Worker(#[source] WorkerError),
    #[error("waiting for io_uring completions failed")]
    Wait(#[source] std::io::Error),
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("request at offset {offset} failed: status {status}")]
    Request { offset: u64, status: u8 },
}

/// Open `path` as `format` (stated, never probed) with vmkit-block's safe defaults.
fn open_image(
    path: &Path,
    format: Format,
    read_only: bool,
) -> Result<Box<dyn DiskImage>, ImageError> {
    let format = match format {
        Format::Raw => ImageFormat::Raw,
        Format::Qcow2 => ImageFormat::Qcow2,
    };
    image::open(path, &image::OpenOptions::new(format).read_only(read_only))
}

/// `-t none` for a raw image: the file opened with `O_DIRECT`, handed to
/// [`image::open_file`].
fn open_raw_direct(path: &Path, read_only: bool) -> Result<Box<dyn DiskImage>, BenchError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(BenchError::Direct)?;
    let opts = image::OpenOptions::new(ImageFormat::Raw).read_only(read_only);
    image::open_file(file, &opts).map_err(BenchError::Image)
}

/// One in-flight slot: a fixed three-descriptor chain (header, data, status).
#[derive(Debug, Clone, Copy)]
struct Slot {
    head: u16,
    header: GuestAddress,
    status: GuestAddress,
    offset: u64,
}

/// The driver side: guest memory with one queue and `depth` fixed chains.
struct Driver {
    h: BlockHarness,
    slots: Vec<Slot>,
    /// Free slots; slot `i`'s chain head is descriptor `3 * i`.
    free: Vec<usize>,
    req_type: u32,
}

impl Driver {
    fn new(depth: u16, size: u64, write: bool) -> Result<Self, BenchError> {
        let depth = usize::from(depth);
        let queue_size = (3 * depth).next_power_of_two().clamp(4, 1024) as u16;
        // Headers and status bytes first, then the data buffers, each 4 KiB-aligned.
        let small = BUF_START + 32 * depth as u64;
        let data_base = small.next_multiple_of(4096);
        let stride = size.next_multiple_of(4096);
        let mem_size = data_base + stride * depth as u64 + 4096;
        let mut h = BlockHarness::with_mem_size(queue_size, mem_size);
        let mut slots = Vec::with_capacity(depth);
        for i in 0..depth {
            let first = (3 * i) as u16;
            let header = GuestAddress(BUF_START + 16 * i as u64);
            let status = GuestAddress(BUF_START + 16 * depth as u64 + i as u64);
            let data = data_base + stride * i as u64;
            let (next, wr) = (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE);
            let data_flags = if write { next } else { next | wr };
            h.write_desc(first, header.0, VIRTIO_BLK_REQ_HDR_SIZE, next, first + 1);
            h.write_desc(first + 1, data, size as u32, data_flags, first + 2);
            h.write_desc(first + 2, status.0, 1, wr, 0);
            slots.push(Slot {
                head: first,
                header,
                status,
                offset: 0,
            });
        }
        let req_type = if write {
            VIRTIO_BLK_T_OUT
        } else {
            VIRTIO_BLK_T_IN
        };
        Ok(Self {
            h,
            slots,
            free: (0..depth).rev().collect(),
            req_type,
        })
    }

    /// Publish a request at `offset` on a free slot; false when every slot is in flight.
    fn issue(&mut self, offset: u64) -> Result<bool, BenchError> {
        let Some(i) = self.free.pop() else {
            return Ok(false);
        };
        let Some(slot) = self.slots.get_mut(i) else {
            return Ok(false);
        };
        slot.offset = offset;
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&self.req_type.to_le_bytes());
        hdr[8..16].copy_from_slice(&(offset >> SECTOR_SHIFT).to_le_bytes());
        let mem = &self.h.mem;
        mem.write_slice(&hdr, slot.header)
            .map_err(BenchError::Memory)?;
        mem.write_obj(0xffu8, slot.status)
            .map_err(BenchError::Memory)?;
        let head = slot.head;
        self.h.publish(head);
        Ok(true)
    }

    /// Take the used ring's new entries: each slot's status must be OK. Returns how many.
    fn collect(&mut self) -> Result<u64, BenchError> {
        let mut n = 0;
        for (head, _len) in self.h.used() {
            let i = usize::from(head / 3);
            let Some(slot) = self.slots.get(i) else {
                continue;
            };
            let status: u8 = self
                .h
                .mem
                .read_obj(slot.status)
                .map_err(BenchError::Memory)?;
            if status != VIRTIO_BLK_S_OK as u8 {
                return Err(BenchError::Request {
                    offset: slot.offset,
                    status,
                });
            }
            self.free.push(i);
            n += 1;
        }
        Ok(n)
    }
}

/// Block until `fd` is readable.
fn wait_readable(fd: i32) -> Result<(), BenchError> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is one valid pollfd on this stack frame; poll only writes its `revents`.
        let rc = unsafe { libc::poll(&mut p, 1, -1) };
        if rc >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(BenchError::Wait(e));
        }
    }
}

/// Run the benchmark; returns its duration in seconds.
fn run(args: &Args) -> Result<f64, BenchError> {
    if args.size == 0 || !args.size.is_multiple_of(512) || args.size > 1 << 20 {
        return Err(BenchError::Usage(
            "the buffer size must be a non-zero multiple of 512, at most 1 MiB",
        ));
    }
    let step = args.step.unwrap_or(args.size);
    let read_only = !args.write;
    let disk = match (args.cache, args.format) {
        (Cache::Writeback, f) => {
            open_image(&args.image, f, read_only).map_err(BenchError::Image)?
        }
        (Cache::None, Format::Raw) => open_raw_direct(&args.image, read_only)?,
        (Cache::None, Format::Qcow2) => {
            return Err(BenchError::Usage(
                "vmkit-block's qcow2 has no O_DIRECT mode: use -t writeback",
            ));
        }
    };
    let image_size = disk.size();
    // Before the worker: the guest memory must outlive the io_uring engine, which waits for
    // its in-flight operations when dropped.
    let mut d = Driver::new(args.depth, args.size, args.write)?;
    let engine = match args.aio {
        Aio::Sync => EngineKind::Sync,
        Aio::IoUring => EngineKind::IoUring {
            depth: u32::from(args.depth),
        },
    };
    let cfg = BlockConfig {
        engine,
        ..Default::default()
    };
    let mut worker =
        QueueWorker::new(engine, &*disk, cfg.id_bytes()).map_err(BenchError::Worker)?;
    let shared = BlockShared {
        parse_cfg: cfg.parse_config(
            image_size >> SECTOR_SHIFT,
            cfg.features(read_only),
            read_only,
        ),
        disk: Mutex::new(disk),
        metrics: BlockMetrics::default(),
        limiter: Mutex::new(RateLimiter::new(cfg.rate_limiter)),
    };
    let event_fd = worker.uring().map(|u| u.completion_fd().as_raw_fd());

    println!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {step})",
        args.count,
        if args.write { "write" } else { "read" },
        args.size,
        args.depth,
        args.offset,
    );
    let mut offset = args.offset;
    let (mut issued, mut completed) = (0u64, 0u64);
    let start = Instant::now();
    while completed < args.count {
        // Refill every free slot, then notify the device once, as a driver with
        // notifications enabled would (the device takes all published chains in one pass).
        let mut added = false;
        while issued < args.count && d.issue(offset)? {
            issued += 1;
            added = true;
            // As qemu-img.c's bench_cb: the next request starts STEP further, modulo the size.
            offset = offset.checked_add(step).unwrap_or(0);
            offset = offset.checked_rem(image_size).unwrap_or(0);
        }
        if added {
            worker
                .process(&mut d.h.queue, &d.h.mem, &shared)
                .map_err(BenchError::Worker)?;
        }
        let mut got = d.collect()?;
        while got == 0 && worker.in_flight() > 0 {
            // Nothing finished inside the pass: wait for the completion eventfd, as the VMM's
            // event loop does, then complete what is ready.
            if let Some(fd) = event_fd {
                wait_readable(fd)?;
            }
            worker
                .complete(&mut d.h.queue, &d.h.mem, &shared)
                .map_err(BenchError::Worker)?;
            got = d.collect()?;
        }
        if got == 0 && !added {
            return Err(BenchError::Usage("the device completed nothing"));
        }
        completed += got;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(secs) => {
            println!("Run completed in {secs:.3} seconds.");
            println!("{:.0} requests/s", args.count as f64 / secs);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprint!("blk_bench: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                eprint!(": {s}");
                src = s.source();
            }
            eprintln!();
            ExitCode::FAILURE
        }
    }
}
