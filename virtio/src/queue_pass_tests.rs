//! The shared queue pass through the harness: in flight, retry, completion, suppression.

use std::collections::VecDeque;
use std::time::Duration;

use crate::queue_pass::{ChainOutcome, Completion, Retry};
use crate::spec::*;
use crate::test_utils::{Desc, DriverHarness};
use crate::{Activation, DeviceError, VirtioDevice};

/// Takes chains in flight while `budget` allows, asks for a retry after that.
#[derive(Default)]
struct Deferring {
    active: Option<Activation>,
    budget: u32,
    held: VecDeque<u16>,
    retries: Vec<Option<Retry>>,
}

impl Deferring {
    fn finish_all(&mut self) -> u64 {
        let done: Vec<_> = self
            .held
            .drain(..)
            .map(|head| Completion { head, len: 3 })
            .collect();
        let a = self.active.as_mut().unwrap();
        a.complete(0, done).unwrap().interrupts
    }
}

impl VirtioDevice for Deferring {
    fn device_type(&self) -> u32 {
        0x2a
    }
    fn device_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[8]
    }
    fn activate(&mut self, a: Activation) -> Result<(), DeviceError> {
        self.active = Some(a);
        Ok(())
    }
    fn queue_notify(&mut self, queue: u16) -> Result<(), DeviceError> {
        let (budget, held) = (&mut self.budget, &mut self.held);
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let report = a.run_queue(queue, |chain| {
            if *budget == 0 {
                return ChainOutcome::Retry(Retry::After(Duration::from_millis(5)));
            }
            *budget -= 1;
            held.push_back(chain.head_index());
            ChainOutcome::InFlight
        })?;
        self.retries.push(report.retry);
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
    }
}

#[test]
fn in_flight_chains_complete_later_and_a_retry_leaves_the_rest_available() {
    for features in [
        1 << VIRTIO_F_VERSION_1,
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX,
    ] {
        let mut h = DriverHarness::new(Deferring {
            budget: 2,
            ..Default::default()
        });
        h.activate(features).unwrap();
        let chains: Vec<_> = (0..3)
            .map(|_| h.add_chain(0, &[Desc::Writable(4)]).unwrap())
            .collect();
        h.kick(0);
        // Two taken in flight, the third refused: nothing used yet, no interrupt.
        assert!(h.used(0).is_empty());
        assert_eq!(h.interrupts(), 0);
        assert_eq!(
            h.device().retries,
            [Some(Retry::After(Duration::from_millis(5)))]
        );
        // Completing them goes through the same module: used ring plus one interrupt.
        assert_eq!(h.device_mut().finish_all(), 1);
        assert_eq!(h.used(0), [(chains[0].head, 3), (chains[1].head, 3)]);
        // The refused chain is still available: the retry takes it.
        h.device_mut().budget = 5;
        h.kick(0);
        assert_eq!(h.device().retries[1], None);
        h.device_mut().finish_all();
        assert_eq!(h.used(0), [(chains[2].head, 3)]);
        assert_eq!(h.transport().core().corrupt_rings(), 0);
    }
}

/// A chain answered `Retry::After` arms the queue's retry timer, a declared event source: when
/// it fires, the queue runs again — no driver notification involved.
#[test]
fn retry_after_runs_the_queue_again_without_a_kick() {
    let mut h = DriverHarness::new(Deferring::default());
    h.activate(1 << VIRTIO_F_VERSION_1).unwrap();
    let c = h.add_chain(0, &[Desc::Writable(4)]).unwrap();
    h.kick(0);
    assert_eq!(h.device().retries.len(), 1);
    h.device_mut().budget = 1;
    // The 5 ms retry timer fires: one wake-up, the chain is taken.
    assert_eq!(h.serve_events(Duration::from_secs(10)).unwrap(), 1);
    assert_eq!(
        h.device().retries,
        [Some(Retry::After(Duration::from_millis(5))), None]
    );
    assert_eq!(h.device().held, [c.head]);
    let m = h.transport().metrics();
    assert_eq!(
        (m.notifies, m.trapped_notifies),
        (1, 1),
        "the wake-up is no notification"
    );
    // After a reset the registry is empty: nothing fires.
    h.set_status(0);
    assert_eq!(h.serve_events(Duration::from_millis(20)).unwrap(), 0);
}

