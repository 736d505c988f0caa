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
