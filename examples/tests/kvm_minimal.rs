//! Runs the `minimal` example VMM as a user would, on the real /dev/kvm.

mod common;

#[test]
fn kvm_minimal_guest_prints() {
    let (code, stdout) = common::run_example(env!("CARGO_BIN_EXE_minimal"), &[]);
    assert_eq!(code, Some(0), "{stdout}");
    // 21 message bytes + 1 debug-exit write, each one PIO exit; nothing else.
    let expected = "Hello from the guest\n\
                    --- guest stopped with status 0\n\
                    exit                  count\n\
                    pio-write                22\n\
                    total                    22\n";
    assert_eq!(stdout, expected);
}
