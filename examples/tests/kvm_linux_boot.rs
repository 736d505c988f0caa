//! An unmodified Debian 6.12 cloud kernel booted by the `linux_boot` example on /dev/kvm, with
//! the userspace emulator taking what this software KVM rejects: the first console milestones
//! must be reached within a fixed time. The kernel is fetched at test time by
//! `scripts/fetch-linux-guest.sh` (Debian archive, never committed) into cargo's test tmpdir.

use std::path::Path;
use std::process::Command;

/// The guest kernel's directory, fetched once (the script does nothing when it is there).
fn guest_kernel() -> std::path::PathBuf {
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
    dir
}

/// The Debian bzImage through vmkit-memory's `boot::load_bzimage` (linux-loader): the setup
/// header is the boot protocol's ("HdrS", version 2.12 or later), and the protected-mode
/// payload lies in guest memory at the load address, byte for byte.
#[test]
fn linux_bzimage_loads_through_the_boot_module() {
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    let dir = guest_kernel();
    let image = std::fs::read(dir.join("vmlinuz")).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 128 << 20)]).unwrap();
    let mut f = std::fs::File::open(dir.join("vmlinuz")).unwrap();
    let k = vmkit_memory::boot::load_bzimage(&mem, 0x10_0000, &mut f).unwrap();
    let hdr = k.setup_header.unwrap();
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert!({ hdr.version } >= 0x020c, "boot protocol {:#x}", {
        hdr.version
    });
    assert_eq!((k.load_addr, k.entry), (0x10_0000, 0x10_0200));
    // (setup_sects + 1) · 512 bytes of real-mode code precede the payload in the file.
    let setup_sects = hdr.setup_sects;
    let setup = (usize::from(setup_sects).max(4) + 1) * 512;
    let mut first = vec![0u8; 4096];
    mem.read_slice(&mut first, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(&first[..], &image[setup..setup + 4096]);
}

#[test]
fn kvm_linux_boot_reaches_its_first_milestones() {
    let dir = guest_kernel();
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
