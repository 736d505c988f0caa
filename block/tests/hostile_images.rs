//! Images a guest or a stranger could have written, opened as a VMM opens them: one row per
//! way an image could reach host files, crash or hang the VMM, or lose data, each asserting the
//! exact refusal (`ImageError` variant). Images are made with qemu-img/qemu-io (Debian
//! `qemu-utils`) and byte edits. A sentinel file outside the images' directory stands in for
//! a host secret: no row may read it (no disk read returns its bytes) or write it.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{ok, p, run};
use vmkit_block::image::{
    self, BackingPolicy, DirtyPolicy, DiskImage, FollowRules, ImageError, ImageFormat, OpenOptions,
    Qcow2Image, RawImage,
};

/// The secret's bytes: a pattern no image here holds.
const SECRET: &[u8] = b"host secret: never on a guest disk! ";

struct Dirs {
    images: tempfile::TempDir,
    outside: tempfile::TempDir,
    sentinel: PathBuf,
}

impl Dirs {
    fn new() -> Self {
        let images = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let sentinel = outside.path().join("secret");
        std::fs::write(&sentinel, SECRET.repeat(4096)).unwrap();
        Self {
            images,
            outside,
            sentinel,
        }
    }
    fn img(&self, name: &str) -> PathBuf {
        self.images.path().join(name)
    }
    /// The sentinel is as the test made it.
    fn sentinel_untouched(&self) {
        assert_eq!(std::fs::read(&self.sentinel).unwrap(), SECRET.repeat(4096));
    }
}

fn qcow2() -> OpenOptions {
    OpenOptions::new(ImageFormat::Qcow2)
}

/// A minimal version 2 qcow2 header (72 bytes, 64 KiB clusters, no tables) whose backing file
/// name is `name`: what a guest can write into sector 0 of its raw disk.
fn header_naming(name: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 512];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&2u32.to_be_bytes());
    h[8..16].copy_from_slice(&72u64.to_be_bytes()); // backing_file_offset
    h[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster_bits
    h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes()); // size
    h[72..72 + name.len()].copy_from_slice(name);
    h
}

/// Patch `len` bytes at `offset` of `path`.
fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

/// Find `needle` in the file at `path`.
fn find(path: &Path, needle: &[u8]) -> u64 {
    let b = std::fs::read(path).unwrap();
    b.windows(needle.len()).position(|w| w == needle).unwrap() as u64
}

/// Whether any disk byte read from `img` is part of the secret.
fn reads_secret(img: &mut dyn DiskImage) -> bool {
    let mut buf = vec![0u8; img.size().min(1 << 20) as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf.windows(16).any(|w| w == &SECRET[..16])
}

fn qemu_img(args: &[&str]) {
    ok("qemu-img", args);
}

/// A 1 MiB qcow2 overlay at `top` on `base.raw` beside it, its format recorded as raw.
fn overlay_on_base_raw(top: &Path) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        p(top),
        "1M",
    ]);
}

#[test]
fn a_raw_disk_whose_guest_wrote_a_qcow2_header_stays_raw() {
    let d = Dirs::new();
    let disk = d.img("guest.raw");
    let mut raw = RawImage::create(&disk, 1 << 20).unwrap();
    for name in [
        d.sentinel.to_str().unwrap().as_bytes().to_vec(),
        b"../../../../../../../../../../..".to_vec(),
    ] {
        let header = header_naming(&name);
        raw.write_at(&header, 0).unwrap();
        raw.flush().unwrap();
        // The old open guessed qcow2 from these bytes; the caller states raw.
        assert_eq!(image::probe_format(&disk).unwrap(), ImageFormat::Qcow2);
        let mut img = image::open(&disk, &OpenOptions::new(ImageFormat::Raw)).unwrap();
        let mut back = vec![0u8; 512];
        img.read_at(&mut back, 0).unwrap();
        assert_eq!(back, header, "the guest reads its own bytes");
        assert!(!reads_secret(&mut *img));
    }
    // Even a caller who wrongly states qcow2 never reaches the sentinel: it is outside the
    // image's directory.
    raw.write_at(&header_naming(d.sentinel.to_str().unwrap().as_bytes()), 0)
        .unwrap();
    let r = image::open(&disk, &qcow2().read_only(true));
    assert!(
        matches!(&r, Err(ImageError::BackingFormatMissing { name }) if *name == d.sentinel),
        "{:?}",
        r.err()
    );
    let raw_backing = qcow2().read_only(true).backing(BackingPolicy::Follow(
        FollowRules::default().assume_format(Some(ImageFormat::Raw)),
    ));
    let r = image::open(&disk, &raw_backing);
    assert!(
        matches!(&r, Err(ImageError::BackingOutsideRoot { name, .. }) if *name == d.sentinel),
        "{:?}",
        r.err()
    );
    d.sentinel_untouched();
}

