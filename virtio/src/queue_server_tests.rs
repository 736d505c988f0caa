//! The threading model: queues served apart from the transport lock, through the real notify
//! worker and eventfd doorbells (no KVM).

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmkit_devices::MutBusDevice;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::mmio::MmioTransport;
use crate::notify::{NotifyWorker, QueueEventFd};
use crate::queue_pass::ChainOutcome;
use crate::queue_server::{QueueHandle, QueueServer};
use crate::spec::*;
use crate::test_utils::{Desc, DriverHarness, ring_layout};
use crate::{Activation, DeviceError, VirtioDevice};

/// Queue 0's server blocks (a long request) until released; queue 1's returns at once.
struct TwoQueues {
    active: Option<Activation>,
    started: Sender<()>,
    release: Option<Receiver<()>>,
}

struct Server {
    handle: QueueHandle<vm_memory::GuestMemoryMmap>,
    gate: Option<(Sender<()>, Receiver<()>)>,
}

impl QueueServer for Server {
    fn serve(&mut self) -> Result<(), DeviceError> {
        if let Some((started, release)) = &self.gate {
            let _ = started.send(());
            let _ = release.recv_timeout(Duration::from_secs(20));
        }
        self.handle.run(|_| ChainOutcome::Used(0))?;
        Ok(())
    }
}

impl VirtioDevice for TwoQueues {
    fn device_type(&self) -> u32 {
        0x2a
    }
    fn device_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[8, 8]
    }
    fn config_space(&self) -> &[u8] {
        b"cfg!"
    }
    fn activate(&mut self, a: Activation) -> Result<(), DeviceError> {
        self.active = Some(a);
        Ok(())
    }
    fn queue_notify(&mut self, _: u16) -> Result<(), DeviceError> {
        panic!("served queues never reach queue_notify");
    }
    fn reset(&mut self) {
        self.active = None;
    }
    fn queue_servers(&mut self) -> Vec<(u16, Box<dyn QueueServer>)> {
        let Some(a) = self.active.as_mut() else {
            return Vec::new();
        };
        let gate = self.release.take().map(|r| (self.started.clone(), r));
        let slow = Server {
            handle: a.take_queue(0).unwrap(),
            gate,
        };
        let fast = Server {
            handle: a.take_queue(1).unwrap(),
            gate: None,
        };
        vec![(0, Box::new(slow)), (1, Box::new(fast))]
    }
}

fn used_idx(mem: &vm_memory::GuestMemoryMmap, q: u16) -> u16 {
    let l = ring_layout(q, 8);
    mem.read_obj(GuestAddress(l.used.0 + 2)).unwrap()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn queues_progress_while_another_is_busy() {
    let (started_tx, started) = channel();
    let (release, release_rx) = channel();
    let mut h = DriverHarness::new(TwoQueues {
        active: None,
        started: started_tx,
        release: Some(release_rx),
    });
    h.activate(1 << VIRTIO_F_VERSION_1).unwrap();
    h.add_chain(0, &[Desc::Writable(4)]).unwrap();
    h.add_chain(1, &[Desc::Writable(4)]).unwrap();
    let mem = h.mem().clone();
    let t: Arc<Mutex<MmioTransport<TwoQueues>>> = Arc::new(Mutex::new(h.into_transport()));
    let doorbells: Vec<QueueEventFd> = (0..2)
        .map(|q| QueueEventFd {
            queue: q,
            addr: 0x50,
            fd: EventFd::new(EFD_NONBLOCK).unwrap(),
        })
        .collect();
    let kicks: Vec<EventFd> = doorbells
        .iter()
        .map(|d| d.fd.try_clone().unwrap())
        .collect();
    let worker = NotifyWorker::spawn(t.clone(), doorbells).unwrap();

    // Queue 0 starts its long request...
    kicks[0].write(1).unwrap();
    started.recv_timeout(Duration::from_secs(10)).unwrap();
    // ...queue 1 still completes...
    kicks[1].write(1).unwrap();
    wait_until("queue 1 completes", || used_idx(&mem, 1) == 1);
    assert_eq!(used_idx(&mem, 0), 0, "queue 0 is still busy");
    // ...and the vCPU's config and interrupt-status reads are served meanwhile.
    let mut cfg = [0u8; 4];
    let mut isr = [0u8; 4];
    wait_until("the transport lock is free", || {
        let Ok(mut g) = t.try_lock() else {
            return false;
        };
        g.read(0x100, &mut cfg);
        g.read(0x60, &mut isr);
        true
    });
    assert_eq!(&cfg, b"cfg!");
    assert_eq!(
        u32::from_le_bytes(isr) & VIRTIO_MMIO_INT_VRING,
        VIRTIO_MMIO_INT_VRING
    );
    release.send(()).unwrap();
    wait_until("queue 0 completes", || used_idx(&mem, 0) == 1);
    drop(worker);
    let t = t.lock().unwrap();
    assert_eq!(
        t.metrics().notifies,
        2,
        "delivered to servers, counted once each"
    );
}

/// Reset and DEVICE_NEEDS_RESET drop the queue servers (waiting for a running one).
#[test]
fn reset_drops_queue_servers() {
    let (started_tx, _started) = channel();
    let mut h = DriverHarness::new(TwoQueues {
        active: None,
        started: started_tx,
        release: None,
    });
    h.activate(1 << VIRTIO_F_VERSION_1).unwrap();
    let servers = h.transport().core().queue_servers();
    assert!(servers.serves(0) && servers.serves(1));
    // A trapped kick runs the server on this thread.
    let c = h.add_chain(1, &[Desc::Writable(4)]).unwrap();
    h.kick(1);
    assert_eq!(h.used(1), [(c.head, 0)]);
    h.set_status(0);
    assert!(!servers.serves(0) && !servers.serves(1));
    // DEVICE_NEEDS_RESET (a device error, or the VMM's call) stops them too.
    h.activate(1 << VIRTIO_F_VERSION_1).unwrap();
    assert!(servers.serves(0));
    h.transport_mut().core_mut().needs_reset();
    assert!(!servers.serves(0) && !servers.serves(1));
}
