//! Unit tests of the shared core and the mmio transport, driven through the harness.

use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmkit_devices::MutBusDevice;

use crate::mmio::{MmioError, MmioRegister};
use crate::rng::{EntropySource, Rng};
use crate::spec::*;
use crate::test_utils::{Desc, DriverHarness, HarnessError};
use crate::{Activation, DeviceError, TransportMetrics, VirtioDevice};

const V1: u64 = 1 << VIRTIO_F_VERSION_1;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const A: u8 = STATUS_ACKNOWLEDGE;
const D: u8 = STATUS_DRIVER;
const F: u8 = STATUS_FEATURES_OK;
const OK: u8 = STATUS_DRIVER_OK;

/// What the dummy device saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Seen {
    activations: u32,
    resets: u32,
    notifies: Vec<u16>,
    acked: u64,
    event_idx: Vec<bool>,
}

/// A counting dummy device: two queues (max 8 and 4), a 8-byte config, optional failures.
struct Dummy {
    seen: Arc<Mutex<Seen>>,
    config: [u8; 8],
    fail_activate: bool,
    fail_notify: bool,
}

impl Dummy {
    fn new() -> (Self, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let d = Self {
            seen: seen.clone(),
            config: *b"dummycfg",
            fail_activate: false,
            fail_notify: false,
        };
        (d, seen)
    }
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        0x2a
    }
    fn device_features(&self) -> u64 {
        V1 | EVENT_IDX | 1 << 3
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[8, 4]
    }
    fn config_space(&self) -> &[u8] {
        &self.config
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if let Some(dst) = self
            .config
            .get_mut(offset as usize..offset as usize + data.len())
        {
            dst.copy_from_slice(data);
        }
    }
    fn activate(&mut self, a: Activation) -> Result<(), DeviceError> {
        let mut s = self.seen.lock().unwrap();
        s.activations += 1;
        s.acked = a.acked_features;
        s.event_idx = a
            .queues
            .iter()
            .map(|q| {
                use virtio_queue::QueueT;
                q.event_idx_enabled()
            })
            .collect();
        if self.fail_activate {
            return Err(DeviceError::Activate("told to".into()));
        }
        Ok(())
    }
    fn queue_notify(&mut self, queue: u16) -> Result<(), DeviceError> {
        self.seen.lock().unwrap().notifies.push(queue);
        if self.fail_notify {
            let cause = std::io::Error::new(std::io::ErrorKind::StorageFull, "told to");
            return Err(DeviceError::Backend(Box::new(cause)));
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.seen.lock().unwrap().resets += 1;
    }
}

fn dummy() -> (DriverHarness<Dummy>, Arc<Mutex<Seen>>) {
    let (d, seen) = Dummy::new();
    (DriverHarness::new(d), seen)
}

#[test]
fn legal_status_sequence_activates_once() {
    let (mut h, seen) = dummy();
    assert_eq!(h.activate(V1 | EVENT_IDX).unwrap(), V1 | EVENT_IDX);
    assert_eq!(h.status(), A | D | F | OK);
    let s = seen.lock().unwrap().clone();
    assert_eq!(s.activations, 1);
    assert_eq!(s.acked, V1 | EVENT_IDX);
    assert_eq!(s.event_idx, [true, true]);
    assert!(h.transport().core().is_activated());
    // FAILED may be added at any time; writing 0 resets.
    h.set_status(A | D | F | OK | STATUS_FAILED);
    assert_eq!(h.status(), A | D | F | OK | STATUS_FAILED);
    h.set_status(0);
    assert_eq!(h.status(), 0);
    assert!(!h.transport().core().is_activated());
    assert!(seen.lock().unwrap().resets >= 1);
    assert_eq!(h.transport().metrics().illegal_status_writes, 0);
}

