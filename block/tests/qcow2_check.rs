//! `qcow2_check::check` against `qemu-img check --output=json` (the oracle): clean images of
//! every kind QEMU and vmkit write, and a table of deliberately corrupted ones; plus the point
//! of the check — imago reusing a metadata cluster whose refcount is 0, which
//! a checked writable open (`Qcow2Image::open`) prevents.
//!
//! These tests need `qemu-img` and `qemu-io` on PATH; they fail (never skip) without them.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{ok, p, run};
use proptest::prelude::*;
use vmkit_block::image::qcow2_check::{self, CheckReport, Finding, Referrer};
use vmkit_block::image::{
    self, BackingPolicy, DiskImage, ImageError, ImageFormat, OpenOptions, Qcow2Image,
};
use vmkit_block::test_utils::TempImages;

/// What `qemu-img check --output=json` reports.
#[derive(Debug, PartialEq)]
struct Qemu {
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    image_end_offset: Option<u64>,
}

fn qemu_check(path: &Path) -> Qemu {
    qemu_check_args(path, &[p(path)])
}

/// `qemu-img check --output=json` with `args` naming the image (`path`).
fn qemu_check_args(path: &Path, args: &[&str]) -> Qemu {
    let mut all = vec!["check", "--output=json"];
    all.extend(args);
    let out = run("qemu-img", &all);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check {}: no JSON ({e}): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let n = |k: &str| v.get(k).and_then(|x| x.as_u64());
    Qemu {
        corruptions: n("corruptions").unwrap_or(0),
        leaks: n("leaks").unwrap_or(0),
        check_errors: n("check-errors").unwrap_or(0),
        image_end_offset: n("image-end-offset"),
    }
}

/// Our report, after asserting its counts equal qemu-img's.
fn agree(path: &Path) -> CheckReport {
    agree_with(path, qemu_check(path))
}

/// Our report, after asserting its counts equal `q`'s.
fn agree_with(path: &Path, q: Qemu) -> CheckReport {
    let ours = qcow2_check::check(path).unwrap();
    assert_eq!(
        (ours.corruptions, ours.leaks, ours.check_errors),
        (q.corruptions, q.leaks, q.check_errors),
        "{}: ours {ours:#?}, qemu {q:?}",
        path.display()
    );
    if let Some(end) = q.image_end_offset {
        assert_eq!(ours.image_end_offset, end, "{}", path.display());
    }
    ours
}

/// Our counts equal qemu-img's and both are zero.
fn clean(path: &Path) {
    let r = agree(path);
    assert_eq!(
        (r.corruptions, r.leaks),
        (0, 0),
        "{}: {r:#?}",
        path.display()
    );
    assert!(r.findings.is_empty());
}

