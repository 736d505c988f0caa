//! Backing chains as a VMM meets them: deep legitimate chains opened and read on a small
//! stack, chains over the depth bound refused, chains confined under a named directory, and
//! chains handed over already opened ([`BackingPolicy::Given`]).

use std::path::{Path, PathBuf};

use vmkit_block::image::{
    self, BackingLayer, BackingPolicy, DEFAULT_MAX_BACKING_DEPTH, DiskImage, FollowRules,
    ImageError, ImageFormat, OpenOptions, Qcow2Image, RawImage,
};

const SIZE: u64 = 1 << 20;

/// A chain in `dir`: `base.raw` with byte 0xb0 in sector 0, then `layers` qcow2 overlays
/// `l1.qcow2` … each writing its own index into sector `i`. Returns the top's path.
fn chain(dir: &Path, layers: usize) -> PathBuf {
    let base = dir.join("base.raw");
    let mut raw = RawImage::create(&base, SIZE).unwrap();
    raw.write_at(&[0xb0; 512], 0).unwrap();
    let mut below = ("base.raw".to_string(), ImageFormat::Raw);
    let mut top = base;
    for i in 1..=layers {
        let name = format!("l{i}.qcow2");
        top = dir.join(&name);
        Qcow2Image::create(&top, SIZE, Some((&below.0, below.1))).unwrap();
        let deep = OpenOptions::new(ImageFormat::Qcow2).backing(BackingPolicy::Follow(
            FollowRules::default().max_depth(image::MAX_BACKING_DEPTH_LIMIT),
        ));
        let mut img = Qcow2Image::open_with(&top, &deep).unwrap();
        img.write_at(&[i as u8; 512], i as u64 * 512).unwrap();
        img.flush().unwrap();
        below = (name, ImageFormat::Qcow2);
    }
    top
}

/// Every layer's sector reads back through the top.
fn reads_every_layer(img: &mut dyn DiskImage, layers: usize) {
    let mut s = [0u8; 512];
    img.read_at(&mut s, 0).unwrap();
    assert_eq!(s, [0xb0; 512]);
    for i in 1..=layers {
        img.read_at(&mut s, i as u64 * 512).unwrap();
        assert_eq!(s, [i as u8; 512], "layer {i}");
    }
}

#[test]
fn sixty_layers_open_and_read_on_a_256_kib_stack() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path(), 60);
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(move || {
            let mut img = image::open(&top, &OpenOptions::new(ImageFormat::Qcow2)).unwrap();
            reads_every_layer(&mut *img, 60);
            // A write into the top copies nothing wrong from below.
            img.write_at(&[0xee; 100], 3 * 512 + 50).unwrap();
            let mut s = [0u8; 512];
            img.read_at(&mut s, 3 * 512).unwrap();
            assert_eq!(&s[..50], &[3u8; 50][..]);
            assert_eq!(&s[50..150], &[0xee; 100][..]);
            assert_eq!(&s[150..], &[3u8; 362][..]);
            drop(img);
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn chains_deeper_than_the_bound_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path(), DEFAULT_MAX_BACKING_DEPTH + 1);
    // Below the top: 64 qcow2 layers and the raw base, one more than the default allows.
    assert!(matches!(
        image::open(&top, &OpenOptions::new(ImageFormat::Qcow2).read_only(true)),
        Err(ImageError::BackingTooDeep {
            max: DEFAULT_MAX_BACKING_DEPTH
        })
    ));
    let other = tempfile::tempdir().unwrap();
    let short = chain(other.path(), 3);
    let opts = OpenOptions::new(ImageFormat::Qcow2)
        .read_only(true)
        .backing(BackingPolicy::Follow(FollowRules::default().max_depth(2)));
    assert!(matches!(
        image::open(&short, &opts),
        Err(ImageError::BackingTooDeep { max: 2 })
    ));
    let opts = OpenOptions::new(ImageFormat::Qcow2)
        .read_only(true)
        .backing(BackingPolicy::Follow(FollowRules::default().max_depth(3)));
    reads_every_layer(&mut *image::open(&short, &opts).unwrap(), 3);
}

