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

/// Check that `corpus/<target>/` holds each generated seed under its name, byte for byte (with
/// `VMKIT_WRITE_CORPUS=1`, write them there first), so generated seeds stay in step with the
/// harness that decodes them.
#[cfg(test)]
pub(crate) fn check_seed_files(target: &str, seeds: Vec<(String, Vec<u8>)>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target);
    for (name, data) in seeds {
        let path = dir.join(&name);
        if std::env::var_os("VMKIT_WRITE_CORPUS").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &data).unwrap();
        }
        assert_eq!(
            std::fs::read(&path).ok(),
            Some(data),
            "{name}: run with VMKIT_WRITE_CORPUS=1"
        );
    }
}

pub mod block;
pub mod emulate;
pub mod qcow2_chain;
pub mod fw_cfg;

pub mod ioapic;
pub mod paging;
pub mod pci;
pub mod vcpu;
pub mod virtio;