#[test]
fn illegal_status_transitions_are_ignored_and_counted() {
    // (status before, write, status after)
    let table: &[(u8, u8, u8)] = &[
        (0, D, 0),                                  // DRIVER before ACKNOWLEDGE
        (0, A | F, 0),                              // FEATURES_OK before DRIVER
        (A, A | OK, A),                             // DRIVER_OK before FEATURES_OK
        (A | D, A | D | OK, A | D),                 // DRIVER_OK before FEATURES_OK
        (A | D, A, A | D),                          // clearing a bit
        (A | D, STATUS_NEEDS_RESET | A | D, A | D), // device-only bit
        (A | D, A | D | 0x10, A | D),               // reserved bit
        (
            A | D | STATUS_FAILED,
            A | D | STATUS_FAILED | F,
            A | D | STATUS_FAILED,
        ), // after FAILED
    ];
    for (i, &(before, write, after)) in table.iter().enumerate() {
        let (mut h, seen) = dummy();
        h.write_driver_features(0);
        // Reach `before` legally, one bit at a time.
        let mut s = 0u8;
        for bit in [A, D, STATUS_FAILED] {
            if before & bit != 0 {
                s |= bit;
                h.set_status(s);
            }
        }
        if before & D != 0 {
            h.write_driver_features(V1);
        }
        assert_eq!(h.status(), before, "row {i}: setup");
        let m0 = h.transport().metrics().illegal_status_writes;
        h.set_status(write);
        assert_eq!(h.status(), after, "row {i}");
        assert_eq!(
            h.transport().metrics().illegal_status_writes,
            m0 + 1,
            "row {i}"
        );
        assert_eq!(seen.lock().unwrap().activations, 0, "row {i}");
    }
}

#[test]
fn features_ok_refuses_unoffered_features() {
    // (features the driver writes, accepted?)
    let table: &[(u64, bool)] = &[
        (V1, true),
        (V1 | EVENT_IDX | 1 << 3, true),
        (V1 | 1 << 4, false),  // not offered
        (V1 | 1 << 63, false), // not offered
        (EVENT_IDX, false),    // no VERSION_1: modern transports require it
        (0, false),
    ];
    for &(features, ok) in table {
        let (mut h, _) = dummy();
        let r = h.negotiate_features(features, true);
        assert_eq!(r.is_ok(), ok, "{features:#x}");
        assert_eq!(h.transport().metrics().features_refused, !ok as u64);
        if !ok {
            assert_eq!(r, Err(HarnessError::FeaturesRefused(features)));
            assert_eq!(h.status(), A | D);
            // And DRIVER_OK cannot follow.
            h.set_status(A | D | F | OK);
            assert_eq!(h.status() & OK, 0);
        }
    }
    // Feature bits beyond 63 (select 2) are never offered.
    let (mut h, _) = dummy();
    h.set_status(A);
    h.set_status(A | D);
    h.write_driver_features(V1);
    h.write32(0x24, 2);
    h.write32(0x20, 1);
    h.set_status(A | D | F);
    assert_eq!(h.status(), A | D);
}

#[test]
fn driver_features_are_frozen_outside_the_window() {
    let (mut h, seen) = dummy();
    h.write_driver_features(V1); // before DRIVER: ignored (two writes)
    assert_eq!(h.transport().metrics().late_feature_writes, 2);
    h.activate(V1).unwrap();
    h.write_driver_features(V1 | EVENT_IDX); // after FEATURES_OK: ignored
    assert_eq!(h.transport().metrics().late_feature_writes, 4);
    assert_eq!(h.transport().core().acked_features(), V1);
    assert_eq!(seen.lock().unwrap().event_idx, [false, false]);
}

#[test]
fn queue_size_must_be_a_power_of_two_within_max() {
    let (mut h, _) = dummy();
    h.negotiate_features(V1, false).unwrap();
    h.write32(0x30, 0);
    assert_eq!(h.read32(0x34), 8);
    for (size, accepted) in [
        (0, false),
        (3, false),
        (6, false),
        (16, false),
        (0x1_0000, false),
        (1, true),
        (4, true),
        (8, true),
    ] {
        h.write32(0x38, 2); // known state
        let m0 = h.transport().metrics().queue_size_refused;
        h.write32(0x38, size);
        let now = h.transport().core().queue_size();
        if accepted {
            assert_eq!(now as u32, size);
        } else {
            assert_eq!(now, 2, "{size}");
            assert_eq!(h.transport().metrics().queue_size_refused, m0 + 1, "{size}");
        }
    }
    // A missing queue reads max 0 and ignores writes.
    h.write32(0x30, 7);
    assert_eq!(h.read32(0x34), 0);
    let b0 = h.transport().metrics().bad_queue_writes;
    h.write32(0x38, 4);
    assert_eq!(h.transport().metrics().bad_queue_writes, b0 + 1);
    // Misaligned ring addresses are refused.
    h.write32(0x30, 0);
    h.write32(0x80, 0x1001);
    assert_eq!(h.transport().metrics().queue_address_refused, 1);
}