fn create(path: &Path, opts: &str, size: &str) {
    let mut args = vec!["create", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([p(path), size]);
    ok("qemu-img", &args);
}

fn io(path: &Path, cmd: &str) {
    ok("qemu-io", &["-f", "qcow2", "-c", cmd, p(path)]);
}

/// A few writes that leave data, zero and unallocated clusters, crossing L2 tables.
fn fill(path: &Path) {
    io(path, "write -P 0x5a 0 200k");
    io(path, "write -P 0x11 3000k 70k");
    io(path, "write -z 64k 64k");
    io(path, "write -z -u 1M 128k");
    io(path, "write -P 0x22 1100k 5k");
}

#[test]
fn clean_images_agree_with_qemu() {
    let dir = TempImages::new(false).unwrap();
    // Options of `qemu-img create`, then `fill`.
    for (name, opts) in [
        ("plain", ""),
        ("rc1", "refcount_bits=1"),
        ("rc2", "refcount_bits=2"),
        ("rc8", "refcount_bits=8"),
        ("rc32", "refcount_bits=32"),
        ("rc64", "refcount_bits=64"),
        ("c512", "cluster_size=512"),
        ("c2m", "cluster_size=2M"),
        ("v2", "compat=0.10"),
        ("extl2", "extended_l2=on"),
        ("lazy", "lazy_refcounts=on"),
        ("prealloc", "preallocation=metadata"),
        ("full", "preallocation=full"),
    ] {
        let q = dir.path(&format!("{name}.qcow2"));
        create(&q, opts, "4M");
        clean(&q);
        fill(&q);
        clean(&q);
    }

    // An external data file: its data clusters are not in the image file.
    let q = dir.path("df.qcow2");
    let df = dir.path("df.raw");
    create(&q, &format!("data_file={}", p(&df)), "4M");
    fill(&q);
    clean(&q);

    // Compressed clusters (several per host cluster, some spanning two).
    let raw = dir.path("src.raw");
    let mut data = vec![0u8; 4 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = ((i * 7 + i / 4096 * 13) % 251) as u8 & if i % 3 == 0 { 0xff } else { 0x0f };
    }
    std::fs::write(&raw, &data).unwrap();
    for (name, cs) in [("comp", "65536"), ("comp512", "512"), ("comp2m", "2M")] {
        let q = dir.path(&format!("{name}.qcow2"));
        ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &format!("cluster_size={cs}"),
                p(&raw),
                p(&q),
            ],
        );
        clean(&q);
        // Overwriting compressed clusters frees their references (copy-on-write).
        io(&q, "write -P 0x33 100k 300k");
        clean(&q);
    }

    // A backing overlay.
    let base = dir.path("base.qcow2");
    create(&base, "", "4M");
    fill(&base);
    let ov = dir.path("ov.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&ov),
        ],
    );
    io(&ov, "write -P 0x44 128k 64k");
    clean(&ov);

    // Internal snapshots sharing clusters (refcount 2 and 3, COPIED cleared).
    let q = dir.path("snap.qcow2");
    create(&q, "", "4M");
    fill(&q);
    ok("qemu-img", &["snapshot", "-c", "s1", p(&q)]);
    io(&q, "write -P 0x55 0 64k");
    ok("qemu-img", &["snapshot", "-c", "s2", p(&q)]);
    io(&q, "write -P 0x66 3000k 4k");
    clean(&q);
    let r = qcow2_check::check(&q).unwrap();
    assert!(r.image_end_offset > 0);
    ok("qemu-img", &["snapshot", "-d", "s1", p(&q)]);
    clean(&q);

    // LUKS encryption: the LUKS header clusters are referenced (qemu-img needs the secret).
    let q = dir.path("luks.qcow2");
    let secret = "secret,id=sec0,data=vmkit-test";
    let opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        p(&q)
    );
    ok(
        "qemu-img",
        &[
            "create",
            "--object",
            secret,
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            p(&q),
            "4M",
        ],
    );
    ok(
        "qemu-io",
        &[
            "--object",
            secret,
            "--image-opts",
            "-c",
            "write -P 7 0 100k",
            &opts,
        ],
    );
    let r = agree_with(
        &q,
        qemu_check_args(&q, &["--object", secret, "--image-opts", &opts]),
    );
    assert_eq!((r.corruptions, r.leaks), (0, 0));
    // Without the LUKS header counted, its clusters would be leaks: the header extension is
    // what references them.
    assert!(r.image_end_offset > 1 << 20);

    // A persistent dirty bitmap with data clusters.
    let q = dir.path("bitmap.qcow2");
    create(&q, "", "4M");
    ok("qemu-img", &["bitmap", "--add", p(&q), "b0"]);
    fill(&q);
    clean(&q);
}

#[test]
fn vmkit_written_images_agree_with_qemu() {
    let dir = TempImages::new(false).unwrap();
    let q = dir.path("v.qcow2");
    Qcow2Image::create(&q, 8 << 20, None).unwrap();
    clean(&q);
    let mut img = Qcow2Image::open(&q, false).unwrap();
    for i in 0..40u64 {
        let off = ((i * 2_654_435_761) % (8 << 20)) & !511;
        let len = (4096 * (1 + i % 20)).min((8 << 20) - off);
        if i % 4 == 3 {
            img.discard(off, len).unwrap();
        } else {
            img.write_at(&vec![i as u8 | 1; len as usize], off).unwrap();
        }
    }
    img.flush().unwrap();
    drop(img);
    clean(&q);
    assert!(Qcow2Image::open(&q, false).is_ok());
}