#[test]
fn confinement_under_a_named_directory() {
    let root = tempfile::tempdir().unwrap();
    let base_dir = root.path().join("base");
    let vm_dir = root.path().join("vm");
    std::fs::create_dir_all(&base_dir).unwrap();
    std::fs::create_dir_all(&vm_dir).unwrap();
    let base = base_dir.join("base.raw");
    let mut raw = RawImage::create(&base, SIZE).unwrap();
    raw.write_at(&[0xb0; 512], 0).unwrap();
    let top = vm_dir.join("top.qcow2");
    Qcow2Image::create(&top, SIZE, Some(("../base/base.raw", ImageFormat::Raw))).unwrap();
    let qcow2 = OpenOptions::new(ImageFormat::Qcow2).read_only(true);
    // Default: confined to vm/, so ../base is outside.
    assert!(matches!(
        image::open(&top, &qcow2),
        Err(ImageError::BackingOutsideRoot { .. })
    ));
    // Confined to the root: allowed.
    let rooted = OpenOptions::new(ImageFormat::Qcow2)
        .read_only(true)
        .backing(BackingPolicy::Follow(
            FollowRules::default().confine_to(root.path()),
        ));
    let mut img = image::open(&top, &rooted).unwrap();
    let mut s = [0u8; 512];
    img.read_at(&mut s, 0).unwrap();
    assert_eq!(s, [0xb0; 512]);
    // A symlink inside the root that leads out of it is resolved first, and refused.
    let elsewhere = tempfile::tempdir().unwrap();
    let secret = elsewhere.path().join("secret.raw");
    RawImage::create(&secret, SIZE).unwrap();
    std::os::unix::fs::symlink(&secret, vm_dir.join("link.raw")).unwrap();
    let linked = vm_dir.join("linked.qcow2");
    Qcow2Image::create(&linked, SIZE, Some(("link.raw", ImageFormat::Raw))).unwrap();
    assert!(matches!(
        image::open(&linked, &rooted),
        Err(ImageError::BackingOutsideRoot { name, .. }) if name == Path::new("link.raw")
    ));
}

#[test]
fn layers_handed_over_open_no_name() {
    let dir = tempfile::tempdir().unwrap();
    let top = chain(dir.path(), 2);
    // Rename the files: the names in the headers now lead nowhere.
    let moved = tempfile::tempdir().unwrap();
    let mv = |name: &str| {
        let to = moved.path().join(format!("moved-{name}"));
        std::fs::rename(dir.path().join(name), &to).unwrap();
        to
    };
    let (l1, base) = (mv("l1.qcow2"), mv("base.raw"));
    let layer = |p: &Path, f| BackingLayer::new(std::fs::File::open(p).unwrap(), f);
    let given = |layers| {
        OpenOptions::new(ImageFormat::Qcow2)
            .read_only(true)
            .backing(BackingPolicy::Given(layers))
    };
    let ok = given(vec![
        layer(&l1, ImageFormat::Qcow2),
        layer(&base, ImageFormat::Raw),
    ]);
    reads_every_layer(&mut *image::open(&top, &ok).unwrap(), 2);
    assert!(matches!(
        image::open(&top, &given(vec![layer(&l1, ImageFormat::Qcow2)])),
        Err(ImageError::BackingLayerMissing { name }) if name == Path::new("base.raw")
    ));
    assert!(matches!(
        image::open(
            &top,
            &given(vec![
                layer(&l1, ImageFormat::Qcow2),
                layer(&base, ImageFormat::Raw),
                layer(&base, ImageFormat::Raw),
            ])
        ),
        Err(ImageError::BackingLayersUnused { given: 3, used: 2 })
    ));
    assert!(matches!(
        image::open(&top, &given(vec![layer(&l1, ImageFormat::Raw)])),
        Err(ImageError::BackingFormatMismatch {
            given: ImageFormat::Raw,
            ..
        })
    ));
    // Following names instead fails: they are gone.
    assert!(matches!(
        image::open(&top, &OpenOptions::new(ImageFormat::Qcow2).read_only(true)),
        Err(ImageError::BackingOpen { .. })
    ));
}