#[test]
fn queue_writes_before_features_ok_or_after_driver_ok_are_ignored() {
    let (mut h, _) = dummy();
    h.write32(0x38, 4);
    assert_eq!(h.transport().metrics().bad_queue_writes, 1);
    h.activate(V1).unwrap();
    h.write32(0x30, 0);
    h.write32(0x38, 2);
    h.write32(0x44, 0);
    assert_eq!(h.transport().metrics().bad_queue_writes, 3);
    assert_eq!(h.transport().core().queue_size(), 8);
    assert_eq!(h.read32(0x44), 1);
}

/// A wake-up (the device's own event) runs the queue like a notification but is not counted as
/// one, and is ignored without counting before activation and for a missing queue.
#[test]
fn wake_ups_run_queues_without_counting_notifications() {
    let (mut h, seen) = dummy();
    h.transport_mut().wake_queue(0); // before DRIVER_OK
    h.activate(V1).unwrap();
    h.transport_mut().wake_queue(1);
    h.transport_mut().wake_queue(2); // no such queue
    h.kick(0);
    assert_eq!(seen.lock().unwrap().notifies, [1, 0]);
    let m = h.transport().metrics();
    assert_eq!((m.notifies, m.bad_notifies), (1, 0));
}

#[test]
fn notify_semantics() {
    let (mut h, seen) = dummy();
    h.kick(0); // before DRIVER_OK
    h.activate(V1).unwrap();
    h.kick(1);
    h.kick(0);
    h.kick(2); // no such queue
    h.write32(0x50, 0x1_0000); // out of range value
    assert_eq!(seen.lock().unwrap().notifies, [1, 0]);
    let m = h.transport().metrics();
    assert_eq!((m.notifies, m.bad_notifies), (2, 3));
    // A device error sets DEVICE_NEEDS_RESET, signals a config change, and stops notifies.
    h.device_mut().fail_notify = true;
    h.kick(0);
    assert_eq!(h.status() & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
    assert_eq!(
        h.ack_interrupts() & VIRTIO_MMIO_INT_CONFIG,
        VIRTIO_MMIO_INT_CONFIG
    );
    h.kick(0);
    assert_eq!(seen.lock().unwrap().notifies, [1, 0, 0]);
    assert_eq!(h.transport().metrics().device_errors, 1);
    // Reset clears it; the device can be brought up again.
    h.device_mut().fail_notify = false;
    h.activate(V1).unwrap();
    h.kick(0);
    assert_eq!(seen.lock().unwrap().notifies, [1, 0, 0, 0]);
}

/// A device error reaches the transport whole: the boxed cause stays a `source()` that a VMM
/// can downcast, and the last one is readable from the core after `DEVICE_NEEDS_RESET`.
#[test]
fn device_errors_keep_their_source() {
    use std::error::Error as _;
    let (mut h, _) = dummy();
    h.activate(V1).unwrap();
    assert!(h.transport().core().last_device_error().is_none());
    h.device_mut().fail_notify = true;
    h.kick(0);
    let err = h.transport().core().last_device_error().unwrap();
    assert!(matches!(err, DeviceError::Backend(_)));
    let cause = err
        .source()
        .unwrap()
        .downcast_ref::<std::io::Error>()
        .unwrap();
    assert_eq!(cause.kind(), std::io::ErrorKind::StorageFull);
    assert_eq!(
        err.to_string(),
        "backend failed",
        "the cause is not repeated in the text"
    );
    // Kept across the driver's reset; taking it empties the slot.
    h.set_status(0);
    assert!(
        h.transport_mut()
            .core_mut()
            .take_last_device_error()
            .is_some()
    );
    assert!(h.transport().core().last_device_error().is_none());
    // An activation failure is kept the same way.
    h.device_mut().fail_activate = true;
    assert!(h.activate(V1).is_err());
    let err = h.transport().core().last_device_error().unwrap();
    assert!(matches!(err, DeviceError::Activate(_)));
    assert_eq!(err.source().unwrap().to_string(), "told to");
}

#[test]
fn activation_failure_sets_needs_reset() {
    let (mut h, _) = dummy();
    h.device_mut().fail_activate = true;
    assert_eq!(
        h.activate(V1),
        Err(HarnessError::NotActivated(
            A | D | F | OK | STATUS_NEEDS_RESET
        ))
    );
    assert_eq!(h.transport().metrics().activation_failures, 1);
    assert!(!h.transport().core().is_activated());
}

#[test]
fn config_generation_changes_only_when_the_device_changes_config() {
    let (mut h, _) = dummy();
    let g0 = h.read32(0xfc);
    assert_eq!(h.read_config(0, 8), b"dummycfg");
    assert_eq!(h.read_config(6, 4), [b'f', b'g', 0, 0]); // beyond the space: 0
    h.write_config(0, b"D");
    assert_eq!(h.read_config(0, 2), b"Du");
    assert_eq!(
        h.read32(0xfc),
        g0,
        "driver accesses do not change the generation"
    );
    h.transport_mut().core_mut().config_changed();
    assert_eq!(h.read32(0xfc), g0.wrapping_add(1));
    assert_eq!(h.ack_interrupts(), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(h.read32(0x60), 0);
    assert_eq!(h.interrupts(), 1);
}

#[test]
fn mmio_identity_registers() {
    let (mut h, _) = dummy();
    assert_eq!(h.read32(0x0), VIRTIO_MMIO_MAGIC);
    assert_eq!(h.read32(0x4), 2);
    assert_eq!(h.read32(0x8), 0x2a);
    assert_eq!(h.device_features(), V1 | EVENT_IDX | 1 << 3);
    h.write32(0x14, 5);
    assert_eq!(h.read32(0x10), 0);
    assert_eq!(h.read32(0xb0), u32::MAX); // no shared memory
}

#[test]
fn mmio_decode_table() {
    use MmioRegister::*;
    let table: &[(u64, usize, Result<MmioRegister, MmioError>)] = &[
        (0x000, 4, Ok(MagicValue)),
        (0x050, 4, Ok(QueueNotify)),
        (0x0fc, 4, Ok(ConfigGeneration)),
        (0x100, 1, Ok(Config(0))),
        (0x1ff, 2, Ok(Config(0xff))),
        (0xffc, 4, Ok(Config(0xefc))),
        (0xffe, 4, Err(MmioError::Offset(0xffe))),
        (0x000, 2, Err(MmioError::Width { offset: 0, len: 2 })),
        (0x002, 4, Err(MmioError::Width { offset: 2, len: 4 })),
        (0x018, 4, Err(MmioError::Offset(0x18))),
        (0x0c4, 4, Err(MmioError::Offset(0xc4))),
        (u64::MAX, 4, Err(MmioError::Offset(u64::MAX))),
    ];
    for (off, len, want) in table {
        assert_eq!(MmioRegister::decode(*off, *len), *want, "{off:#x}/{len}");
    }
}

#[test]
fn bad_register_accesses_are_counted_and_read_zero() {
    let (mut h, _) = dummy();
    let t = h.transport_mut();
    let mut b = [0xffu8; 2];
    t.read(0x0, &mut b);
    assert_eq!(b, [0, 0]);
    t.write(0x70, &[1]);
    let mut b4 = [0xffu8; 4];
    t.read(0x18, &mut b4);
    assert_eq!(b4, [0; 4]);
    t.write(0x10, &[1, 0, 0, 0]); // read-only register
    assert_eq!(t.metrics().bad_register_accesses, 4);
    assert_eq!(t.core().status(), 0);
}

/// Deterministic entropy for tests.
struct Counter(u8);
impl EntropySource for Counter {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        for b in buf {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
        Ok(())
    }
}

#[test]
fn rng_returns_buffers_with_the_written_length() {
    let mut h = DriverHarness::new(Rng::new(Counter(0)));
    h.activate(V1).unwrap();
    let a = h.add_chain(0, &[Desc::Writable(5)]).unwrap();
    let b = h
        .add_chain(0, &[Desc::Writable(3), Desc::Writable(2)])
        .unwrap();
    h.kick(0);
    assert_eq!(h.used(0), [(a.head, 5), (b.head, 5)]);
    assert_eq!(h.read_buffer(&a.buffers[0]), [1, 2, 3, 4, 5]);
    assert_eq!(h.read_buffer(&b.buffers[0]), [6, 7, 8]);
    assert_eq!(h.read_buffer(&b.buffers[1]), [9, 10]);
    assert_eq!(h.interrupts(), 1);
    assert_eq!(h.ack_interrupts(), VIRTIO_MMIO_INT_VRING);
    let m = h.device().metrics();
    assert_eq!((m.requests, m.bytes, m.bad_descriptors), (2, 10, 0));
}

#[test]
fn rng_with_event_idx_interrupts_per_used_event() {
    let mut h = DriverHarness::new(Rng::new(Counter(0)));
    h.activate(V1 | EVENT_IDX).unwrap();
    for round in 1..=3u64 {
        h.add_chain(0, &[Desc::Writable(4)]).unwrap();
        h.kick(0);
        assert_eq!(h.used(0).len(), 1);
        assert_eq!(h.interrupts(), round);
    }
    // Without collecting (used_event not advanced) the device stays quiet.
    h.add_chain(0, &[Desc::Writable(4)]).unwrap();
    h.kick(0);
    h.add_chain(0, &[Desc::Writable(4)]).unwrap();
    h.kick(0);
    assert_eq!(h.interrupts(), 4);
    assert_eq!(h.used(0).len(), 2);
}

#[test]
fn rng_bad_descriptors_are_skipped_and_counted() {
    let mut h = DriverHarness::new(Rng::new(Counter(0)));
    h.activate(V1).unwrap();
    let c = h
        .add_chain(
            0,
            &[
                Desc::Readable(vec![1, 2]), // read-only
                Desc::Raw {
                    addr: 1 << 40,
                    len: 16,
                    writable: true,
                }, // outside memory
                Desc::Raw {
                    addr: (64 << 20) - 4,
                    len: 16,
                    writable: true,
                }, // straddles the end
                Desc::Writable(3),
            ],
        )
        .unwrap();
    h.kick(0);
    assert_eq!(h.used(0), [(c.head, 3)]);
    assert_eq!(h.device().metrics().bad_descriptors, 3);
}

#[test]
fn rings_outside_memory_fail_activation() {
    let mut h = DriverHarness::new(Rng::new(Counter(0)));
    h.negotiate_features(V1, false).unwrap();
    h.write32(0x30, 0);
    h.write32(0x38, 16);
    h.write32(0x80, 0);
    h.write32(0x84, 0x100); // descriptor table at 1 TiB
    h.write32(0x44, 1);
    h.set_status(A | D | F | OK);
    assert_eq!(h.status(), A | D | F | OK | STATUS_NEEDS_RESET);
    assert_eq!(h.transport().metrics().activation_failures, 1);
}

#[test]
fn corrupt_avail_index_sets_needs_reset() {
    let mut h = DriverHarness::new(Rng::new(Counter(0)));
    h.activate(V1).unwrap();
    // avail.idx jumps by more than the queue size: the ring is corrupt.
    let avail = crate::test_utils::ring_layout(0, 256).avail.0;
    use vm_memory::Bytes;
    h.mem().write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
    h.kick(0);
    assert_eq!(h.status() & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
    assert_eq!(h.transport().metrics().device_errors, 1);
}

#[test]
fn harness_works_on_caller_memory() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 48 << 20)]).unwrap();
    let mut h = DriverHarness::with_memory(Rng::new(Counter(0)), mem);
    h.activate(V1).unwrap();
    let c = h.add_chain(0, &[Desc::Writable(1)]).unwrap();
    h.kick(0);
    assert_eq!(h.used(0), [(c.head, 1)]);
    assert_eq!(
        h.transport().metrics(),
        TransportMetrics {
            notifies: 1,
            trapped_notifies: 1,
            resets: 1,
            ..Default::default()
        }
    );
}