/// The raw image file with helpers to find and change its metadata (images from `qemu-img
/// create` with 16-bit refcounts).
struct Raw {
    f: std::fs::File,
    cluster_bits: u32,
}

impl Raw {
    fn open(path: &Path) -> Self {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut r = Raw { f, cluster_bits: 0 };
        r.cluster_bits = r.u64(16) as u32;
        r
    }
    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }
    fn u64(&self, at: u64) -> u64 {
        let mut b = [0u8; 8];
        self.f.read_exact_at(&mut b, at).unwrap();
        u64::from_be_bytes(b)
    }
    fn put(&self, at: u64, v: u64) {
        self.f.write_all_at(&v.to_be_bytes(), at).unwrap();
    }
    fn len(&self) -> u64 {
        self.f.metadata().unwrap().len()
    }
    fn l1_offset(&self) -> u64 {
        self.u64(40)
    }
    fn reftable(&self) -> u64 {
        self.u64(48)
    }
    /// File offset of the L1 entry `i`.
    fn l1_entry(&self, i: u64) -> u64 {
        self.l1_offset() + 8 * i
    }
    /// The L2 table of L1 entry 0.
    fn l2(&self) -> u64 {
        self.u64(self.l1_entry(0)) & 0x00ff_ffff_ffff_fe00
    }
    /// Host offset of guest cluster `i` (under L1 entry 0).
    fn data(&self, i: u64) -> u64 {
        self.u64(self.l2() + 8 * i) & 0x00ff_ffff_ffff_fe00
    }
    /// File offset of the 16-bit refcount of the cluster at `offset`.
    fn refcount_at(&self, offset: u64) -> u64 {
        assert_eq!(self.u64(96) >> 32, 4, "16-bit refcounts");
        let k = offset >> self.cluster_bits;
        let per_block = self.cs() / 2;
        let rb = self.u64(self.reftable() + 8 * (k / per_block)) & !0x1ff;
        assert_ne!(rb, 0);
        rb + 2 * (k % per_block)
    }
    fn set_refcount(&self, offset: u64, v: u16) {
        self.f
            .write_all_at(&v.to_be_bytes(), self.refcount_at(offset))
            .unwrap();
    }
}

/// A qemu-created image: 4 MiB disk, 256 KiB of data from guest offset 0 (one L2 table,
/// guest clusters 0..3 allocated).
fn base_image(path: &Path) {
    create(path, "", "4M");
    io(path, "write -P 0x5a 0 256k");
}

