//! Runs the `virtio_blk` example VMM as a user would, on the real /dev/kvm: with its own fresh
//! image, a raw image and a qcow2 image the test prepares, and read-only. The image files are
//! checked afterwards (qcow2 also with `qemu-img check` and `qemu-img convert`, from Debian's
//! `qemu-utils`).

use std::path::Path;
use std::process::Command;

use vmkit_block::image::{DiskImage, Qcow2Image};

mod common;

/// The sector the guest writes and reads back, and what it writes there: byte i = i mod 256.
const SECTOR: usize = 1;
fn pattern() -> Vec<u8> {
    (0..512).map(|i| i as u8).collect()
}

/// The guest's checksum: the wrapping sum of the sector's little-endian dwords.
fn checksum(sector: &[u8]) -> u32 {
    sector
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .fold(0, u32::wrapping_add)
}

/// Run the binary; its exit code and stdout.
fn run(args: &[&str]) -> (Option<i32>, String) {
    common::run_example(env!("CARGO_BIN_EXE_virtio_blk"), args)
}

/// What the guest prints when every request succeeds, for a disk of `sectors` sectors.
fn guest_ok(sectors: u64) -> String {
    format!(
        "guest: virtio-blk at 00:04.0\n\
         guest: capacity {sectors:016x} sectors\n\
         guest: OUT status 00 (OK)\n\
         guest: FLUSH status 00 (OK)\n\
         guest: IN status 00 (OK)\n\
         guest: read checksum {:08x}, same as written\n\
         guest: GET_ID status 00 (OK)\n\
         guest: serial \"vmkit-example\"\n\
         guest: interrupts 04, result 00\n\
         --- guest stopped with status 0\n",
        checksum(&pattern())
    )
}

/// The device's counters line for one successful OUT, FLUSH, IN and GET_ID.
const METRICS_OK: &str = "device:    {\"reads\":1,\"writes\":1,\"read_bytes\":512,\
     \"write_bytes\":512,\"flushes\":1,\"get_ids\":1,\"discards\":0,\"write_zeroes\":0,\
     \"invalid_chains\":0,\"invalid_requests\":0,\"unsupported_requests\":0,\"io_errors\":0,\
     \"throttled_events\":0,\"memory_errors\":0}\n";

/// A raw image of `len` bytes of 0xaa.
fn raw_image(path: &Path, len: usize) -> Vec<u8> {
    let bytes = vec![0xaa; len];
    std::fs::write(path, &bytes).unwrap();
    bytes
}

fn sector_of(bytes: &[u8]) -> &[u8] {
    &bytes[SECTOR * 512..SECTOR * 512 + 512]
}

#[test]
fn kvm_virtio_blk_fresh_image() {
    let (code, stdout) = run(&[]);
    assert_eq!(code, Some(0), "{stdout}");
    // Exits: one PIO write per guest console byte (287), 5 PCI address writes scanning
    // devices 0..4, 8 for the 4 configuration writes (address + data), the debug exit;
    // 5 PCI data reads; capacity as 2 MMIO reads; MMIO writes: the MSI-X entry (4) and the
    // common configuration (4 status, 4 feature, 10 queue). Doorbells (ioeventfd), MSI-X
    // delivery (irqfd) and the LAPIC (in-kernel) take no exits.
    let expected = format!(
        "vmm: disk (new, in a temporary directory): raw, 1048576 bytes, read-write\n\
         {}\
         transport: TransportMetrics {{ illegal_status_writes: 0, features_refused: 0, \
         late_feature_writes: 0, bad_queue_writes: 0, queue_size_refused: 0, \
         queue_address_refused: 0, bad_notifies: 0, notifies: 4, trapped_notifies: 0, \
         bad_register_accesses: 0, activation_failures: 0, device_errors: 0, resets: 0 }}\n\
         {METRICS_OK}\
         msi-x:     MsixStats {{ delivered: 4, pended: 0, dropped: 0, bad_accesses: 0, \
         delivery_errors: 0 }}\n\
         exit                  count\n\
         pio-read                  5\n\
         pio-write               301\n\
         mmio-read                 2\n\
         mmio-write               22\n\
         total                   330\n",
        guest_ok(2048)
    );
    assert_eq!(stdout, expected);
}

#[test]
fn kvm_virtio_blk_raw_image_holds_the_sector() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let before = raw_image(&path, 64 << 10);
    let (code, stdout) = run(&[path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}");
    let head = format!(
        "vmm: disk {}: raw, 65536 bytes, read-write\n{}",
        path.display(),
        guest_ok(128)
    );
    assert!(stdout.starts_with(&head), "{stdout}");
    assert!(stdout.contains(METRICS_OK), "{stdout}");
    let after = std::fs::read(&path).unwrap();
    assert_eq!(sector_of(&after), pattern());
    // Nothing else changed.
    let mut expected = before;
    expected[SECTOR * 512..SECTOR * 512 + 512].copy_from_slice(&pattern());
    assert!(after == expected);
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (Debian package qemu-utils) must be installed");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn kvm_virtio_blk_qcow2_image_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    let p = path.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", p, "1M"]);
    let (code, stdout) = run(&[p, "--format", "qcow2"]);
    assert_eq!(code, Some(0), "{stdout}");
    let head = format!(
        "vmm: disk {p}: qcow2, 1048576 bytes, read-write\n{}",
        guest_ok(2048)
    );
    assert!(stdout.starts_with(&head), "{stdout}");
    assert!(stdout.contains(METRICS_OK), "{stdout}");

    // The image is consistent and holds the sector, read by QEMU and by vmkit.
    qemu_img(&["check", p]);
    let raw = dir.path().join("disk.raw");
    qemu_img(&["convert", "-O", "raw", p, raw.to_str().unwrap()]);
    let bytes = std::fs::read(&raw).unwrap();
    assert_eq!(sector_of(&bytes), pattern());
    assert!(
        bytes
            .iter()
            .enumerate()
            .all(|(i, b)| i / 512 == SECTOR || *b == 0)
    );
    let mut img = Qcow2Image::open(&path, true).unwrap();
    let mut sector = [0u8; 512];
    img.read_at(&mut sector, (SECTOR * 512) as u64).unwrap();
    assert_eq!(sector[..], pattern()[..]);
}

