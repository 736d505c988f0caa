//! Fuzz logic shared by vmkit's cargo-fuzz targets.
//!
//! Each module exposes `fn run(data: &[u8])` that a target in `fuzz_targets/` calls; the tests in
//! this crate run every file of `corpus/<target>/` through it, so CI replays the seeds on stable
//! Rust without libFuzzer.

/// Every file of `corpus/<target>/` (relative to the fuzz workspace).
pub fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target);
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            if let Ok(bytes) = std::fs::read(e.path()) {
                out.push(bytes);
            }
        }
    }
    out
}

pub mod block;

pub mod ioapic;
pub mod paging;
pub mod pci;
pub mod vcpu;
pub mod virtio;