/// An overlay whose backing file is the sentinel (absolute, or relative with `..`), and an
/// overlay with no recorded backing format: each refused with its own error.
#[test]
fn backing_names_are_confined_and_formats_never_probed() {
    let d = Dirs::new();
    let rel = format!(
        "../{}/secret",
        d.outside.path().file_name().unwrap().to_str().unwrap()
    );
    let cases: &[(&str, String)] = &[
        ("absolute", d.sentinel.to_str().unwrap().to_string()),
        ("dotdot", rel),
    ];
    for (what, name) in cases {
        let top = d.img(&format!("{what}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            name,
            "-F",
            "raw",
            p(&top),
            "1M",
        ]);
        for ro in [true, false] {
            let r = image::open(&top, &qcow2().read_only(ro));
            assert!(
                matches!(&r, Err(ImageError::BackingOutsideRoot { name: n, root })
                    if n == Path::new(name) && root == &d.images.path().canonicalize().unwrap()),
                "{what}: {:?}",
                r.err()
            );
        }
        // Unconfined (a trusted image) it opens, and reads the file: the policy is the guard.
        let trusted = qcow2().read_only(true).backing(BackingPolicy::Follow(
            FollowRules::default().confinement(image::Confinement::Unconfined),
        ));
        let mut img = image::open(&top, &trusted).unwrap();
        assert!(
            reads_secret(&mut *img),
            "{what}: unconfined follows the name"
        );
    }

    // No recorded backing format: refused, unless the caller states one.
    let base = d.img("base.raw");
    RawImage::create(&base, 1 << 20).unwrap();
    let top = d.img("nofmt.qcow2");
    overlay_on_base_raw(&top);
    // Turn the backing-format extension (type 0xe2792aca) into an unknown one.
    let at = find(&top, &0xe279_2acau32.to_be_bytes());
    patch(&top, at, &0x0bad_0badu32.to_be_bytes());
    assert!(matches!(
        image::open(&top, &qcow2()),
        Err(ImageError::BackingFormatMissing { name }) if name == Path::new("base.raw")
    ));
    let stated = qcow2().backing(BackingPolicy::Follow(
        FollowRules::default().assume_format(Some(ImageFormat::Raw)),
    ));
    assert!(image::open(&top, &stated).is_ok());
    // A recorded format vmkit does not open.
    let top = d.img("vmdk.qcow2");
    overlay_on_base_raw(&top);
    let at = find(&top, &0xe279_2acau32.to_be_bytes());
    patch(&top, at + 8, b"xyz");
    assert!(matches!(
        image::open(&top, &qcow2()),
        Err(ImageError::BackingFormatUnsupported { format, .. }) if format == "xyz"
    ));
    // Deny: no backing file at all.
    assert!(matches!(
        image::open(&top, &qcow2().backing(BackingPolicy::Deny)),
        Err(ImageError::BackingRefused { name }) if name == Path::new("base.raw")
    ));
    d.sentinel_untouched();
}

