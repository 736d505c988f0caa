//! Interop with QEMU's `qemu-img`/`qemu-io` (Debian package `qemu-utils`), the reference
//! implementation of qcow2: images QEMU writes read back byte-identical through vmkit, and
//! images vmkit writes pass `qemu-img check` and `qemu-img compare`.
//!
//! These tests need `qemu-img` and `qemu-io` on PATH; they fail (never skip) without them.

mod common;

use std::path::Path;

use common::{ok, p, run};
use vmkit_block::image::{
    self, BackingPolicy, DiskImage, ImageError, ImageFormat, OpenOptions, Qcow2Image, RawImage,
};
use vmkit_block::test_utils::{TempImages, read_all};

const SIZE: u64 = 4 << 20;

/// A raw file with a recognisable, non-repeating pattern in some clusters and holes elsewhere.
fn patterned_raw(path: &Path) -> Vec<u8> {
    let mut img = RawImage::create(path, SIZE).unwrap();
    let mut content = vec![0u8; SIZE as usize];
    for (i, chunk) in content.chunks_mut(65536).enumerate() {
        if i % 3 == 1 {
            continue; // a hole
        }
        for (j, b) in chunk.iter_mut().enumerate() {
            *b = ((i * 131 + j * 7) % 251) as u8;
        }
    }
    img.write_at(&content, 0).unwrap();
    content
}

fn qemu_check(path: &Path) {
    let out = run("qemu-img", &["check", p(path)]);
    assert!(
        out.status.success(),
        "qemu-img check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_compare(image: &Path, raw: &Path) {
    ok(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", p(image), p(raw)],
    );
}

/// `qemu-img create -f qcow2 -b backing -F fmt overlay` (`backing` relative to the overlay).
fn qemu_overlay(overlay: &Path, backing: &str, fmt: &str) {
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            fmt,
            p(overlay),
        ],
    );
}

/// `qemu-img check` passes on `image`, and `qemu-img compare` finds it equal to `expect`.
fn qemu_verify(dir: &TempImages, image: &Path, expect: &[u8]) {
    qemu_check(image);
    let flat = dir.path("expect.raw");
    std::fs::write(&flat, expect).unwrap();
    qemu_compare(image, &flat);
}

#[test]
fn reads_qemu_created_qcow2_byte_identical() {
    let dir = TempImages::new(false).unwrap();
    let raw = dir.path("src.raw");
    let content = patterned_raw(&raw);
    let q = dir.path("img.qcow2");
    ok(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", p(&raw), p(&q)],
    );
    let mut img = image::open(&q, &OpenOptions::new(ImageFormat::Qcow2).read_only(true)).unwrap();
    assert_eq!(img.format(), ImageFormat::Qcow2);
    assert_eq!(img.size(), SIZE);
    assert!(read_all(&mut *img).unwrap() == content);
    // Unaligned reads across cluster boundaries.
    let mut buf = vec![0u8; 100_000];
    img.read_at(&mut buf, 65536 - 777).unwrap();
    assert!(buf[..] == content[65536 - 777..65536 - 777 + 100_000]);
}

#[test]
fn reads_qemu_empty_and_zero_clusters() {
    let dir = TempImages::new(false).unwrap();
    let q = dir.path("z.qcow2");
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", p(&q), &SIZE.to_string()],
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 0 128k", p(&q)],
    );
    ok("qemu-io", &["-f", "qcow2", "-c", "write -z 64k 64k", p(&q)]);
    let mut img = image::open(&q, &OpenOptions::new(ImageFormat::Qcow2).read_only(true)).unwrap();
    let all = read_all(&mut *img).unwrap();
    assert!(all[..65536].iter().all(|&b| b == 0x5a));
    assert!(all[65536..].iter().all(|&b| b == 0));
}