#[test]
fn corrupted_images_agree_with_qemu() {
    let dir = TempImages::new(false).unwrap();
    type Corrupt = fn(&Raw);
    // (name, corruption, expected corruptions, expected leaks); the expectations are what
    // qemu-img reports too (asserted by `agree`).
    let cases: &[(&str, Corrupt, u64, u64)] = &[
        // Refcount 0 under a referenced cluster: one corruption from the comparison, and for
        // clusters an active entry marks COPIED, one more for the flag (refcount != 1).
        ("l2_refcount_0", |r| r.set_refcount(r.l2(), 0), 2, 0),
        ("data_refcount_0", |r| r.set_refcount(r.data(1), 0), 2, 0),
        ("l1_refcount_0", |r| r.set_refcount(r.l1_offset(), 0), 1, 0),
        (
            "refblock_refcount_0",
            |r| r.set_refcount(r.refcount_at(0) & !(r.cs() - 1), 0),
            1,
            0,
        ),
        (
            "reftable_refcount_0",
            |r| r.set_refcount(r.reftable(), 0),
            1,
            0,
        ),
        ("header_refcount_0", |r| r.set_refcount(0, 0), 1, 0),
        // A cluster appended to the file with refcount 1 and no reference.
        (
            "leaked_cluster",
            |r| {
                let end = r.len().div_ceil(r.cs()) * r.cs();
                r.f.write_all_at(&vec![0u8; r.cs() as usize], end).unwrap();
                r.set_refcount(end, 1);
            },
            0,
            1,
        ),
        // Refcount 2 on a cluster referenced once: a leak, and its L2 entry's COPIED flag is
        // now wrong (a corruption).
        ("data_refcount_2", |r| r.set_refcount(r.data(2), 2), 1, 1),
        ("l2_refcount_2", |r| r.set_refcount(r.l2(), 2), 1, 1),
        // An L2 entry beyond the end of the file: the region corruption, and COPIED set on a
        // cluster with refcount 0.
        (
            "l2_entry_beyond_eof",
            |r| {
                let at = r.l2() + 8 * 10;
                r.put(at, (1 << 63) | ((r.len().div_ceil(r.cs()) + 16) * r.cs()));
            },
            2,
            0,
        ),
        // An L2 entry pointing at the L1 table: twice referenced, refcount 1.
        (
            "data_overlaps_l1",
            |r| r.put(r.l2() + 8 * 20, (1 << 63) | r.l1_offset()),
            1,
            0,
        ),
        // L1 entry 0 moved 512 bytes into its L2 table: misaligned (1 corruption); the
        // "table" is the old L2 table's tail (zeroes) and the first 512 bytes of guest
        // cluster 0, whose 0x5a bytes read as 64 compressed descriptors pointing far beyond
        // the file (64); guest clusters 1..3 are no longer referenced (3 leaks).
        (
            "misaligned_l2_in_l1",
            |r| r.put(r.l1_entry(0), (1 << 63) | (r.l2() + 512)),
            65,
            3,
        ),
        // A data cluster misaligned by 512 bytes: misaligned, and it now spans two clusters,
        // the second referenced twice with refcount 1.
        (
            "misaligned_data",
            |r| r.put(r.l2() + 8, (1 << 63) | (r.data(1) + 512)),
            2,
            0,
        ),
        // Reserved bits in an L1 and an L2 entry.
        (
            "reserved_l1",
            |r| r.put(r.l1_entry(0), r.u64(r.l1_entry(0)) | 2),
            1,
            0,
        ),
        (
            "reserved_l2",
            |r| r.put(r.l2() + 8, r.u64(r.l2() + 8) | 4),
            1,
            0,
        ),
        // COPIED cleared on a data cluster with refcount 1.
        (
            "copied_cleared",
            |r| r.put(r.l2(), r.u64(r.l2()) & !(1 << 63)),
            1,
            0,
        ),
        // A refcount table entry with reserved bits: the corruption, and its refcount block
        // (no longer counted as referenced) becomes a leak.
        (
            "reserved_reftable",
            |r| r.put(r.reftable(), r.u64(r.reftable()) | 1),
            1,
            1,
        ),
    ];
    for &(name, corrupt, corruptions, leaks) in cases {
        let q = dir.path(&format!("{name}.qcow2"));
        base_image(&q);
        corrupt(&Raw::open(&q));
        let r = agree(&q);
        assert_eq!(
            (r.corruptions, r.leaks),
            (corruptions, leaks),
            "{name}: {r:#?}"
        );
        assert!(!r.findings.is_empty(), "{name}");
        let opened = Qcow2Image::open(&q, false);
        if r.corruptions > 0 {
            assert!(
                matches!(&opened, Err(ImageError::Inconsistent(rep)) if **rep == r),
                "{name}: open_checked accepted a corrupt image"
            );
            assert!(
                image::open(&q, &OpenOptions::new(ImageFormat::Qcow2)).is_err(),
                "{name}"
            );
        } else {
            assert!(opened.is_ok(), "{name}: open_checked refused a leaky image");
        }
    }
}

