//! Shared by the tests that run the example binaries.

use std::process::Command;

/// Run the example binary at `bin` with `args` as a user would: its exit code and stdout.
/// Panics (showing both streams) if it wrote anything on stderr.
pub fn run_example(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    (out.status.code(), stdout)
}
