//! A tiny KVM guest drives virtio-blk over virtio-mmio: it negotiates VERSION_1, sets up a
//! queue, writes a sector (OUT), reads it back (IN), polls the used ring instead of taking
//! interrupts, and prints a checksum of what it read and both status bytes over the serial port
//! (a 16550 UART at 0x3f8, vm-superio's model): `blk sum=XXXXXXXX out=XX in=XX`. The host
//! checks that line and the image file itself.

use std::cell::RefCell;
use std::sync::Arc;

use iced_x86::code_asm::*;
use vmkit_block::image::{self, DiskImage, ImageFormat, OpenOptions, RawImage};
use vmkit_block::metrics::BlockMetricsSnapshot;
use vmkit_block::test_utils::TempImages;
use vmkit_block::{Block, BlockConfig};
use vmkit_devices::interrupt::NoInterrupt;
use vmkit_devices::serial::{SERIAL_PORT_LEN, Serial};
use vmkit_devices::{BusDevice, MutBusDevice};
use vmkit_vcpu::test_utils::{DATA_ADDR, TinyGuest};
use vmkit_vcpu::{Exit, ExitStats, IoHandler, RunOutcome, StopHandle, run_until_exit};
use vmkit_virtio::mmio::MmioTransport;

/// Where the virtio-mmio window sits (in the 32-bit hole, above the tiny guest's RAM).
const MMIO_BASE: u64 = 0xd000_0000;
const MMIO_SIZE: u64 = 0x1000;

// Guest-physical layout of the driver's structures (in the harness's scratch data area).
const QUEUE: u64 = DATA_ADDR; // descriptor table (8 x 16 bytes)
const AVAIL: u64 = QUEUE + 0x100;
const USED: u64 = QUEUE + 0x200;
const HDR_OUT: u64 = QUEUE + 0x1000;
const HDR_IN: u64 = QUEUE + 0x1010;
const STATUS_OUT: u64 = QUEUE + 0x1100;
const STATUS_IN: u64 = QUEUE + 0x1101;
const DATA_OUT: u64 = QUEUE + 0x2000;
const DATA_IN: u64 = QUEUE + 0x3000;
const SECTOR: u64 = 5;

/// The legacy COM1 port base.
const COM1: u16 = 0x3f8;

struct Io {
    transport: RefCell<MmioTransport<Block>>,
    serial: Serial<Vec<u8>>,
}

impl IoHandler for Io {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port
            .checked_sub(COM1)
            .filter(|o| u64::from(*o) < SERIAL_PORT_LEN)
        {
            Some(off) => self.serial.read(u64::from(off), data),
            None => data.fill(0xff),
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        if let Some(off) = port
            .checked_sub(COM1)
            .filter(|o| u64::from(*o) < SERIAL_PORT_LEN)
        {
            self.serial.write(u64::from(off), data)
        }
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match addr.checked_sub(MMIO_BASE).filter(|o| *o < MMIO_SIZE) {
            Some(off) => self.transport.borrow_mut().read(off, data),
            None => data.fill(0xff),
        }
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some(off) = addr.checked_sub(MMIO_BASE).filter(|o| *o < MMIO_SIZE) {
            self.transport.borrow_mut().write(off, data)
        }
    }
}

/// Guest code writing descriptor `i` (vmkit-virtio's shared tiny-guest driver code).
fn desc(
    a: &mut CodeAssembler,
    i: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) -> Result<(), IcedError> {
    vmkit_virtio::guest_driver::write_descriptor(a, QUEUE, i, addr, len, flags, next)
}

/// Guest code: print the bytes of `text` on COM1.
fn print(a: &mut CodeAssembler, text: &str) -> Result<(), IcedError> {
    a.mov(dx, COM1 as u32)?;
    for b in text.bytes() {
        a.mov(al, u32::from(b))?;
        a.out(dx, al)?;
    }
    Ok(())
}