/// A device-declared source (`EventAction::Device`) reaches `handle_event`, here through the
/// real notify worker, which found the source in the transport's registry by itself.
#[test]
fn declared_device_events_reach_the_device_through_the_notify_worker() {
    use crate::events::{EventAction, EventSource};
    use crate::mmio::MmioTransport;
    use crate::notify::NotifyWorker;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    struct Evented {
        fd: EventFd,
        seen: Arc<AtomicU32>,
    }
    impl VirtioDevice for Evented {
        fn device_type(&self) -> u32 {
            0x2a
        }
        fn device_features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8]
        }
        fn activate(&mut self, _: Activation) -> Result<(), DeviceError> {
            Ok(())
        }
        fn queue_notify(&mut self, _: u16) -> Result<(), DeviceError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn event_sources(&self) -> Vec<EventSource> {
            vec![EventSource::counter(&self.fd, EventAction::Device(7)).unwrap()]
        }
        fn handle_event(&mut self, token: u32) -> Result<(), DeviceError> {
            self.seen.store(token, Ordering::SeqCst);
            Ok(())
        }
    }

    let seen = Arc::new(AtomicU32::new(0));
    let fd = EventFd::new(EFD_NONBLOCK).unwrap();
    let dev = Evented {
        fd: fd.try_clone().unwrap(),
        seen: seen.clone(),
    };
    // Bring it up through the harness, then hand the transport to a worker.
    let mut h = DriverHarness::new(dev);
    h.activate(1 << VIRTIO_F_VERSION_1).unwrap();
    let t: Arc<Mutex<MmioTransport<Evented>>> = Arc::new(Mutex::new(h.into_transport()));
    let worker = NotifyWorker::spawn(t.clone(), Vec::new()).unwrap();
    fd.write(1).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while seen.load(Ordering::SeqCst) != 7 {
        assert!(std::time::Instant::now() < deadline, "event not served");
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(worker);
}

