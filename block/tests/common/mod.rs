//! Helpers shared by the tests that call QEMU's `qemu-img`/`qemu-io` (Debian `qemu-utils`).
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Run `cmd` with `args`; panics (never skips) when it cannot be started.
pub fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} not runnable (install qemu-utils): {e}"))
}

/// Run `cmd` with `args` and require success.
pub fn ok(cmd: &str, args: &[&str]) {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A path as `&str` (temp paths are UTF-8).
pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}