/// Guest code: print the low `digits` nibbles of `r8` in hex on COM1 (clobbers rax, rcx, rdx).
fn print_hex(a: &mut CodeAssembler, digits: u32) -> Result<(), IcedError> {
    let mut next = a.create_label();
    let mut letter = a.create_label();
    let mut emit = a.create_label();
    a.mov(dx, COM1 as u32)?;
    a.mov(ecx, digits * 4)?;
    a.set_label(&mut next)?;
    a.sub(ecx, 4)?;
    a.mov(rax, r8)?;
    a.shr(rax, cl)?;
    a.and(eax, 0xf)?;
    a.cmp(eax, 10)?;
    a.jae(letter)?;
    a.add(eax, u32::from(b'0'))?;
    a.jmp(emit)?;
    a.set_label(&mut letter)?;
    a.add(eax, u32::from(b'a') - 10)?;
    a.set_label(&mut emit)?;
    a.out(dx, al)?;
    a.test(ecx, ecx)?;
    a.jnz(next)
}

/// Guest code: publish `head` at avail slot `slot`, notify queue 0, poll used.idx == slot+1.
fn submit(a: &mut CodeAssembler, slot: u64, head: u16) -> Result<(), IcedError> {
    let queue = vmkit_virtio::guest_driver::GuestQueue::at(0, 8, QUEUE, AVAIL, USED);
    vmkit_virtio::guest_driver::publish(a, queue, slot as u16, head)?;
    a.mov(dword_ptr(rbx + 0x50), 0u32)?; // QueueNotify
    let mut poll = a.create_label();
    a.set_label(&mut poll)?;
    a.mov(rdi, USED)?;
    a.movzx(eax, word_ptr(rdi + 2))?;
    a.cmp(eax, (slot + 1) as u32)?;
    a.jb(poll)
}

/// Device initialisation (virtio 1.2 §3.1.1) over virtio-mmio registers (§4.2.2): VERSION_1,
/// queue 0 of 8 entries at QUEUE/AVAIL/USED. Leaves the register window's base in rbx.
fn bring_up(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rbx, MMIO_BASE)?;
    a.mov(dword_ptr(rbx + 0x70), 0u32)?; // reset
    a.mov(dword_ptr(rbx + 0x70), 1u32)?; // ACKNOWLEDGE
    a.mov(dword_ptr(rbx + 0x70), 3u32)?; // DRIVER
    a.mov(dword_ptr(rbx + 0x24), 1u32)?; // DriverFeaturesSel = 1
    a.mov(dword_ptr(rbx + 0x20), 1u32)?; // VIRTIO_F_VERSION_1 (bit 32)
    a.mov(dword_ptr(rbx + 0x24), 0u32)?;
    a.mov(dword_ptr(rbx + 0x20), 0u32)?;
    a.mov(dword_ptr(rbx + 0x70), 11u32)?; // FEATURES_OK
    a.mov(dword_ptr(rbx + 0x30), 0u32)?; // QueueSel
    a.mov(dword_ptr(rbx + 0x38), 8u32)?; // QueueNum
    a.mov(dword_ptr(rbx + 0x80), QUEUE as u32)?; // QueueDescLow
    a.mov(dword_ptr(rbx + 0x90), AVAIL as u32)?; // QueueDriverLow
    a.mov(dword_ptr(rbx + 0xa0), USED as u32)?; // QueueDeviceLow
    a.mov(dword_ptr(rbx + 0x44), 1u32)?; // QueueReady
    a.mov(dword_ptr(rbx + 0x70), 15u32)?; // DRIVER_OK
    Ok(())
}

/// Run `g` against virtio-blk on `disk` until it halts; returns its console output and the
/// device's counters.
fn run_on(g: &mut TinyGuest, disk: Box<dyn DiskImage>) -> (String, BlockMetricsSnapshot) {
    let block = Block::new(disk, BlockConfig::default()).unwrap();
    let io = Io {
        transport: RefCell::new(MmioTransport::new(
            block,
            g.mem.clone(),
            Arc::new(NoInterrupt),
        )),
        serial: Serial::new(Arc::new(NoInterrupt), Vec::new()),
    };
    let mut stats = ExitStats::default();
    let out = run_until_exit(&mut g.vcpu, &io, &StopHandle::new(), &mut stats).unwrap();
    assert_eq!(out, RunOutcome::Exit(Exit::Hlt));
    let console = io
        .serial
        .with_writer(|w| String::from_utf8_lossy(w).into_owned());
    (console, io.transport.borrow().device().metrics())
}

/// Sum of a sector's 128 little-endian dwords, as the guests print it.
fn checksum(sector: &[u8]) -> u32 {
    sector
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .fold(0u32, u32::wrapping_add)
}