#[test]
fn reads_compressed_clusters() {
    let dir = TempImages::new(false).unwrap();
    let raw = dir.path("src.raw");
    let content = patterned_raw(&raw);
    let q = dir.path("c.qcow2");
    ok(
        "qemu-img",
        &["convert", "-c", "-f", "raw", "-O", "qcow2", p(&raw), p(&q)],
    );
    // The image really holds compressed clusters: it is much smaller than the data.
    let on_disk = std::fs::metadata(&q).unwrap().len();
    assert!(on_disk < SIZE / 2, "image not compressed: {on_disk} bytes");
    let mut img = image::open(&q, &OpenOptions::new(ImageFormat::Qcow2).read_only(true)).unwrap();
    assert!(read_all(&mut *img).unwrap() == content);

    // Writing over compressed clusters (copy-on-write) keeps the image valid for QEMU.
    let mut img = Qcow2Image::open(&q, false).unwrap();
    let mut expect = content.clone();
    img.write_at(&[0xc3; 4096], 70_000).unwrap();
    expect[70_000..74_096].fill(0xc3);
    img.flush().unwrap();
    drop(img);
    qemu_check(&q);
    std::fs::write(&raw, &expect).unwrap();
    qemu_compare(&q, &raw);
}

#[test]
fn reads_backing_chain() {
    let dir = TempImages::new(false).unwrap();
    let raw = dir.path("base.raw");
    let mut expect = patterned_raw(&raw);
    // base (raw) <- mid (qcow2) <- top (qcow2), each layer writing something.
    let mid = dir.path("mid.qcow2");
    let top = dir.path("top.qcow2");
    qemu_overlay(&mid, "base.raw", "raw");
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 512k 100k", p(&mid)],
    );
    qemu_overlay(&top, "mid.qcow2", "qcow2");
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x22 560k 8k", p(&top)],
    );
    expect[512 * 1024..612 * 1024].fill(0x11);
    expect[560 * 1024..568 * 1024].fill(0x22);

    let mut img = image::open(&top, &OpenOptions::new(ImageFormat::Qcow2).read_only(true)).unwrap();
    assert!(read_all(&mut *img).unwrap() == expect);

    // Opened standalone (untrusted image: follow no names), only top's own data shows.
    let strict = OpenOptions::new(ImageFormat::Qcow2)
        .read_only(true)
        .backing(BackingPolicy::Deny);
    assert!(matches!(
        Qcow2Image::open_with(&top, &strict),
        Err(ImageError::BackingRefused { name }) if name == Path::new("mid.qcow2")
    ));

    // vmkit writes into the overlay: QEMU agrees on the result and the base is untouched.
    let base_before = std::fs::read(&raw).unwrap();
    let mut img = Qcow2Image::open(&top, false).unwrap();
    img.write_at(&[0x33; 1000], 3_000_000).unwrap();
    img.write_zeroes(600 * 1024, 4096, false).unwrap();
    expect[3_000_000..3_001_000].fill(0x33);
    expect[600 * 1024..604 * 1024].fill(0);
    img.flush().unwrap();
    drop(img);
    assert!(std::fs::read(&raw).unwrap() == base_before);
    qemu_verify(&dir, &top, &expect);
}

#[test]
fn vmkit_created_images_pass_qemu_check_and_compare() {
    let dir = TempImages::new(false).unwrap();
    let q = dir.path("v.qcow2");
    Qcow2Image::create(&q, SIZE, None).unwrap();
    let mut img = Qcow2Image::open(&q, false).unwrap();
    let mut expect = vec![0u8; SIZE as usize];
    let mut seed = 0x1234_5678_9abc_def0u64;
    for i in 0..200u64 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let off = (seed % (SIZE - 70_000)) & !511;
        let len = ((seed >> 40) % 65536 + 512) & !511;
        match i % 5 {
            0..=2 => {
                let b = (seed >> 8) as u8;
                img.write_at(&vec![b; len as usize], off).unwrap();
                expect[off as usize..(off + len) as usize].fill(b);
            }
            3 => {
                img.discard(off, len).unwrap();
                expect[off as usize..(off + len) as usize].fill(0);
            }
            _ => {
                img.write_zeroes(off, len, i % 2 == 0).unwrap();
                expect[off as usize..(off + len) as usize].fill(0);
            }
        }
    }
    img.flush().unwrap();
    drop(img);
    qemu_verify(&dir, &q, &expect);

    // A vmkit-created overlay over a vmkit-created base.
    let ov = dir.path("ov.qcow2");
    Qcow2Image::create(&ov, SIZE, Some(("v.qcow2", ImageFormat::Qcow2))).unwrap();
    let mut img = Qcow2Image::open(&ov, false).unwrap();
    img.write_at(&[9u8; 8192], 4096).unwrap();
    expect[4096..12288].fill(9);
    img.flush().unwrap();
    drop(img);
    qemu_verify(&dir, &ov, &expect);
    let info = run("qemu-img", &["info", p(&ov)]);
    assert!(String::from_utf8_lossy(&info.stdout).contains("v.qcow2"));
}

