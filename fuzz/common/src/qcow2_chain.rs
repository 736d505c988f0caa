//! Fuzz backing chains: the `qcow2_image` target's inputs that start with `CHAIN` hold 2–3
//! images, written as `vm/l0.qcow2`, `vm/l1.qcow2`, `vm/l2.qcow2` under a confinement root
//! that also holds `outside/secret` beside it (outside the root). The top is opened with the
//! backing chain confined to `vm/`, formats as recorded (else qcow2), then read and, opened
//! writable, written. The backing names are whatever the fuzzer put in the headers.
//!
//! Invariant: no file outside the root is ever opened. An inotify watch on `outside/` sees
//! every open of a file there, also one closed again at once (an open that fails later); while
//! the image is open, no file descriptor the open added names a file of the sandbox outside
//! the root (`/proc/self/fd`); and the secret stays as written.
//!
//! Input: `CHAIN`, `n: u8` (2 or 3 images, from `n % 2 + 2`), `n - 1` little-endian `u32`
//! lengths of the first images, then the images' bytes (the last takes the rest).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vmkit_block::image::{self, BackingPolicy, DiskImage, FollowRules, ImageFormat, OpenOptions};

/// What starts a chain input.
pub const CHAIN_MAGIC: &[u8] = b"CHAIN";

const SECRET: &[u8] = b"outside the root";

/// `(root, vm dir, secret, inotify fd watching outside/ for opens)`, made once per process.
fn dirs() -> &'static (PathBuf, PathBuf, PathBuf, i32) {
    static DIRS: OnceLock<(PathBuf, PathBuf, PathBuf, i32)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("vmkit-fuzz-chain-{}", std::process::id()));
        let root = base.join("root");
        let vm = root.join("vm");
        std::fs::create_dir_all(&vm).expect("fuzz dir");
        let outside = base.join("outside");
        std::fs::create_dir_all(&outside).expect("fuzz dir");
        let secret = outside.join("secret");
        std::fs::write(&secret, SECRET.repeat(64)).expect("secret");
        let root = root.canonicalize().expect("root");
        // SAFETY: plain system calls; the path is a NUL-terminated copy that outlives the call.
        let watch = unsafe {
            let fd = libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC);
            let dir = std::ffi::CString::new(outside.to_string_lossy().as_bytes()).expect("path");
            assert!(fd >= 0 && libc::inotify_add_watch(fd, dir.as_ptr(), libc::IN_OPEN) >= 0);
            fd
        };
        (root.clone(), root.join("vm"), secret, watch)
    })
}

/// Whether anything under `outside/` was opened since the last call.
fn outside_opened(watch: i32) -> bool {
    let mut buf = [0u8; 4096];
    let mut any = false;
    loop {
        // SAFETY: reads into a buffer this function owns, of its length.
        let n = unsafe { libc::read(watch, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return any;
        }
        any = true;
    }
}

/// The open file descriptors of this process and what they refer to.
fn fds() -> Vec<(String, Option<PathBuf>)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read_link(e.path()).ok())
        })
        .collect()
}

/// Every descriptor not in `before` that names a file of this run's sandbox (the directory
/// holding `root` and `outside/`) refers to one under `root`. Files elsewhere are not judged
/// here: the seed replay runs beside other tests in the same process, whose descriptors come
/// and go; under libFuzzer (one thread) nothing else opens files, and the open path refuses
/// names outside the root before it opens them (tests/hostile_images.rs checks the error).
fn only_root_files_opened(before: &HashSet<String>, root: &Path) {
    let Some(sandbox) = root.parent() else { return };
    for (fd, target) in fds() {
        if before.contains(&fd) {
            continue;
        }
        if let Some(t) = target
            && t.starts_with(sandbox)
            && !t.starts_with(root)
        {
            panic!("fd {fd} opened {t:?}, outside {root:?}");
        }
    }
}

/// Split a chain input into its images.
fn images(data: &[u8]) -> Option<Vec<&[u8]>> {
    let rest = data.strip_prefix(CHAIN_MAGIC)?;
    let (&n, mut rest) = rest.split_first()?;
    let n = usize::from(n % 2 + 2);
    let mut lens = Vec::new();
    for _ in 1..n {
        let (l, r) = rest.split_at_checked(4)?;
        lens.push(u32::from_le_bytes(l.try_into().ok()?) as usize);
        rest = r;
    }
    let mut out = Vec::new();
    for l in lens {
        let (img, r) = rest.split_at_checked(l.min(rest.len()))?;
        out.push(img);
        rest = r;
    }
    out.push(rest);
    Some(out)
}

