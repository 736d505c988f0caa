//! `virtio_blk`: a guest driving a virtio block device over PCI.
//!
//! ```text
//! virtio_blk [IMAGE] [--format raw|qcow2] [--read-only] [--io-uring]
//! ```
//!
//! The VMM opens IMAGE in the format `--format` states (default `raw`: an image's bytes never
//! choose its format, or a guest could turn its raw disk into a qcow2 image naming a host
//! file) with `vmkit_block::image::open` and its safe defaults: a qcow2 image's backing chain
//! is followed only under the image's directory, with formats as its headers record them; an
//! encrypted, dirty or corrupt image, or one needing an external data file, is refused (an
//! image is untrusted input); without IMAGE it creates a 1 MiB raw image in a temporary
//! directory and removes it afterwards. It serves the image through vmkit-block's `Block` device
//! behind vmkit-virtio's `VirtioPciTransport`, on a PCI root bus behind ports 0xCF8/0xCFC of a
//! VM with the split irqchip (in-kernel LAPIC). `--read-only` opens the image read-only and
//! offers `VIRTIO_BLK_F_RO`. The device uses the synchronous engine, or with `--io-uring` the
//! io_uring engine (raw images; qcow2 stays synchronous): then each queue's completion
//! eventfd (`Block::completion_eventfds`) also wakes the doorbell's `NotifyWorker`
//! (`NotifyWorker::spawn_with_wakeups`), whose pass over the queue puts finished requests on
//! the used ring. The disk line then ends in `, io_uring`.
//!
//! The guest, a small 64-bit program assembled below (the machine and the driver steps shared
//! with `virtio_rng` live in the crate's `machine` and `guest` modules):
//!
//! 1. scans bus 0 for vendor 0x1af4 / device 0x1042 (modern virtio-blk);
//! 2. places BAR 0, enables memory decoding and MSI-X, programs MSI-X entry 1 to IDT vector
//!    0x41;
//! 3. negotiates `VIRTIO_F_VERSION_1` and `VIRTIO_BLK_F_FLUSH`, sets up queue 0 on entry 1,
//!    and prints `capacity` from the device configuration (virtio 1.2 §5.2.4);
//! 4. issues four requests one after the other (§5.2.6), each a chain published on the
//!    available ring, kicked through the doorbell (an ioeventfd: no exit) and completed by a
//!    used-ring interrupt (an irqfd: no exit) that its handler counts: OUT of sector 1 (byte
//!    `i` of the sector is `i mod 256`), FLUSH, IN of sector 1, GET_ID — printing each status
//!    byte, the checksum of the data read (the sum of its 128 little-endian dwords) and the
//!    serial the device reports;
//! 5. leaves through the debug-exit port.
//!
//! **Exit status** (the VMM exits with it): the sum of
//! `1` OUT status not OK, `2` FLUSH not OK, `4` IN not OK, `8` GET_ID not OK, `16` data read
//! back differs from the data written; so 0 when everything worked. `--read-only` on an image
//! that does not already hold the pattern exits with **17**: the OUT comes back
//! `VIRTIO_BLK_S_IOERR` (printed `status 01 (IOERR)`) and the read returns the old data.
//! `0x40`: no virtio-blk function found; `0x41`..`0x44`: no interrupt for request 1..4;
//! `0x80` usage error, `255` VMM error (both before the guest runs; the message is on stderr).
//! The four groups never overlap, so every status names one outcome.
//!
//! The VMM prints the guest's console output, the device's counters (JSON), the transport's
//! and MSI-X counters and a table of exits.
//!
//! Run: `cargo run --release -p vmkit-examples --bin virtio_blk -- [IMAGE] [--format raw|qcow2] [--read-only] [--io-uring]`

use std::path::PathBuf;
use std::process::ExitCode;

