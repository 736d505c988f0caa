//! Runs the `minimal` example VMM as a user would, on the real /dev/kvm.

use std::process::Command;

#[test]
fn kvm_minimal_guest_prints() {
    let out = Command::new(env!("CARGO_BIN_EXE_minimal"))
        .output()
        .expect("spawn minimal");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    // 21 message bytes + 1 debug-exit write, each one PIO exit; nothing else.
    let expected = "Hello from the guest\n\
                    --- guest stopped with status 0\n\
                    exit                  count\n\
                    pio-write                22\n\
                    total                    22\n";
    assert_eq!(stdout, expected);
}