/// Tables named many times are read once and counted with their multiplicity: all L1 entries
/// of an image with 512-byte clusters (128 of them) point at one L2 table, on 16-bit and on
/// 1-bit refcounts. With 16 bits: the L2 table and its 4 data clusters have refcount 1 and
/// 128 references (5 corruptions). With 1 bit the counted references saturate at 1, as in
/// QEMU, and each of the 127 extra references to those 5 clusters is an overflow corruption.
#[test]
fn shared_tables_count_with_multiplicity() {
    let dir = TempImages::new(false).unwrap();
    for (name, bits, corruptions) in [("rc16", 16, 1 + 4), ("rc1", 1, 127 + 4 * 127)] {
        let q = dir.path(&format!("{name}.qcow2"));
        create(&q, &format!("cluster_size=512,refcount_bits={bits}"), "4M");
        io(&q, "write -P 0x5a 0 2k");
        let r = Raw::open(&q);
        let l1 = r.u64(r.l1_entry(0));
        let n = r.u64(32) & 0xffff_ffff;
        assert_eq!(n, 128);
        for i in 1..n {
            r.put(r.l1_entry(i), l1);
        }
        drop(r);
        let rep = agree(&q);
        assert_eq!(rep.corruptions, corruptions, "{name}: {rep:#?}");
    }
}

/// Files QEMU would not open are refused with `ImageError::Format` (a table of bad headers),
/// and arbitrary damage to a valid image never panics.
#[test]
fn bad_headers_are_refused() {
    let dir = TempImages::new(false).unwrap();
    let q = dir.path("good.qcow2");
    base_image(&q);
    let good = std::fs::read(&q).unwrap();
    type Damage = fn(&mut Vec<u8>);
    let cases: &[(&str, Damage)] = &[
        ("magic", |b| b[0] = b'q'),
        ("version 1", |b| {
            b[4..8].copy_from_slice(&1u32.to_be_bytes())
        }),
        ("version 4", |b| {
            b[4..8].copy_from_slice(&4u32.to_be_bytes())
        }),
        ("cluster_bits 8", |b| {
            b[20..24].copy_from_slice(&8u32.to_be_bytes())
        }),
        ("cluster_bits 22", |b| {
            b[20..24].copy_from_slice(&22u32.to_be_bytes())
        }),
        ("refcount_order 7", |b| {
            b[96..100].copy_from_slice(&7u32.to_be_bytes())
        }),
        ("header_length 100", |b| {
            b[100..104].copy_from_slice(&100u32.to_be_bytes())
        }),
        ("unknown incompatible", |b| {
            b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes())
        }),
        ("l1_size 2^31", |b| {
            b[36..40].copy_from_slice(&(1u32 << 31).to_be_bytes())
        }),
        ("l1 misaligned", |b| {
            b[40..48].copy_from_slice(&0x30200u64.to_be_bytes())
        }),
        ("l1 overflow", |b| {
            b[40..48].copy_from_slice(&(!0xffffu64).to_be_bytes())
        }),
        ("l1 too small", |b| {
            b[24..32].copy_from_slice(&(1u64 << 40).to_be_bytes())
        }),
        ("reftable huge", |b| {
            b[56..60].copy_from_slice(&u32::MAX.to_be_bytes())
        }),
        ("reftable misaligned", |b| {
            b[48..56].copy_from_slice(&0x10008u64.to_be_bytes())
        }),
        ("snapshots 2^20", |b| {
            b[60..64].copy_from_slice(&(1u32 << 20).to_be_bytes())
        }),
        ("snapshots misaligned", |b| {
            b[64..72].copy_from_slice(&0x777u64.to_be_bytes())
        }),
        ("extension too long", |b| {
            let hl = u32::from_be_bytes([b[100], b[101], b[102], b[103]]) as usize;
            b[hl..hl + 8].copy_from_slice(&[0, 0, 0, 9, 0xff, 0xff, 0, 0])
        }),
        ("truncated", |b| b.truncate(50)),
        ("empty", |b| b.clear()),
    ];
    for &(name, damage) in cases {
        let mut img = good.clone();
        damage(&mut img);
        std::fs::write(&q, &img).unwrap();
        let r = qcow2_check::check(&q);
        assert!(matches!(r, Err(ImageError::Format(_))), "{name}: {r:?}");
        let opened = Qcow2Image::open(&q, false);
        if name == "unknown incompatible" {
            // The open names what it refuses before the check runs.
            assert!(
                matches!(opened, Err(ImageError::UnsupportedFeatures { bits }) if bits == 1 << 40),
                "{name}"
            );
        } else {
            assert!(matches!(opened, Err(ImageError::Format(_))), "{name}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random bytes written over a valid image (header, tables, data): the check returns a
    /// report or `ImageError::Format`, never panics, and keeps its findings bounded.
    #[test]
    fn damaged_images_never_panic(
        edits in prop::collection::vec((0usize..400_000, prop::collection::vec(any::<u8>(), 1..16)), 1..8)
    ) {
        let dir = TempImages::new(false).unwrap();
        let q = dir.path("d.qcow2");
        let mut img = damaged_base();
        for (at, bytes) in edits {
            let at = at % img.len();
            let end = (at + bytes.len()).min(img.len());
            img[at..end].copy_from_slice(&bytes[..end - at]);
        }
        std::fs::write(&q, &img).unwrap();
        if let Ok(r) = qcow2_check::check(&q) {
            prop_assert!(r.findings.len() <= qcow2_check::MAX_FINDINGS);
        }
    }
}

/// A small valid image with every kind of metadata (snapshot, compressed-free data, zero
/// clusters), made once.
fn damaged_base() -> Vec<u8> {
    static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let dir = TempImages::new(false).unwrap();
        let q = dir.path("base.qcow2");
        create(&q, "cluster_size=4096", "1M");
        io(&q, "write -P 0x11 0 40k");
        ok("qemu-img", &["snapshot", "-c", "s1", p(&q)]);
        io(&q, "write -P 0x22 8k 16k");
        io(&q, "write -z 200k 8k");
        std::fs::read(&q).unwrap()
    })
    .clone()
}