use iced_x86::code_asm::*;
use vmkit_block::config::offsets::CAPACITY;
use vmkit_block::defs::*;
use vmkit_block::image::{self, DiskImage, ImageFormat, OpenOptions, RawImage};
use vmkit_block::{Block, BlockConfig, EngineKind};
use vmkit_examples::guest::{
    BUF, DATA, DEBUG_EXIT, GuestAsm, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use vmkit_examples::machine::{Error, PciMachine, exit_code, print_report};
use vmkit_virtio::pci::DEVICE_CFG_OFFSET;

/// Policy of this VMM.
const NEW_IMAGE_SIZE: u64 = 1 << 20;
const SERIAL: &str = "vmkit-example";
/// MSI-X table entry the guest assigns to queue 0.
const QUEUE_VECTOR: u16 = 1;

/// The guest's buffers: request headers, status bytes, data and the GET_ID answer.
const HEADERS: u64 = BUF;
const STATUS: u64 = BUF + 0x100;
const DATA_OUT: u64 = BUF + 0x1000;
const DATA_IN: u64 = BUF + 0x2000;
const ID: u64 = BUF + 0x3000;
/// The sector the guest writes and reads back.
const SECTOR: u64 = 1;
const SECTOR_DWORDS: u32 = SECTOR_SIZE as u32 / 4;

/// Exit status bits (see the module documentation).
const DATA_DIFFERS: u32 = 16;
const NOT_FOUND: u8 = 0x40;
const NO_INTERRUPT: u8 = 0x41;

/// One request of the guest: its name, `type` and data buffer (address, length, whether the
/// device writes it).
struct Request {
    name: &'static str,
    ty: u32,
    data: Option<(u64, u32, bool)>,
}

/// The guest's requests, in order.
const REQUESTS: [Request; 4] = [
    Request {
        name: "OUT",
        ty: VIRTIO_BLK_T_OUT,
        data: Some((DATA_OUT, SECTOR_SIZE as u32, false)),
    },
    Request {
        name: "FLUSH",
        ty: VIRTIO_BLK_T_FLUSH,
        data: None,
    },
    Request {
        name: "IN",
        ty: VIRTIO_BLK_T_IN,
        data: Some((DATA_IN, SECTOR_SIZE as u32, true)),
    },
    Request {
        name: "GET_ID",
        ty: VIRTIO_BLK_T_GET_ID,
        data: Some((ID, VIRTIO_BLK_ID_BYTES as u32, true)),
    },
];

/// Guest code for request `i` of [`REQUESTS`]: header, descriptor chain at head `3 * i`,
/// submit, wait for its interrupt, print `guest: NAME status XX (OK|IOERR|UNSUPP|?)`; a status other than
/// OK sets bit `i` of r12d. `status_name` is the subroutine printing the name of r8b.
fn request(g: &mut GuestAsm, i: usize, status_name: CodeLabel) -> Result<(), IcedError> {
    let Request { name, ty, data } = REQUESTS[i];
    let (hdr, status, head) = (HEADERS + 16 * i as u64, STATUS + i as u64, 3 * i as u16);
    g.mov(rdi, hdr)?;
    g.mov(dword_ptr(rdi), ty)?;
    g.mov(dword_ptr(rdi + 4), 0u32)?; // reserved
    g.mov(qword_ptr(rdi + 8), SECTOR as i32)?;
    g.mov(rdi, status)?;
    g.mov(byte_ptr(rdi), 0xffu32)?; // not yet written by the device
    let hdr_len = VIRTIO_BLK_REQ_HDR_SIZE;
    g.desc(head as u64, hdr, hdr_len, VIRTQ_DESC_F_NEXT, head + 1)?;
    let mut next = head + 1;
    if let Some((addr, len, device_writes)) = data {
        let flags = VIRTQ_DESC_F_NEXT | if device_writes { VIRTQ_DESC_F_WRITE } else { 0 };
        g.desc(next as u64, addr, len, flags, next + 1)?;
        next += 1;
    }
    g.desc(next as u64, status, 1, VIRTQ_DESC_F_WRITE, 0)?;
    g.submit(i as u64, head)?;
    g.wait_interrupts(i as u32 + 1, NO_INTERRUPT + i as u8)?;
    g.puts(&format!("guest: {name} status "))?;
    g.mov(rdi, status)?;
    g.movzx(r8d, byte_ptr(rdi))?;
    g.print_hex(2)?;
    g.call(status_name)?;
    let mut ok = g.create_label();
    g.cmp(r8b, VIRTIO_BLK_S_OK)?;
    g.je(ok)?;
    g.or(r12d, 1 << i)?;
    g.set_label(&mut ok)?;
    g.nop()
}

/// Guest code: print the checksum of what IN read (the sum of its dwords) and set
/// [`DATA_DIFFERS`] in r12d if it differs from what OUT wrote.
fn checksum(g: &mut GuestAsm) -> Result<(), IcedError> {
    let (mut sum, mut same) = (g.create_label(), g.create_label());
    g.mov(rbx, DATA_IN)?;
    g.mov(rdi, DATA_OUT)?;
    g.xor(r8d, r8d)?;
    g.xor(r13d, r13d)?;
    g.set_label(&mut sum)?;
    g.mov(eax, dword_ptr(rbx + r13 * 4))?;
    g.add(r8d, eax)?;
    g.cmp(eax, dword_ptr(rdi + r13 * 4))?;
    g.je(same)?;
    g.or(r12d, DATA_DIFFERS)?;
    g.set_label(&mut same)?;
    g.inc(r13d)?;
    g.cmp(r13d, SECTOR_DWORDS)?;
    g.jb(sum)?;
    g.puts("guest: read checksum ")?;
    g.print_hex(8)?;
    let (mut differs, mut done) = (g.create_label(), g.create_label());
    g.test(r12d, DATA_DIFFERS)?;
    g.jnz(differs)?;
    g.puts(", same as written\n")?;
    g.jmp(done)?;
    g.set_label(&mut differs)?;
    g.puts(", differs from what was written\n")?;
    g.set_label(&mut done)?;
    g.nop()
}

/// Guest code: print the GET_ID answer (up to 20 bytes, NUL-padded).
fn print_serial(g: &mut GuestAsm) -> Result<(), IcedError> {
    let (mut chr, mut end) = (g.create_label(), g.create_label());
    g.puts("guest: serial \"")?;
    g.mov(rbx, ID)?;
    g.xor(r13d, r13d)?;
    g.set_label(&mut chr)?;
    g.mov(al, byte_ptr(rbx + r13))?;
    g.test(al, al)?;
    g.jz(end)?;
    g.out(dx, al)?;
    g.inc(r13d)?;
    g.cmp(r13d, VIRTIO_BLK_ID_BYTES as u32)?;
    g.jb(chr)?;
    g.set_label(&mut end)?;
    g.puts("\"\n")
}

fn guest_program(msix_cap: u32) -> Result<Vec<u8>, IcedError> {
    let mut g = GuestAsm::new()?;
    let mut status_name = g.create_label();
    // 1.-3. Find 1af4:1042, BAR 0 + MSI-X, virtio bring-up with queue 0, capacity.
    g.find_function(0x1042, "virtio-blk", NOT_FOUND)?;
    g.enable_msix(msix_cap, QUEUE_VECTOR as u32)?;
    g.virtio_bring_up(
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH,
        QUEUE_VECTOR,
    )?;
    let capacity = (DEVICE_CFG_OFFSET as usize + CAPACITY) as i32;
    g.mov(eax, dword_ptr(rsi + capacity))?; // le64 read as two dwords, low first
    g.mov(r8d, dword_ptr(rsi + capacity + 4))?;
    g.shl(r8, 32)?;
    g.or(r8, rax)?;
    g.puts("guest: capacity ")?;
    g.print_hex(16)?;
    g.puts(" sectors\n")?;

    // The sector to write: byte i = i mod 256.
    let mut fill = g.create_label();
    g.mov(rdi, DATA_OUT)?;
    g.xor(ecx, ecx)?;
    g.set_label(&mut fill)?;
    g.mov(byte_ptr(rdi + rcx), cl)?;
    g.inc(ecx)?;
    g.cmp(ecx, SECTOR_SIZE as u32)?;
    g.jb(fill)?;

    // 4. OUT, FLUSH, IN, GET_ID, one at a time; r12d collects the exit status bits.
    g.xor(r12d, r12d)?;
    g.sti()?;
    for (i, r) in REQUESTS.iter().enumerate() {
        request(&mut g, i, status_name)?;
        match r.name {
            "IN" => checksum(&mut g)?,
            "GET_ID" => print_serial(&mut g)?,
            _ => {}
        }
    }

    // 5. Interrupts taken and the result, which is also the exit status.
    g.puts("guest: interrupts ")?;
    g.mov(rdi, DATA)?;
    g.mov(r8d, dword_ptr(rdi))?;
    g.print_hex(2)?;
    g.puts(", result ")?;
    g.mov(r8d, r12d)?;
    g.print_hex(2)?;
    g.puts("\n")?;
    g.mov(eax, r12d)?;
    g.out(DEBUG_EXIT as i32, al)?;
    g.hlt()?;

    // status_name: print " (OK)\n", " (IOERR)\n", " (UNSUPP)\n" or " (?)\n" for r8b.
    g.set_label(&mut status_name)?;
    for (value, text) in [
        (VIRTIO_BLK_S_OK, "OK"),
        (VIRTIO_BLK_S_IOERR, "IOERR"),
        (VIRTIO_BLK_S_UNSUPP, "UNSUPP"),
    ] {
        let mut other = g.create_label();
        g.cmp(r8b, value)?;
        g.jne(other)?;
        g.puts(&format!(" ({text})\n"))?;
        g.ret()?;
        g.set_label(&mut other)?;
    }
    g.puts(" (?)\n")?;
    g.ret()?;
    g.assemble()
}

/// What the command line asks for.
struct Args {
    image: Option<PathBuf>,
    format: ImageFormat,
    read_only: bool,
    io_uring: bool,
}

const USAGE: &str = "usage: virtio_blk [IMAGE] [--format raw|qcow2] [--read-only] [--io-uring]";

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut out = Args {
        image: None,
        format: ImageFormat::Raw,
        read_only: false,
        io_uring: false,
    };
    let mut args = args;
    while let Some(arg) = args.next() {
        let format = match arg.as_str() {
            "--format" => args.next(),
            s => s.strip_prefix("--format=").map(str::to_string),
        };
        if arg == "--format" || arg.starts_with("--format=") {
            out.format = match format.as_deref() {
                Some("raw") => ImageFormat::Raw,
                Some("qcow2") => ImageFormat::Qcow2,
                Some(f) => return Err(format!("unknown format {f} (raw or qcow2)")),
                None => return Err("--format needs raw or qcow2".into()),
            };
            continue;
        }
        match arg.as_str() {
            "--read-only" => out.read_only = true,
            "--io-uring" => out.io_uring = true,
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            _ if out.image.is_some() => return Err("more than one IMAGE".into()),
            _ => out.image = Some(PathBuf::from(arg)),
        }
    }
    Ok(out)
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("virtio_blk: {e}\n{USAGE}");
            return ExitCode::from(0x80);
        }
    };
    exit_code("virtio_blk", run(args))
}