/// Sum the 128 dwords at `addr` into r8d and print `label` and the sum.
fn print_sum(a: &mut CodeAssembler, label: &str, addr: u64) -> Result<(), IcedError> {
    a.mov(rsi, addr)?;
    a.mov(ecx, 128u32)?;
    a.xor(r8d, r8d)?;
    let mut sum = a.create_label();
    a.set_label(&mut sum)?;
    a.add(r8d, dword_ptr(rsi))?;
    a.add(rsi, 4i32)?;
    a.dec(ecx)?;
    a.jnz(sum)?;
    print(a, label)?;
    print_hex(a, 8)
}

/// The CVE-2008-2004 scenario on real KVM: a guest writes, into sector 0 of its *raw* disk,
/// a qcow2 header whose backing file is a host sentinel. The VMM starts again on the same
/// file, stating the format (raw) as every vmkit open does: the guest reads back its own
/// bytes, never the sentinel's (a VMM that probed the format would have served the sentinel).
#[test]
fn kvm_guest_written_qcow2_header_on_a_raw_disk_stays_guest_data() {
    let dir = TempImages::new(false).unwrap();
    let sentinel = dir.path("secret");
    std::fs::write(&sentinel, [0x5e_u8; 1 << 20]).unwrap();
    // The header the guest writes: qcow2 version 2, 64 KiB clusters, backing file name at
    // byte 72 (qcow2 specification, "Header").
    let name = sentinel.to_str().unwrap().as_bytes();
    let mut header = vec![0u8; 512];
    header[0..4].copy_from_slice(b"QFI\xfb");
    header[4..8].copy_from_slice(&2u32.to_be_bytes());
    header[8..16].copy_from_slice(&72u64.to_be_bytes());
    header[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    header[20..24].copy_from_slice(&16u32.to_be_bytes());
    header[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
    header[72..72 + name.len()].copy_from_slice(name);

    // First boot: the guest stores the header, 8 bytes at a time, and writes sector 0.
    let words: Vec<u64> = header
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let mut writer = TinyGuest::new(|a| {
        bring_up(a)?;
        a.mov(rdi, DATA_OUT)?;
        for (i, w) in words.iter().enumerate() {
            a.mov(rax, *w)?;
            a.mov(qword_ptr(rdi + 8 * i as i32), rax)?;
        }
        a.mov(rsi, HDR_OUT)?;
        a.mov(dword_ptr(rsi), 1u32)?; // VIRTIO_BLK_T_OUT
        a.mov(dword_ptr(rsi + 4), 0u32)?;
        a.mov(qword_ptr(rsi + 8), 0i32)?; // sector 0
        a.mov(byte_ptr(STATUS_OUT), 0xffu32)?;
        desc(a, 0, HDR_OUT, 16, 1, 1)?;
        desc(a, 1, DATA_OUT, 512, 1, 2)?;
        desc(a, 2, STATUS_OUT, 1, 2, 0)?;
        submit(a, 0, 0)?;
        print(a, "out=")?;
        a.movzx(r8d, byte_ptr(STATUS_OUT))?;
        print_hex(a, 2)?;
        print(a, "\n")?;
        a.hlt()
    })
    .unwrap();
    let path = dir.path("guest.raw");
    RawImage::create(&path, 1 << 20).unwrap();
    let raw = OpenOptions::new(ImageFormat::Raw);
    let (console, m) = run_on(&mut writer, image::open(&path, &raw).unwrap());
    assert_eq!((console.as_str(), m.writes), ("out=00\n", 1));
    assert_eq!(image::probe_format(&path).unwrap(), ImageFormat::Qcow2);

    // Second boot on the same file: the guest reads sector 0 and prints its checksum.
    let mut reader = TinyGuest::new(|a| {
        bring_up(a)?;
        a.mov(rsi, HDR_IN)?;
        a.mov(dword_ptr(rsi), 0u32)?; // VIRTIO_BLK_T_IN
        a.mov(dword_ptr(rsi + 4), 0u32)?;
        a.mov(qword_ptr(rsi + 8), 0i32)?;
        a.mov(byte_ptr(STATUS_IN), 0xffu32)?;
        desc(a, 0, HDR_IN, 16, 1, 1)?;
        desc(a, 1, DATA_IN, 512, 3, 2)?;
        desc(a, 2, STATUS_IN, 1, 2, 0)?;
        submit(a, 0, 0)?;
        print_sum(a, "sum=", DATA_IN)?;
        print(a, " in=")?;
        a.movzx(r8d, byte_ptr(STATUS_IN))?;
        print_hex(a, 2)?;
        print(a, "\n")?;
        a.hlt()
    })
    .unwrap();
    let (console, _) = run_on(&mut reader, image::open(&path, &raw).unwrap());
    assert_eq!(console, format!("sum={:08x} in=00\n", checksum(&header)));
    assert_ne!(checksum(&header), checksum(&[0x5e; 512]));
    assert_eq!(std::fs::read(&sentinel).unwrap(), vec![0x5e_u8; 1 << 20]);
}

#[test]
fn kvm_blk_guest_writes_and_reads_back_a_sector() {
    let mut g = TinyGuest::new(|a| {
        bring_up(a)?;

        // The sector: 128 dwords 0x03020100, 0x07060504, ... (adding 0x04040404 each).
        a.mov(rdi, DATA_OUT)?;
        a.mov(ecx, 128u32)?;
        a.mov(eax, 0x0302_0100u32)?;
        let mut fill = a.create_label();
        a.set_label(&mut fill)?;
        a.mov(dword_ptr(rdi), eax)?;
        a.add(eax, 0x0404_0404u32)?;
        a.add(rdi, 4i32)?;
        a.dec(ecx)?;
        a.jnz(fill)?;

        // Request headers: OUT and IN of sector SECTOR.
        a.mov(rsi, HDR_OUT)?;
        a.mov(dword_ptr(rsi), 1u32)?; // VIRTIO_BLK_T_OUT
        a.mov(dword_ptr(rsi + 4), 0u32)?;
        a.mov(qword_ptr(rsi + 8), SECTOR as i32)?;
        a.mov(dword_ptr(rsi + 16), 0u32)?; // VIRTIO_BLK_T_IN
        a.mov(dword_ptr(rsi + 20), 0u32)?;
        a.mov(qword_ptr(rsi + 24), SECTOR as i32)?;
        a.mov(byte_ptr(STATUS_OUT), 0xffu32)?;
        a.mov(byte_ptr(STATUS_IN), 0xffu32)?;

        // Chain 0: header, data (device reads), status (device writes).
        desc(a, 0, HDR_OUT, 16, 1, 1)?;
        desc(a, 1, DATA_OUT, 512, 1, 2)?;
        desc(a, 2, STATUS_OUT, 1, 2, 0)?;
        // Chain 3: header, data (device writes), status.
        desc(a, 3, HDR_IN, 16, 1, 4)?;
        desc(a, 4, DATA_IN, 512, 3, 5)?;
        desc(a, 5, STATUS_IN, 1, 2, 0)?;
        submit(a, 0, 0)?;
        submit(a, 1, 3)?;

        // Checksum: sum of the 128 dwords read back.
        print_sum(a, "blk sum=", DATA_IN)?;
        print(a, " out=")?;
        a.movzx(r8d, byte_ptr(STATUS_OUT))?;
        print_hex(a, 2)?;
        print(a, " in=")?;
        a.movzx(r8d, byte_ptr(STATUS_IN))?;
        print_hex(a, 2)?;
        print(a, "\n")?;
        a.hlt()
    })
    .unwrap();

    let dir = TempImages::new(false).unwrap();
    let path = dir.path("kvm.raw");
    RawImage::create(&path, 1 << 20).unwrap();
    let disk = RawImage::open(&path, false).unwrap();
    let (console, m) = run_on(&mut g, Box::new(disk));

    // What the guest's fill loop wrote: dword k = 0x03020100 + k * 0x04040404 (wrapping).
    let sector: Vec<u8> = (0..128u32)
        .flat_map(|k| {
            0x0302_0100u32
                .wrapping_add(k.wrapping_mul(0x0404_0404))
                .to_le_bytes()
        })
        .collect();
    let checksum = checksum(&sector);
    assert_eq!(console, format!("blk sum={checksum:08x} out=00 in=00\n"));
    assert_eq!((m.writes, m.reads), (1, 1));
    let file = std::fs::read(&path).unwrap();
    assert_eq!(
        &file[SECTOR as usize * 512..SECTOR as usize * 512 + 512],
        &sector[..]
    );
}
