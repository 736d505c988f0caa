//! An unmodified Debian 6.12 cloud kernel booted by the `linux_boot` example on /dev/kvm, with
//! the userspace emulator taking what this software KVM rejects: the first console milestones
//! must be reached within a fixed time. The kernel is fetched at test time by
//! `scripts/fetch-linux-guest.sh` (Debian archive, never committed) into cargo's test tmpdir.

use std::path::Path;
use std::process::Command;

#[test]
fn kvm_linux_boot_reaches_its_first_milestones() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-kernel");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-linux-guest.sh");
    let fetch = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        fetch.status.success(),
        "fetching the guest kernel failed (the test needs Debian's archive): {}",
        String::from_utf8_lossy(&fetch.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_linux_boot"))
        .arg(dir.join("vmlinux"))
        .args(["--seconds", "120"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = stdout.rsplit("--- linux_boot:").next().unwrap_or("");
    eprintln!("--- linux_boot:{report}");
    // 0: it ran for its time (or the guest stopped); 1: the emulator met an instruction it
    // does not emulate (the report names it) — either way the milestones below must be there.
    assert!(matches!(out.status.code(), Some(0 | 1)), "{stdout}");
    for milestone in ["banner", "e820 map", "FPU set-up"] {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with("milestone") && l.ends_with(milestone)),
            "{milestone} not reached in 120 s:{report}"
        );
    }
    assert!(stdout.contains("Linux version 6.12"), "{stdout}");
    assert!(report.contains("emulated instructions: {"), "{report}");
}