fn run(args: Args) -> Result<u32, Error> {
    // The disk: IMAGE, or a fresh raw image that lives as long as `_dir`.
    let (_dir, path, what) = match args.image {
        Some(p) => (None, p.clone(), p.display().to_string()),
        None => {
            let dir = tempfile::tempdir()?;
            let p = dir.path().join("disk.raw");
            RawImage::create(&p, NEW_IMAGE_SIZE)?;
            (Some(dir), p, "(new, in a temporary directory)".into())
        }
    };
    let opts = OpenOptions::new(args.format).read_only(args.read_only);
    let disk = image::open(&path, &opts)?;
    let (format, size, read_only) = (disk.format(), disk.size(), disk.read_only());
    let config = BlockConfig {
        read_only: args.read_only,
        serial: SERIAL.into(),
        engine: if args.io_uring {
            EngineKind::IoUring { depth: 16 }
        } else {
            EngineKind::Sync
        },
        ..BlockConfig::default()
    };
    let block = Block::new(disk, config)?;
    // With io_uring, each queue's completion eventfd wakes the doorbell's notify worker,
    // whose pass over the queue puts finished requests on the used ring.
    let wakeups = block.completion_eventfds()?;
    println!(
        "vmm: disk {what}: {}, {size} bytes, {}{}",
        match format {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        },
        if read_only { "read-only" } else { "read-write" },
        if wakeups.is_empty() { "" } else { ", io_uring" },
    );

    let mut machine = PciMachine::new()?;
    let blk = machine.add_virtio_waking("virtio-blk", block, wakeups)?;
    let program = guest_program(blk.msix_cap() as u32)?;
    let (status, exits) = machine.run(&program)?;
    let transport = blk.stop();
    let t = transport.lock().map_err(|_| "poisoned")?;
    // Shutting down: whatever the guest did not flush reaches the file now.
    t.device().disk().flush()?;
    let metrics = serde_json::to_string(&t.device().metrics())?;
    print_report(status, &t, &metrics, &exits);
    Ok(status)
}