/// Vectored reads and writes (what the device issues) over a qcow2 overlay whose clusters are
/// of every kind — owned by the overlay (read and written in place, straight on the file),
/// unallocated (backing data), compressed in the backing image, and stretches crossing
/// cluster boundaries between kinds (imago's path) — agree with a plain model, and the result
/// passes `qemu-img check` and `qemu-img compare`.
#[test]
fn vectored_io_over_every_cluster_kind_matches_qemu() {
    use std::io::{IoSlice, IoSliceMut};
    let dir = TempImages::new(false).unwrap();
    let raw = dir.path("src.raw");
    let mut expect = patterned_raw(&raw);
    let base = dir.path("base.qcow2");
    ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            p(&raw),
            p(&base),
        ],
    );
    let top = dir.path("top.qcow2");
    qemu_overlay(&top, "base.qcow2", "qcow2");
    let mut img = Qcow2Image::open(&top, false).unwrap();
    let mut seed = 0x0bad_cafe_f00d_1234u64;
    for i in 0..300u32 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let segs = 1 + (seed % 4) as usize;
        let seg_len = (((seed >> 8) % 16) as usize + 1) * 512;
        let len = segs * seg_len;
        let off = ((seed >> 20) % (SIZE - len as u64)) & !511;
        let (o, e) = (off as usize, off as usize + len);
        if i % 2 == 0 {
            let data: Vec<Vec<u8>> = (0..segs)
                .map(|s| vec![(i as u8).wrapping_add(s as u8) | 1; seg_len])
                .collect();
            let bufs: Vec<IoSlice<'_>> = data.iter().map(|d| IoSlice::new(d)).collect();
            img.write_vectored(&bufs, off).unwrap();
            expect[o..e].copy_from_slice(&data.concat());
        } else {
            let mut data = vec![vec![0u8; seg_len]; segs];
            let mut bufs: Vec<IoSliceMut<'_>> =
                data.iter_mut().map(|d| IoSliceMut::new(d)).collect();
            img.read_vectored(&mut bufs, off).unwrap();
            assert!(data.concat() == expect[o..e], "read {off:#x}+{len:#x}");
        }
    }
    img.flush().unwrap();
    drop(img);
    qemu_verify(&dir, &top, &expect);
}

/// An image whose refcount table leaves part of the file without a refcount block (what
/// `qemu-img check` calls corrupt) is refused writable — imago would recurse allocating the
/// missing blocks and, on a crafted image, overflow the stack — and still opens read-only.
#[test]
fn writable_open_refuses_missing_refcount_blocks() {
    use std::os::unix::fs::FileExt;
    let dir = TempImages::new(false).unwrap();
    let q = dir.path("c.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", p(&q), "4M"]);
    ok("qemu-io", &["-c", "write -P 0x5a 0 256k", p(&q)]);
    assert!(Qcow2Image::open(&q, false).is_ok());
    // Clear reftable entry 0 (refcount_table_offset is the big-endian u64 at byte 48).
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&q)
        .unwrap();
    let mut off = [0u8; 8];
    f.read_exact_at(&mut off, 48).unwrap();
    f.write_all_at(&[0u8; 8], u64::from_be_bytes(off)).unwrap();
    drop(f);
    assert!(!run("qemu-img", &["check", p(&q)]).status.success());
    assert!(matches!(
        Qcow2Image::open(&q, false),
        Err(ImageError::Inconsistent(_))
    ));
    let unchecked = OpenOptions::new(ImageFormat::Qcow2).check_consistency(false);
    assert!(matches!(
        Qcow2Image::open_with(&q, &unchecked),
        Err(ImageError::UnsafeLayout { .. })
    ));
    let mut ro = Qcow2Image::open(&q, true).unwrap();
    let mut buf = [0u8; 512];
    ro.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x5a; 512]);
}