/// A version 3 snapshot table entry without the required extra data (VM state size, disk
/// size) is a corruption for QEMU's check ("snapshot table entry is incomplete"), and here.
#[test]
fn incomplete_snapshot_entry_agrees() {
    let dir = TempImages::new(false).unwrap();
    let q = dir.path("snap.qcow2");
    base_image(&q);
    ok("qemu-img", &["snapshot", "-c", "s1", p(&q)]);
    let r = Raw::open(&q);
    let entry = r.u64(64);
    // extra_data_size (byte 36 of the entry) 24 -> 8.
    r.f.write_all_at(&8u32.to_be_bytes(), entry + 36).unwrap();
    drop(r);
    let rep = agree(&q);
    assert_eq!((rep.corruptions, rep.leaks), (1, 0));
    assert_eq!(rep.findings, vec![Finding::BadSnapshot { index: 0 }]);
}

/// The `qcow2_image` fuzz seeds (valid, corrupt and fuzzer-found images) agree with qemu-img
/// wherever qemu-img opens them (it does not open `ov`, whose backing file is absent).
#[test]
fn fuzz_seeds_agree_with_qemu() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/qcow2_image");
    let mut compared = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let out = run(
            "qemu-img",
            &["check", "--output=json", "-f", "qcow2", p(&path)],
        );
        if serde_json::from_slice::<serde_json::Value>(&out.stdout).is_ok() {
            agree(&path);
            compared += 1;
        }
    }
    assert!(compared >= 8, "{compared} seeds compared");
}

