//! Runs the `virtio_rng` example VMM as a user would, on the real /dev/kvm.

mod common;

#[test]
fn kvm_virtio_rng_guest_prints_random_bytes() {
    let (code, stdout) = common::run_example(env!("CARGO_BIN_EXE_virtio_rng"), &[]);
    assert_eq!(code, Some(0), "{stdout}");
    // The 16 random bytes differ from run to run: check their shape, then the rest exactly.
    let prefix = "guest: virtio-rng at 00:04.0\nguest: interrupt received; random bytes:";
    let rest = stdout.strip_prefix(prefix).expect(&stdout);
    let (bytes, rest) = rest.split_once('\n').expect(&stdout);
    assert_eq!(bytes.len(), 16 * 3, "{stdout}");
    for b in bytes.as_bytes().chunks(3) {
        assert_eq!(b[0], b' ');
        assert!(
            b[1..]
                .iter()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }
    // Exits: one PIO write per console byte (118), 5 PCI address writes scanning devices
    // 0..4, 8 for the 4 configuration writes, the debug exit; 5 PCI data reads; MMIO writes:
    // the MSI-X entry (4) and the common configuration (4 status, 2 feature, 10 queue).
    let expected = "--- guest stopped with status 0\n\
        transport: TransportMetrics { illegal_status_writes: 0, features_refused: 0, \
        late_feature_writes: 0, bad_queue_writes: 0, queue_size_refused: 0, \
        queue_address_refused: 0, bad_notifies: 0, notifies: 1, trapped_notifies: 0, \
        bad_register_accesses: 0, activation_failures: 0, device_errors: 0, resets: 0 }\n\
        device:    RngMetrics { requests: 1, bytes: 16, bad_descriptors: 0, source_errors: 0 }\n\
        msi-x:     MsixStats { delivered: 1, pended: 0, dropped: 0, bad_accesses: 0, \
        delivery_errors: 0 }\n\
        exit                  count\n\
        pio-read                  5\n\
        pio-write               132\n\
        mmio-write               20\n\
        total                   157\n";
    assert_eq!(rest, expected);
}