#[test]
fn loops_fifos_directories_and_proc_names_are_refused_without_blocking() {
    let d = Dirs::new();
    let a = d.img("a.qcow2");
    let b = d.img("b.qcow2");
    let create = |path: &Path, backing: &str| {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            backing,
            "-F",
            "qcow2",
            p(path),
            "1M",
        ]);
    };
    create(&a, "b.qcow2");
    create(&b, "a.qcow2");
    let self_ref = d.img("self.qcow2");
    create(&self_ref, "self.qcow2");
    let via_link = d.img("link.qcow2");
    std::os::unix::fs::symlink(&self_ref, d.img("alias.qcow2")).unwrap();
    create(&via_link, "alias.qcow2");
    for (top, closing) in [
        (&a, "a.qcow2"),
        (&self_ref, "self.qcow2"),
        (&via_link, "self.qcow2"),
    ] {
        let r = image::open(top, &qcow2().read_only(true));
        assert!(
            matches!(&r, Err(ImageError::BackingLoop { name }) if name == Path::new(closing)),
            "{top:?}: {:?}",
            r.err()
        );
    }

    // A FIFO and a directory named as backing files, and the same as the image itself.
    let fifo = d.img("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads the NUL-terminated path only.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::fs::create_dir(d.img("dir")).unwrap();
    for (name, kind) in [("fifo", "FIFO"), ("dir", "directory")] {
        let top = d.img(&format!("on-{name}.qcow2"));
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            name,
            "-F",
            "raw",
            p(&top),
            "1M",
        ]);
        let r = image::open(&top, &qcow2().read_only(true));
        assert!(
            matches!(&r, Err(ImageError::NotRegularFile { kind: k, .. }) if *k == kind),
            "{name}: {:?}",
            r.err()
        );
        let as_image = OpenOptions::new(ImageFormat::Raw).read_only(true);
        let r = image::open(&d.img(name), &as_image);
        assert!(
            matches!(&r, Err(ImageError::NotRegularFile { kind: k, .. }) if *k == kind),
            "{name} as the image: {:?}",
            r.err()
        );
    }

    // /proc/self/fd names resolve to what they point at, which lies outside the root.
    let top = d.img("proc.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/proc/self/fd/0",
        "-F",
        "raw",
        p(&top),
        "1M",
    ]);
    let r = image::open(&top, &qcow2().read_only(true));
    assert!(
        matches!(
            &r,
            Err(ImageError::BackingOutsideRoot { .. } | ImageError::BackingOpen { .. })
        ),
        "{:?}",
        r.err()
    );
    d.sentinel_untouched();
}

#[test]
fn external_data_files_open_only_when_named() {
    let d = Dirs::new();
    let data = d.outside.path().join("data.bin");
    let top = d.img("ext.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("data_file={}", p(&data)),
        p(&top),
        "1M",
    ]);
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 0 64k", p(&top)],
    );
    let before = std::fs::read(&data).unwrap();
    for ro in [true, false] {
        assert!(matches!(
            image::open(&top, &qcow2().read_only(ro)),
            Err(ImageError::DataFileRefused { name: Some(n) }) if n == data
        ));
    }
    assert_eq!(
        std::fs::read(&data).unwrap(),
        before,
        "never opened, never written"
    );
    // Named by the caller: opened with the image's own mode.
    let mut ro = image::open(&top, &qcow2().read_only(true).data_file(&data)).unwrap();
    let mut buf = [0u8; 512];
    ro.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0x5a; 512]);
    assert!(matches!(ro.write_at(&buf, 0), Err(ImageError::ReadOnly)));
    drop(ro);
    let mut rw = image::open(&top, &qcow2().data_file(&data)).unwrap();
    rw.write_at(&[0xa5; 512], 4096).unwrap();
    rw.flush().unwrap();
    drop(rw);
    ok("qemu-img", &["check", "-q", p(&top)]);
    // A data file named for an image without one.
    let plain = d.img("plain.qcow2");
    Qcow2Image::create(&plain, 1 << 20, None).unwrap();
    assert!(matches!(
        image::open(&plain, &qcow2().data_file(&data)),
        Err(ImageError::DataFileUnexpected)
    ));
}

#[test]
fn encrypted_and_unsupported_images_are_refused() {
    let d = Dirs::new();
    let luks = d.img("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=s0,data=vmkit",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=s0",
        p(&luks),
        "1M",
    ]);
    for ro in [true, false] {
        assert!(matches!(
            image::open(&luks, &qcow2().read_only(ro)),
            Err(ImageError::Encrypted { method: 2 })
        ));
    }
    // crypt_method 1 (AES), set by hand.
    let aes = d.img("aes.qcow2");
    Qcow2Image::create(&aes, 1 << 20, None).unwrap();
    patch(&aes, 32, &1u32.to_be_bytes());
    assert!(matches!(
        image::open(&aes, &qcow2()),
        Err(ImageError::Encrypted { method: 1 })
    ));
    // Extended L2 entries (incompatible bit 4) and zstd compression (bit 3).
    for (opt, bits) in [("extended_l2=on", 16), ("compression_type=zstd", 8)] {
        let img = d.img("feat.qcow2");
        let out = run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opt, p(&img), "1M"],
        );
        if !out.status.success() {
            // This qemu-img was built without the feature: nothing to open.
            eprintln!("qemu-img cannot create {opt}: row not applicable");
            continue;
        }
        assert!(matches!(
            image::open(&img, &qcow2()),
            Err(ImageError::UnsupportedFeatures { bits: b }) if b == bits
        ));
    }
}