#[test]
fn findings_name_the_cluster_and_referrer() {
    let dir = TempImages::new(false).unwrap();
    let q = dir.path("l2.qcow2");
    base_image(&q);
    let raw = Raw::open(&q);
    let l2 = raw.l2();
    raw.set_refcount(l2, 0);
    let r = qcow2_check::check(&q).unwrap();
    let cluster = l2 / raw.cs();
    assert!(r.findings.contains(&Finding::RefcountTooLow {
        cluster,
        refcount: 0,
        references: 1,
        referrer: Some(Referrer::L2Table),
    }));
    assert!(r.findings.iter().any(|f| matches!(
        f,
        Finding::CopiedFlag {
            refcount: 0,
            referrer: Referrer::L2Table,
            ..
        }
    )));
    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(serde_json::from_str::<CheckReport>(&json).unwrap(), r);
}

/// The point of the check: imago trusts the refcounts, so in an image whose L2 table has
/// refcount 0 a write to an unallocated cluster takes the L2 table's cluster for guest data —
/// the image loses its mapping (data written before reads back differently, and `qemu-img
/// check` finds more damage afterwards). The checked open refuses the image beforehand, and
/// an unchecked one refuses the write (the L2 table is in the open's metadata map).
#[test]
fn refcount_zero_l2_is_refused_by_the_checked_open_and_the_write_guard() {
    let dir = TempImages::new(false).unwrap();
    let q = dir.path("victim.qcow2");
    base_image(&q);
    let raw = Raw::open(&q);
    let l2 = raw.l2();
    raw.set_refcount(l2, 0);
    drop(raw);
    let before = agree(&q);
    assert!(!before.is_consistent());
    assert!(matches!(
        Qcow2Image::open(&q, false),
        Err(ImageError::Inconsistent(_))
    ));
    let strict = OpenOptions::new(ImageFormat::Qcow2).backing(BackingPolicy::Deny);
    assert!(matches!(
        Qcow2Image::open_with(&q, &strict),
        Err(ImageError::Inconsistent(_))
    ));

    // Unchecked: imago allocates the "free" L2 cluster for the new guest data (without the
    // guard, the data and the L2 table were written to the same cluster and one was lost).
    // The last-line check refuses the write before a byte of it reaches the file.
    let unchecked = OpenOptions::new(ImageFormat::Qcow2).check_consistency(false);
    let mut img = Qcow2Image::open_with(&q, &unchecked).unwrap();
    assert!(matches!(
        img.write_at(&[0xee; 65536], 1 << 20),
        Err(ImageError::MetadataOverlap { host_offset }) if host_offset == l2
    ));
    img.flush().unwrap();
    drop(img);
    let mut img = Qcow2Image::open(&q, true).unwrap();
    let mut old = vec![0u8; 65536];
    img.read_at(&mut old, 0).unwrap();
    drop(img);
    assert!(old.iter().all(|&b| b == 0x5a), "the old data is intact");
    let after = agree(&q);
    assert_eq!(after.corruptions, before.corruptions, "nothing got worse");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Random writes, discards and zero writes through `Qcow2Image` on a fresh image: the
    /// check finds nothing, as qemu-img.
    #[test]
    fn random_workloads_stay_consistent(
        ops in prop::collection::vec((0u8..3, 0u64..(8 << 20) / 512, 1u64..300), 1..24)
    ) {
        let dir = TempImages::new(false).unwrap();
        let q = dir.path("p.qcow2");
        let size = 8u64 << 20;
        Qcow2Image::create(&q, size, None).unwrap();
        let mut img = Qcow2Image::open(&q, false).unwrap();
        for (kind, sector, sectors) in ops {
            let off = sector * 512;
            let len = (sectors * 512).min(size - off);
            match kind {
                0 => img.write_at(&vec![sectors as u8 | 1; len as usize], off).unwrap(),
                1 => img.discard(off, len).unwrap(),
                _ => img.write_zeroes(off, len, false).unwrap(),
            }
        }
        img.flush().unwrap();
        drop(img);
        let r = agree(&q);
        prop_assert_eq!((r.corruptions, r.leaks), (0, 0));
    }
}