#[test]
fn looping_chain_is_cut_and_out_of_range_head_needs_reset() {
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use vm_memory::Bytes;
    let mut h = DriverHarness::new(Rng::new(Counter(0)));
    h.activate(V1).unwrap();
    let l = crate::test_utils::ring_layout(0, 256);
    // Descriptor 5 chains to itself forever: the chain's TTL (queue size) ends it.
    let d = SplitDescriptor::new(
        0x200_0000,
        4,
        (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
        5,
    );
    h.mem()
        .write_obj(RawDescriptor::from(d), GuestAddress(l.desc.0 + 16 * 5))
        .unwrap();
    // Avail ring: head 5, then a head beyond the table (1000).
    h.mem()
        .write_obj(5u16, GuestAddress(l.avail.0 + 4))
        .unwrap();
    h.mem()
        .write_obj(1000u16, GuestAddress(l.avail.0 + 6))
        .unwrap();
    h.mem()
        .write_obj(2u16, GuestAddress(l.avail.0 + 2))
        .unwrap();
    h.kick(0);
    // The loop is cut after `size` descriptors; the out-of-range head cannot be returned on
    // the used ring (virtio-queue refuses it), so the device reports the corrupt ring:
    // DEVICE_NEEDS_RESET. No hang, no panic.
    assert_eq!(h.used(0), [(5, 256 * 4)]);
    assert_eq!(h.status() & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
    assert_eq!(h.transport().metrics().device_errors, 1);
}

#[test]
fn reset_returns_everything_to_the_initial_state() {
    let (mut h, seen) = dummy();
    h.activate(V1 | EVENT_IDX).unwrap();
    h.transport_mut().core_mut().config_changed();
    h.set_status(0);
    let c = h.transport().core();
    assert_eq!(
        (c.status(), c.acked_features(), c.queue_select()),
        (0, 0, 0)
    );
    assert!(!c.is_activated());
    assert_eq!(h.read32(0x60), 0, "InterruptStatus cleared");
    h.write32(0x30, 0);
    assert_eq!((h.read32(0x38), h.read32(0x44), h.read32(0x80)), (0, 0, 0));
    assert_eq!(h.read32(0x34), 8, "max size kept");
    assert_eq!(seen.lock().unwrap().resets, 2); // negotiate's reset and this one
    // And the device comes up again.
    h.activate(V1).unwrap();
    assert_eq!(seen.lock().unwrap().activations, 2);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    /// Offsets a driver touches, so random sequences reach deep states.
    const OFFSETS: [u64; 18] = [
        0x14, 0x20, 0x24, 0x30, 0x38, 0x44, 0x50, 0x64, 0x70, 0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4,
        0xfc, 0x100, 0x104,
    ];

    fn op() -> impl Strategy<Value = (usize, u32, bool)> {
        (
            0..OFFSETS.len(),
            prop_oneof![0u32..16, any::<u32>(), Just(1 << 29)],
            any::<bool>(),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Random register traffic (after an optional legal bring-up) never panics, and the
        /// status byte only ever shows FEATURES_OK with offered features incl. VERSION_1,
        /// DRIVER_OK only after FEATURES_OK, and activation only with DRIVER_OK.
        #[test]
        fn random_register_traffic_keeps_the_status_invariants(
            bring_up in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let mut h = DriverHarness::new(crate::rng::Rng::new(Counter(0)));
            if bring_up {
                h.activate(V1 | EVENT_IDX).unwrap();
            }
            for (i, v, chain) in ops {
                if chain {
                    let _ = h.add_chain(0, &[Desc::Writable(v % 64 + 1)]);
                }
                h.write32(OFFSETS[i], v);
                let s = h.status();
                let c = h.transport().core();
                if s & F != 0 {
                    prop_assert_eq!(c.acked_features() & !(V1 | EVENT_IDX), 0);
                    prop_assert!(c.acked_features() & V1 != 0);
                }
                if s & OK != 0 && s & STATUS_NEEDS_RESET == 0 {
                    prop_assert!(s & F != 0);
                    prop_assert!(c.is_activated());
                }
                if c.is_activated() {
                    prop_assert!(s & OK != 0);
                }
            }
        }
    }
}
