//! Transport state: save mid-traffic, serde round trip, restore into a fresh transport and a
//! fresh device, and the driver's next requests complete.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};
use vmkit_devices::msi::RecordingMsiSink;
use vmkit_devices::pci::PciFunction;

use crate::pci::*;
use crate::pci_tests::{MsixCap, Ones, Pci};
use crate::persist::{MmioTransportState, PciTransportState, StateError};
use crate::rng::Rng;
use crate::spec::*;
use crate::test_utils::{Desc, DriverHarness};

fn json<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
    serde_json::from_str(&serde_json::to_string(v).unwrap()).unwrap()
}

#[test]
fn transport_state_round_trips_for_mmio() {
    let features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;
    let mut h = DriverHarness::new(Rng::default());
    h.activate(features).unwrap();
    for _ in 0..3 {
        h.add_chain(0, &[Desc::Writable(8)]).unwrap();
    }
    h.kick(0);
    assert_eq!(h.used(0).len(), 3);
    h.transport_mut().core_mut().config_changed();
    // Mid-traffic: the driver made a chain available and has not kicked yet.
    let pending = h.add_chain(0, &[Desc::Writable(16)]).unwrap();
    let state: MmioTransportState = json(&h.transport().save());
    assert!(state.core.activated);
    assert_eq!(
        state.core.queues[0].next_avail, 3,
        "positions from the used ring"
    );

    let mut back = h.resume(Rng::default(), &state).unwrap();
    let (a, b) = (h.transport().core(), back.transport().core());
    assert_eq!(
        (b.status(), b.acked_features(), b.config_generation()),
        (a.status(), a.acked_features(), a.config_generation())
    );
    assert_eq!(
        back.transport().interrupt_status(),
        h.transport().interrupt_status()
    );
    assert_eq!(b.save(), a.save());
    // The restored device serves the pending chain and the next ones.
    back.kick(0);
    assert_eq!(back.used(0), [(pending.head, 16)]);
    let next = back.add_chain(0, &[Desc::Writable(4)]).unwrap();
    back.kick(0);
    assert_eq!(back.used(0), [(next.head, 4)]);
    assert_eq!(back.device().metrics().requests, 2);
}

#[test]
fn transport_state_round_trips_for_pci() {
    let mut p = Pci::new();
    p.msix_program(1, 0x45);
    p.bring_up(1);
    p.wr(0x10, 2, 0); // config vector 0
    p.post(8);
    p.wr(NOTIFY_CFG_OFFSET, 2, 0);
    assert_eq!(p.used_idx(), 1);
    assert_eq!(p.sink.vectors(), [0x45]);
    p.f.core_mut().config_changed();
    p.post(8); // pending, not kicked
    let state: PciTransportState = json(&p.f.save());
    assert_eq!(state.queue_vectors, [1]);
    assert_eq!(state.config_vector, 0);

    // A fresh device and transport on the same guest memory.
    let sink = Arc::new(RecordingMsiSink::default());
    let dev = Rng::new(Ones);
    let msix = VirtioPciTransport::msix_for(&dev, sink.clone()).unwrap();
    let f = VirtioPciTransport::new(dev, p.mem.clone(), msix).unwrap();
    let mut q = Pci {
        f,
        sink,
        mem: p.mem.clone(),
    };
    q.f.restore(&state).unwrap();
    assert_eq!(q.status(), 0xf);
    assert_eq!(q.rd(0x15, 1), p.rd(0x15, 1), "config generation");
    assert_eq!(q.rd(0x10, 2), 0, "config vector");
    q.wr(0x16, 2, 0);
    assert_eq!((q.rd(0x18, 2), q.rd(0x1a, 2), q.rd(0x1c, 2)), (16, 1, 1));
    let cap = q.f.msix_cap();
    let mut ctl = [0u8; 2];
    q.f.config_read(cap + 2, &mut ctl);
    assert_eq!(
        u16::from_le_bytes(ctl) & 0x8000,
        0x8000,
        "MSI-X still enabled"
    );
    assert_eq!(q.f.save(), p.f.save());
    // The driver's next kick completes the pending chain through the restored vector.
    q.mem
        .write_slice(&[0; 8], GuestAddress(0x200_0000))
        .unwrap();
    q.wr(NOTIFY_CFG_OFFSET, 2, 0);
    assert_eq!(q.used_idx(), 2);
    assert_eq!(q.sink.vectors(), [0x45]);
    let mut buf = [0u8; 8];
    q.mem
        .read_slice(&mut buf, GuestAddress(0x200_0000))
        .unwrap();
    assert_eq!(buf, [1; 8]);
    q.post(4);
    q.wr(NOTIFY_CFG_OFFSET, 2, 0);
    assert_eq!(q.used_idx(), 3);
}

type Mutation = Box<dyn Fn(&mut MmioTransportState)>;

/// A state that does not fit the device is refused and leaves the transport reset.
#[test]
fn transport_state_that_does_not_fit_is_refused() {
    let mut h = DriverHarness::new(Rng::default());
    h.activate(1 << VIRTIO_F_VERSION_1).unwrap();
    let good = h.transport().save();
    let cases: Vec<(&str, Mutation)> = vec![
        ("no queues", Box::new(|s| s.core.queues.clear())),
        (
            "other max size",
            Box::new(|s| s.core.queues[0].max_size = 64),
        ),
        (
            "unoffered feature",
            Box::new(|s| s.core.driver_features |= 1 << 40),
        ),
        (
            "size not a power of two",
            Box::new(|s| s.core.queues[0].size = 3),
        ),
        (
            "rings outside memory",
            Box::new(|s| s.core.queues[0].desc_table = 1 << 50),
        ),
    ];
    for (name, mutate) in cases {
        let mut s = good.clone();
        mutate(&mut s);
        let r = h.resume(Rng::default(), &s);
        assert!(
            matches!(r, Err(StateError::Mismatch(_) | StateError::Queue(_))),
            "{name}"
        );
    }
}