/// One fuzz iteration over a chain input (see the module docs); other inputs are ignored.
pub fn run(data: &[u8]) {
    let Some(imgs) = images(data) else { return };
    let (root, vm, secret, watch) = dirs();
    let _ = outside_opened(*watch);
    for i in 0..3 {
        let _ = std::fs::remove_file(vm.join(format!("l{i}.qcow2")));
    }
    for (i, img) in imgs.iter().enumerate() {
        if std::fs::write(vm.join(format!("l{i}.qcow2")), img).is_err() {
            return;
        }
    }
    let top = vm.join("l0.qcow2");
    let rules = FollowRules::default()
        .confine_to(vm)
        .max_depth(4)
        .assume_format(Some(ImageFormat::Qcow2));
    for read_only in [true, false] {
        let before: HashSet<String> = fds().into_iter().map(|(fd, _)| fd).collect();
        let opts = OpenOptions::new(ImageFormat::Qcow2)
            .read_only(read_only)
            .backing(BackingPolicy::Follow(rules.clone()))
            .check_consistency(false);
        if let Ok(mut img) = image::open(&top, &opts) {
            only_root_files_opened(&before, root);
            let size = img.size();
            let mut buf = vec![0u8; 4096];
            for off in [0, size / 2, size.saturating_sub(4096)] {
                let n = (size - off.min(size)).min(4096) as usize;
                let _ = img.read_at(&mut buf[..n], off);
            }
            if !read_only && size >= 4096 {
                let _ = img.write_at(&[0xa5; 4096], (size / 3) & !511);
                let _ = img.flush();
            }
        }
    }
    assert!(
        !outside_opened(*watch),
        "a file outside the root was opened"
    );
    assert_eq!(std::fs::read(secret).ok(), Some(SECRET.repeat(64)));
    let _ = outside_opened(*watch); // the read just above
}

/// A layer for the seeds: a tiny consistent version 3 image (512-byte clusters, as
/// `block::qcow2_seed` lays them out) naming `backing` as a qcow2 backing file.
fn layer(backing: Option<&str>) -> Vec<u8> {
    let mut b = crate::block::qcow2_seed_layer();
    if let Some(name) = backing {
        // Backing-format extension at the end of the 104-byte header, then the end marker,
        // then the name (qcow2 specification, "Header extensions").
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(104, &0xe279_2acau32.to_be_bytes());
        put(108, &5u32.to_be_bytes());
        put(112, b"qcow2");
        put(120, &[0; 8]);
        put(128, name.as_bytes());
        put(8, &128u64.to_be_bytes());
        put(16, &(name.len() as u32).to_be_bytes());
    }
    b
}

/// A chain input of `layers`.
fn input(layers: &[Vec<u8>]) -> Vec<u8> {
    let mut out = CHAIN_MAGIC.to_vec();
    out.push((layers.len() - 2) as u8);
    for l in &layers[..layers.len() - 1] {
        out.extend_from_slice(&(l.len() as u32).to_le_bytes());
    }
    for l in layers {
        out.extend_from_slice(l);
    }
    out
}

/// Generated seeds: a good chain of three, a loop, an escape with `..`, an absolute name.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    vec![
        (
            "chain_good".into(),
            input(&[
                layer(Some("l1.qcow2")),
                layer(Some("l2.qcow2")),
                layer(None),
            ]),
        ),
        (
            "chain_loop".into(),
            input(&[layer(Some("l1.qcow2")), layer(Some("l0.qcow2"))]),
        ),
        (
            "chain_escape".into(),
            input(&[layer(Some("../../outside/secret")), layer(None)]),
        ),
        (
            "chain_absolute".into(),
            input(&[layer(Some("/etc/passwd")), layer(None)]),
        ),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn chain_seeds_are_in_the_corpus_and_behave() {
        crate::check_seed_files("qcow2_image", super::seeds());
        for (_, s) in super::seeds() {
            super::run(&s);
        }
        // The good chain opens and reads through all three layers.
        let (_, vm, _, _) = super::dirs();
        let (_, good) = &super::seeds()[0];
        super::run(good);
        let opts = vmkit_block::image::OpenOptions::new(vmkit_block::image::ImageFormat::Qcow2)
            .read_only(true);
        assert!(vmkit_block::image::open(&vm.join("l0.qcow2"), &opts).is_ok());
    }
}