#[test]
fn kvm_virtio_blk_read_only_refuses_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let before = raw_image(&path, 64 << 10);
    let (code, stdout) = run(&[path.to_str().unwrap(), "--read-only"]);
    // 1 (OUT not OK) + 16 (the read returned the old data).
    assert_eq!(code, Some(17), "{stdout}");
    let head = format!(
        "vmm: disk {}: raw, 65536 bytes, read-only\n\
         guest: virtio-blk at 00:04.0\n\
         guest: capacity 0000000000000080 sectors\n\
         guest: OUT status 01 (IOERR)\n\
         guest: FLUSH status 00 (OK)\n\
         guest: IN status 00 (OK)\n\
         guest: read checksum {:08x}, differs from what was written\n\
         guest: GET_ID status 00 (OK)\n\
         guest: serial \"vmkit-example\"\n\
         guest: interrupts 04, result 11\n\
         --- guest stopped with status 17\n",
        path.display(),
        checksum(sector_of(&before)),
    );
    assert!(stdout.starts_with(&head), "{stdout}");
    assert!(
        stdout.contains(
            "device:    {\"reads\":1,\"writes\":0,\"read_bytes\":512,\"write_bytes\":0,\
             \"flushes\":1,\"get_ids\":1,\"discards\":0,\"write_zeroes\":0,\
             \"invalid_chains\":0,\"invalid_requests\":1,"
        ),
        "{stdout}"
    );
    assert!(std::fs::read(&path).unwrap() == before, "image changed");
}

/// `--io-uring` on tmpfs, where io_uring hands every request to a kernel worker thread: a
/// request completes after the doorbell's pass has returned, so only the completion eventfd,
/// which wakes the notify worker, gets it onto the used ring (without it the guest would wait
/// for its interrupt in vain and exit with 0x41).
#[test]
fn kvm_virtio_blk_io_uring_completions_wake_the_queue() {
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let path = dir.path().join("disk.raw");
    raw_image(&path, 64 << 10);
    let (code, stdout) = run(&[path.to_str().unwrap(), "--io-uring"]);
    assert_eq!(code, Some(0), "{stdout}");
    let head = format!(
        "vmm: disk {}: raw, 65536 bytes, read-write, io_uring\n{}",
        path.display(),
        guest_ok(128)
    );
    assert!(stdout.starts_with(&head), "{stdout}");
    assert!(stdout.contains(METRICS_OK), "{stdout}");
    // One notification per doorbell the guest rang; the completion wake-ups are the device's
    // own events and are not counted as notifications.
    assert!(
        stdout.contains("bad_notifies: 0, notifies: 4, trapped_notifies: 0"),
        "{stdout}"
    );
    assert_eq!(sector_of(&std::fs::read(&path).unwrap()), pattern());
}

/// Command-line and image errors stop the VMM before it opens /dev/kvm (so no `kvm_` name).
#[test]
fn virtio_blk_usage_and_image_errors() {
    // A qcow2 image whose header cluster has refcount 0: imago would hand that cluster out
    // again; the VMM refuses the image before it creates the VM.
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.qcow2");
    Qcow2Image::create(&corrupt, 1 << 20, None).unwrap();
    let mut img = std::fs::read(&corrupt).unwrap();
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap()) as usize;
    let refblock = be64(&img, be64(&img, 48));
    img[refblock..refblock + 2].copy_from_slice(&0u16.to_be_bytes());
    std::fs::write(&corrupt, &img).unwrap();
    let corrupt = corrupt.to_str().unwrap();
    // A LUKS-encrypted image (made by qemu-img): refused, never read as plain data.
    let encrypted = dir.path().join("luks.qcow2");
    let secret = "--object=secret,id=s0,data=vmkit";
    qemu_img(&[
        "create",
        "-q",
        secret,
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        encrypted.to_str().unwrap(),
        "1M",
    ]);
    let encrypted = encrypted.to_str().unwrap();
    for (args, code, message) in [
        (
            &["--bogus"][..],
            0x80,
            "virtio_blk: unknown option --bogus\nusage: virtio_blk [IMAGE] [--format raw|qcow2] [--read-only] [--io-uring]",
        ),
        (
            &["a.raw", "b.raw"],
            0x80,
            "virtio_blk: more than one IMAGE\nusage: virtio_blk",
        ),
        (
            &["/nonexistent/disk.raw"],
            255,
            "virtio_blk: image I/O failed: No such file or directory (os error 2)\n",
        ),
        (
            &[corrupt, "--format=qcow2"],
            255,
            "virtio_blk: qcow2 metadata inconsistent: 1 corruptions, 0 check errors",
        ),
        (
            &[encrypted, "--format", "qcow2"],
            255,
            "virtio_blk: qcow2 image is encrypted (crypt_method 2), which is not supported",
        ),
        (
            &["a.raw", "--format", "vmdk"],
            0x80,
            "virtio_blk: unknown format vmdk (raw or qcow2)\nusage: virtio_blk",
        ),
        (
            &["a.raw", "--format"],
            0x80,
            "virtio_blk: --format needs raw or qcow2\nusage: virtio_blk",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_virtio_blk"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with(message), "{args:?}: {stderr}");
    }
}