/// Any pollable fd can be a device's event source: here a socket (as a tap fd would be),
/// edge-triggered, which the device drains itself in `handle_event`; it fires once per
/// arrival, not again while the data sits unread.
#[test]
fn an_edge_triggered_socket_is_a_device_event_source() {
    use crate::events::{EventAction, EventSource};
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    struct Tap {
        rx: UnixStream,
        drain: bool,
        got: Vec<u8>,
        events: u32,
    }
    impl VirtioDevice for Tap {
        fn device_type(&self) -> u32 {
            1
        }
        fn device_features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8]
        }
        fn activate(&mut self, _: Activation) -> Result<(), DeviceError> {
            Ok(())
        }
        fn queue_notify(&mut self, _: u16) -> Result<(), DeviceError> {
            Ok(())
        }
        fn reset(&mut self) {}
        fn event_sources(&self) -> Vec<EventSource> {
            vec![EventSource::edge(&self.rx, EventAction::Device(3)).unwrap()]
        }
        fn handle_event(&mut self, token: u32) -> Result<(), DeviceError> {
            assert_eq!(token, 3);
            self.events += 1;
            if self.drain {
                let mut b = [0u8; 64];
                let n = self.rx.read(&mut b).unwrap();
                self.got.extend_from_slice(&b[..n]);
            }
            Ok(())
        }
    }

    let (mut tx, rx) = UnixStream::pair().unwrap();
    rx.set_nonblocking(true).unwrap();
    let mut h = DriverHarness::new(Tap {
        rx,
        drain: false,
        got: Vec::new(),
        events: 0,
    });
    h.activate(1 << VIRTIO_F_VERSION_1).unwrap();
    tx.write_all(b"frame1").unwrap();
    assert_eq!(h.serve_events(Duration::from_secs(10)).unwrap(), 1);
    // Not drained: edge-triggered, so no second event for the same data.
    assert_eq!(h.serve_events(Duration::from_millis(20)).unwrap(), 0);
    h.device_mut().drain = true;
    tx.write_all(b"frame2").unwrap();
    assert_eq!(h.serve_events(Duration::from_secs(10)).unwrap(), 1);
    assert_eq!(h.device().got, b"frame1frame2");
    assert_eq!(h.device().events, 2);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    /// Answers each chain by its plan (0: used now, 1: in flight, 2: retry on an event),
    /// cycling; `all_used` overrides the plan.
    #[derive(Default)]
    struct Scripted {
        active: Option<Activation>,
        plan: Vec<u8>,
        step: usize,
        all_used: bool,
        held: Vec<u16>,
    }

    impl VirtioDevice for Scripted {
        fn device_type(&self) -> u32 {
            0x2a
        }
        fn device_features(&self) -> u64 {
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8]
        }
        fn activate(&mut self, a: Activation) -> Result<(), DeviceError> {
            self.active = Some(a);
            Ok(())
        }
        fn queue_notify(&mut self, queue: u16) -> Result<(), DeviceError> {
            let (plan, step, all, held) =
                (&self.plan, &mut self.step, self.all_used, &mut self.held);
            let Some(a) = self.active.as_mut() else {
                return Ok(());
            };
            a.run_queue(queue, |chain| {
                let head = chain.head_index();
                let kind = if all || plan.is_empty() {
                    0
                } else {
                    plan[*step % plan.len()]
                };
                *step += 1;
                match kind {
                    0 => ChainOutcome::Used(u32::from(head) + 1),
                    1 => {
                        held.push(head);
                        ChainOutcome::InFlight
                    }
                    _ => ChainOutcome::Retry(Retry::OnEvent),
                }
            })?;
            Ok(())
        }
        fn reset(&mut self) {
            self.active = None;
        }
    }

    impl Scripted {
        fn complete_some(&mut self, n: usize) {
            let n = n.min(self.held.len());
            let done: Vec<_> = self
                .held
                .drain(..n)
                .map(|head| Completion { head, len: 100 })
                .collect();
            if let Some(a) = self.active.as_mut() {
                a.complete(0, done).unwrap();
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        Post,
        Kick,
        Complete(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::Post),
            Just(Step::Kick),
            (0usize..4).prop_map(Step::Complete)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Whatever the device answers chain by chain, every chain the driver posts comes back
        /// on the used ring exactly once — with the length the device gave when it was used at
        /// once, 100 when it completed later — and never more interrupts than used entries.
        #[test]
        fn every_chain_is_used_exactly_once(
            plan in proptest::collection::vec(0u8..3, 0..6),
            steps in proptest::collection::vec(step(), 0..30),
            event_idx in any::<bool>(),
        ) {
            let mut features = 1 << VIRTIO_F_VERSION_1;
            if event_idx {
                features |= 1 << VIRTIO_RING_F_EVENT_IDX;
            }
            let mut h = DriverHarness::new(Scripted { plan, ..Default::default() });
            h.activate(features).unwrap();
            let mut posted = Vec::new();
            let mut used = Vec::new();
            for s in steps {
                match s {
                    // At most 6 chains: the harness reuses descriptors after 8.
                    Step::Post if posted.len() < 6 => {
                        posted.push(h.add_chain(0, &[Desc::Writable(4)]).unwrap().head);
                    }
                    Step::Post => {}
                    Step::Kick => h.kick(0),
                    Step::Complete(n) => h.device_mut().complete_some(n),
                }
                used.extend(h.used(0));
                let mut heads: Vec<u16> = used.iter().map(|u| u.0).collect();
                heads.sort_unstable();
                heads.dedup();
                prop_assert_eq!(heads.len(), used.len(), "a chain used twice: {:?}", used);
                prop_assert!(used.iter().all(|u| posted.contains(&u.0)));
            }
            // Drain: everything is used now, then finish what is in flight.
            h.device_mut().all_used = true;
            h.kick(0);
            h.device_mut().complete_some(usize::MAX);
            used.extend(h.used(0));
            let mut got: Vec<u16> = used.iter().map(|u| u.0).collect();
            got.sort_unstable();
            let mut want = posted.clone();
            want.sort_unstable();
            prop_assert_eq!(got, want);
            for (head, len) in &used {
                prop_assert!(*len == u32::from(*head) + 1 || *len == 100, "{} {}", head, len);
            }
            prop_assert!(h.interrupts() <= used.len() as u64);
            prop_assert_eq!(h.transport().core().corrupt_rings(), 0);
            prop_assert_eq!(h.status() & STATUS_NEEDS_RESET, 0);
        }
    }
}
