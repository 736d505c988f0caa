//! Guest errors every device answers the same way, because vmkit-virtio's queue pass
//! (`vmkit_virtio::queue_pass`) decides them once: virtio-rng and virtio-blk side by side.

use vmkit_block::config::BlockConfig;
use vmkit_block::defs::VIRTIO_F_VERSION_1;
use vmkit_block::test_utils::TempImages;
use vmkit_block::{Block, EngineKind};
use vmkit_virtio::rng::Rng;
use vmkit_virtio::spec::STATUS_NEEDS_RESET;
use vmkit_virtio::test_utils::DriverHarness;
use vmkit_virtio::{DeviceError, VirtioDevice};

/// Post a head index far outside the descriptor table and kick: the ring is corrupt.
fn post_bad_head<D: VirtioDevice>(mut h: DriverHarness<D>, name: &str) {
    h.activate(1 << VIRTIO_F_VERSION_1).unwrap();
    h.publish(0, 1000).unwrap();
    h.kick(0);
    let core = h.transport().core();
    assert_eq!(
        core.status() & STATUS_NEEDS_RESET,
        STATUS_NEEDS_RESET,
        "{name}: DEVICE_NEEDS_RESET"
    );
    assert_eq!(core.corrupt_rings(), 1, "{name}: counted once");
    assert_eq!(core.metrics().device_errors, 1, "{name}");
    assert!(
        matches!(
            core.last_device_error(),
            Some(DeviceError::Queue {
                index: 0,
                source: virtio_queue::Error::InvalidDescriptorIndex
            })
        ),
        "{name}: {:?}",
        core.last_device_error()
    );
    assert!(h.used(0).is_empty(), "{name}: nothing returned");
}

#[test]
fn corrupt_ring_needs_reset_for_every_device() {
    post_bad_head(DriverHarness::new(Rng::default()), "rng");
    let dir = TempImages::new(true).unwrap();
    for (name, engine) in [
        ("blk sync", EngineKind::Sync),
        ("blk io_uring", EngineKind::IoUring { depth: 8 }),
    ] {
        let cfg = BlockConfig {
            engine,
            ..BlockConfig::default()
        };
        let disk = Box::new(dir.raw(&format!("{name}.raw"), 1 << 20).unwrap());
        post_bad_head(DriverHarness::new(Block::new(disk, cfg).unwrap()), name);
    }
}