/// Item 5 and 6 of the issue: a truncated image (a refcount block past the end of the file),
/// opened writable, would have had its header overwritten by the first allocation. The open is
/// refused, with the layout check's error where the consistency check is off, and the file is
/// byte for byte what it was, although its autoclear bits (which imago clears as it opens
/// writable) were set.
#[test]
fn a_refused_writable_open_leaves_the_file_untouched() {
    let d = Dirs::new();
    let img = d.img("trunc.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&img), "4M"]);
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 0 128k", p(&img)],
    );
    let f = std::fs::File::open(&img).unwrap();
    let mut rt = [0u8; 8];
    f.read_exact_at(&mut rt, 48).unwrap();
    let rt = u64::from_be_bytes(rt);
    drop(f);
    // Refcount table entry 0 → a block 1 GiB past the end; autoclear bit 0 (bitmaps) set.
    patch(&img, rt, &(1u64 << 30).to_be_bytes());
    patch(&img, 88, &1u64.to_be_bytes());
    let before = std::fs::read(&img).unwrap();
    assert!(matches!(
        image::open(&img, &qcow2()),
        Err(ImageError::Inconsistent(_))
    ));
    assert!(matches!(
        image::open(&img, &qcow2().check_consistency(false)),
        Err(ImageError::UnsafeLayout {
            what: "refcount block",
            ..
        })
    ));
    assert_eq!(std::fs::read(&img).unwrap(), before, "nothing written");
    // Read-only, the data is still there.
    let mut ro = image::open(&img, &qcow2().read_only(true)).unwrap();
    let mut buf = [0u8; 512];
    ro.read_at(&mut buf, 65536).unwrap();
    assert_eq!(buf, [0x5a; 512]);

    // A truncated copy: the file ends inside the L2 table.
    let cut = d.img("cut.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&cut), "4M"]);
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 0 128k", p(&cut)],
    );
    let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
    f.set_len(0x40000 + 4096).unwrap();
    drop(f);
    let before = std::fs::read(&cut).unwrap();
    let r = image::open(&cut, &qcow2().check_consistency(false));
    assert!(
        matches!(&r, Err(ImageError::UnsafeLayout { why, .. }) if why.contains("beyond")),
        "{:?}",
        r.err()
    );
    assert_eq!(std::fs::read(&cut).unwrap(), before);
}

/// A dirty image (lazy refcounts, the writer killed before it cleaned up): refused by
/// default, with the repair named; repaired and opened on request, after which qemu-img check
/// finds it clean and the data intact.
#[test]
fn dirty_images_are_refused_or_repaired() {
    let d = Dirs::new();
    let img = d.img("dirty.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        p(&img),
        "4M",
    ]);
    // `abort` kills qemu-io without closing the image: the dirty bit stays set.
    let _ = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x77 0 192k",
            "-c",
            "abort",
            p(&img),
        ],
    );
    let mut inc = [0u8; 8];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut inc, 72)
        .unwrap();
    assert_eq!(u64::from_be_bytes(inc) & 1, 1, "the image is dirty");
    for ro in [true, false] {
        let r = image::open(&img, &qcow2().read_only(ro));
        assert!(matches!(r, Err(ImageError::Dirty)));
    }
    let msg = ImageError::Dirty.to_string();
    assert!(msg.contains("DirtyPolicy::Repair") && msg.contains("qemu-img check -r all"));
    let mut rw = image::open(&img, &qcow2().dirty(DirtyPolicy::Repair)).unwrap();
    let mut buf = vec![0u8; 192 * 1024];
    rw.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x77));
    rw.write_at(&[0x11; 65536], 1 << 20).unwrap();
    rw.flush().unwrap();
    drop(rw);
    ok("qemu-img", &["check", "-q", p(&img)]);
}
