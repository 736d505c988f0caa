//! Unit tests of MSI-X masking for irqfd-backed vectors (PCI 3.0 §6.8.3.5), without KVM: the
//! [`RecordingMsiSink`] tracks which irqfds are attached, and the tests play KVM by draining the
//! eventfds of attached irqfds (one injection per drained count, as KVM's irqfd does).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use proptest::prelude::*;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::msix::MSIX_CTRL_ENABLE;
use super::*;
use crate::interrupt::InterruptSource;
use crate::msi::{IrqfdControl, IrqfdEvent, MsiEvent, MsiMessage, MsiSink, RecordingMsiSink};

const GSI0: u32 = 40;
const TABLE: u64 = 0x800;

/// A function with `vectors` MSI-X vectors in BAR 2 (table at 0x800, PBA after it), each with
/// an irqfd on GSI `GSI0 + v`.
struct Rig {
    sink: Arc<RecordingMsiSink>,
    msix: Msix,
    cfg: ConfigSpace,
    cap: u16,
    fds: Vec<Arc<EventFd>>,
}

impl Rig {
    fn new(vectors: u16) -> Self {
        Self::with_sink(vectors, Arc::new(RecordingMsiSink::default()))
    }

    fn with_sink(vectors: u16, sink: Arc<RecordingMsiSink>) -> Self {
        let msix = Msix::new(MsixConfig::in_bar(2, vectors, TABLE as u32), sink.clone()).unwrap();
        let mut cfg = ConfigSpace::new(&PciHeader::default());
        cfg.add_bar(
            2,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x2000,
        )
        .unwrap();
        let cap = cfg.add_msix(&msix).unwrap();
        let fds: Vec<_> = (0..vectors)
            .map(|v| {
                let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
                msix.attach_irqfd(v, GSI0 + v as u32, fd.clone()).unwrap();
                fd
            })
            .collect();
        Self {
            sink,
            msix,
            cfg,
            cap,
            fds,
        }
    }

    /// The guest writes message control (enable, function mask) through config space.
    fn control(&mut self, enable: bool, function_mask: bool) {
        let v = (enable as u16) << 15 | (function_mask as u16) << 14;
        self.cfg.write(self.cap + 2, &v.to_le_bytes());
    }

    /// The guest programs entry `v`'s message (vector `vector`), leaving its mask bit alone.
    fn program(&self, v: u16, vector: u8) {
        let at = TABLE + 16 * v as u64;
        self.msix.bar_write(2, at, &0xfee0_0000u32.to_le_bytes());
        self.msix.bar_write(2, at + 4, &0u32.to_le_bytes());
        self.msix
            .bar_write(2, at + 8, &(vector as u32).to_le_bytes());
    }

    /// The guest sets or clears entry `v`'s mask bit.
    fn mask(&self, v: u16, masked: bool) {
        let at = TABLE + 16 * v as u64 + 12;
        self.msix.bar_write(2, at, &(masked as u32).to_le_bytes());
    }

    /// The guest reads the PBA qword holding vector `v`.
    fn pba(&self, v: u16) -> u64 {
        let mut b = [0u8; 8];
        let at = self.msix.config().pba_offset as u64 + (v as u64 / 64) * 8;
        assert!(self.msix.bar_read(2, at, &mut b));
        u64::from_le_bytes(b)
    }

    /// The device writes vector `v`'s eventfd itself.
    fn write(&self, v: u16) {
        self.fds[v as usize].write(1).unwrap();
    }

    fn attached(&self, v: u16) -> bool {
        self.sink
            .irqfd_registered(GSI0 + v as u32, &self.fds[v as usize])
    }

    /// Play KVM: an attached irqfd injects what its eventfd counted; the number of injections.
    fn kvm(&self, v: u16) -> u64 {
        if !self.attached(v) {
            return 0;
        }
        match self.fds[v as usize].read() {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("{e}"),
        }
    }

    /// What vector `v`'s eventfd holds (consuming it): for detached irqfds only.
    fn count(&self, v: u16) -> u64 {
        assert!(!self.attached(v));
        self.fds[v as usize].read().unwrap_or(0)
    }

    fn last_route(&self, v: u16) -> Option<MsiMessage> {
        self.sink.events().into_iter().rev().find_map(|e| match e {
            MsiEvent::Route(gsi, m) if gsi == GSI0 + v as u32 => Some(m),
            _ => None,
        })?
    }
}

fn msg(vector: u8) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000,
        data: vector as u32,
    }
}

#[test]
fn attach_leaves_masked_vectors_detached_and_makes_the_eventfd_non_blocking() {
    let sink = Arc::new(RecordingMsiSink::default());
    let msix = Msix::new(MsixConfig::in_bar(2, 2, 0), sink.clone()).unwrap();
    let fd = Arc::new(EventFd::new(0).unwrap()); // blocking
    msix.attach_irqfd(1, 77, fd.clone()).unwrap();
    // SAFETY: F_GETFL on an open descriptor; no memory is passed.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    assert_ne!(flags & libc::O_NONBLOCK, 0);
    // Msix owns the registration: detached first (the vector is masked), route published.
    assert_eq!(sink.irqfd_events(), [IrqfdEvent::Unregistered(77)]);
    assert!(!sink.irqfd_registered(77, &fd));
    assert_eq!(
        sink.events(),
        [MsiEvent::Route(77, Some(MsiMessage::default()))]
    );
    assert!(!msix.pending(1)); // an empty count folds to nothing (and does not block)
    assert!(msix.attach_irqfd(2, 78, fd).is_err());
}

#[test]
fn masked_vector_holds_eventfd_writes_and_unmask_delivers_once() {
    let mut r = Rig::new(2);
    r.control(true, false);
    r.program(0, 0x30);
    assert!(!r.attached(0));
    r.write(0);
    r.write(0);
    assert_eq!(r.kvm(0), 0); // detached: KVM injects nothing
    assert!(r.msix.pending(0)); // the count became the pending bit
    assert_eq!(r.msix.stats().pended, 2);
    r.write(0); // more writes coalesce into the same bit
    r.mask(0, false);
    assert!(r.attached(0));
    assert_eq!(r.kvm(0), 1); // exactly one message on unmask
    assert!(!r.msix.pending(0));
    assert!(r.sink.sent().is_empty());
    // Unmasked: the eventfd write is KVM's at once; Msix does not see it.
    r.write(0);
    assert_eq!(r.kvm(0), 1);
    assert!(!r.msix.pending(0));
    // Masked again: detached; trigger() and direct writes both end in one pending message.
    r.mask(0, true);
    assert!(!r.attached(0));
    r.msix.vector(0).trigger().unwrap();
    r.write(0);
    assert_eq!(r.kvm(0), 0);
    r.mask(0, false);
    assert_eq!(r.kvm(0), 1);
    // A mask/unmask with nothing pending delivers nothing.
    r.mask(0, true);
    r.mask(0, false);
    assert_eq!(r.kvm(0), 0);
    // Vector 1 was never unmasked: never attached.
    assert!(!r.attached(1));
    assert_eq!(
        r.sink.irqfd_events(),
        [
            IrqfdEvent::Unregistered(GSI0),
            IrqfdEvent::Unregistered(GSI0 + 1),
            IrqfdEvent::Registered(GSI0),
            IrqfdEvent::Unregistered(GSI0),
            IrqfdEvent::Registered(GSI0),
            IrqfdEvent::Unregistered(GSI0),
            IrqfdEvent::Registered(GSI0),
        ]
    );
    let s = r.msix.stats();
    assert_eq!(
        (s.delivered, s.pended, s.dropped, s.delivery_errors),
        (2, 5, 0, 0)
    );
}

#[test]
fn function_mask_detaches_every_vector_and_clearing_it_delivers_each_once() {
    let mut r = Rig::new(3);
    r.control(true, false);
    for v in 0..3 {
        r.program(v, 0x40 + v as u8);
        r.mask(v, false);
        assert!(r.attached(v));
    }
    r.control(true, true);
    assert!((0..3).all(|v| !r.attached(v)));
    assert!(r.msix.masked(0));
    r.write(0);
    r.write(2);
    r.write(2);
    assert_eq!((r.kvm(0), r.kvm(2)), (0, 0));
    assert_eq!(r.pba(0), 0b101);
    r.control(true, false);
    assert!((0..3).all(|v| r.attached(v)));
    assert_eq!([r.kvm(0), r.kvm(1), r.kvm(2)], [1, 0, 1]);
    assert_eq!(r.pba(0), 0);
    // A write that lands while the function is masked and the vector is masked too waits for
    // both to clear.
    r.control(true, true);
    r.mask(1, true);
    r.write(1);
    r.control(true, false);
    assert_eq!(r.kvm(1), 0);
    assert!(!r.attached(1) && r.msix.pending(1));
    r.mask(1, false);
    assert_eq!(r.kvm(1), 1);
}

#[test]
fn msix_enable_and_disable_attach_detach_and_drop_signals_while_disabled() {
    let mut r = Rig::new(2);
    r.program(0, 0x50);
    r.mask(0, false);
    // Disabled: unmasked entries stay detached; their writes are dropped on enable.
    assert!(!r.attached(0));
    r.write(0);
    r.control(true, false);
    assert!(r.attached(0));
    assert_eq!(r.kvm(0), 0);
    assert!(!r.msix.pending(0));
    assert_eq!(r.msix.stats().dropped, 1);
    r.write(0);
    assert_eq!(r.kvm(0), 1);
    // Disabling detaches; writes while disabled are dropped, also when the PBA is read.
    r.control(false, false);
    assert!(!r.attached(0));
    r.write(0);
    assert_eq!(r.pba(0), 0);
    assert_eq!(r.msix.stats().dropped, 2);
    // A masked vector's held write survives a disable/enable cycle (the pending bit stays),
    // and is delivered once when unmasked.
    r.control(true, false);
    r.program(1, 0x51);
    r.write(1);
    r.control(false, false);
    assert!(r.msix.pending(1));
    r.control(true, false);
    assert_eq!(r.kvm(1), 0);
    r.mask(1, false);
    assert_eq!(r.kvm(1), 1);
    assert_eq!(r.msix.stats().dropped, 2);
}

#[test]
fn table_rewrite_while_masked_updates_the_route_and_stays_detached() {
    let mut r = Rig::new(1);
    r.control(true, false);
    r.program(0, 0x60);
    r.mask(0, false);
    r.mask(0, true);
    r.write(0);
    // The guest moves the vector (new data, new destination) while it is masked.
    r.program(0, 0x61);
    r.msix.bar_write(2, TABLE, &0xfee0_2000u32.to_le_bytes());
    assert!(!r.attached(0));
    assert_eq!(
        r.last_route(0),
        Some(MsiMessage {
            address: 0xfee0_2000,
            data: 0x61
        })
    );
    assert_eq!(r.msix.stats().pended, 0); // message writes do not fold
    // An 8-byte store of data + vector control unmasks: delivered once, on the new route.
    let v = 0x61u64; // mask bit (bit 32) clear
    r.msix.bar_write(2, TABLE + 8, &v.to_le_bytes());
    assert!(r.attached(0));
    assert_eq!(r.kvm(0), 1);
    assert_eq!(r.msix.message(0).map(|m| m.address), Some(0xfee0_2000));
    // A rewrite while unmasked (which drivers must not do) still follows into the route.
    r.program(0, 0x62);
    assert_eq!(r.last_route(0).map(|m| m.data), Some(0x62));
    assert!(r.attached(0));
    assert_eq!(r.msix.stats().delivery_errors, 0);
}

#[test]
fn pba_read_folds_the_count_of_the_qword_it_reads() {
    let mut r = Rig::new(70);
    r.control(true, false);
    r.program(3, 0x70);
    r.program(65, 0x71);
    r.write(3);
    r.write(3);
    r.write(3);
    r.write(65);
    // A dword read of the upper half of qword 0 folds all of qword 0's vectors.
    let pba = r.msix.config().pba_offset as u64;
    let mut d = [0u8; 4];
    assert!(r.msix.bar_read(2, pba + 4, &mut d));
    assert_eq!(d, [0; 4]);
    assert_eq!(r.count(3), 0); // consumed by the fold
    assert_eq!(r.msix.stats().pended, 3);
    assert_eq!(r.pba(0), 1 << 3);
    // Vector 65 is in qword 1: not folded yet.
    assert_eq!(r.msix.stats().pended, 3);
    assert_eq!(r.pba(65), 0b10);
    assert_eq!(r.msix.stats().pended, 4);
    r.mask(3, false);
    r.mask(65, false);
    assert_eq!((r.kvm(3), r.kvm(65)), (1, 1));
    assert_eq!((r.pba(0), r.pba(65)), (0, 0));
}

#[test]
fn restore_attaches_exactly_the_deliverable_vectors_and_keeps_saved_pending_bits() {
    let mut a = Rig::new(3);
    a.control(true, false);
    for v in 0..3 {
        a.program(v, 0x20 + v as u8);
    }
    a.mask(2, false);
    a.write(0); // held in vector 0's eventfd: must reach the snapshot
    let saved = a.msix.state();
    assert_eq!(saved.pending, [0b001]);
    assert_eq!(a.count(0), 0);

    let b = Rig::new(3);
    b.write(1); // collected before the restore: dropped, the snapshot decides
    b.msix.restore(&saved).unwrap();
    assert_eq!(b.msix.state(), saved);
    assert_eq!(
        [b.attached(0), b.attached(1), b.attached(2)],
        [false, false, true]
    );
    assert_eq!(b.msix.stats().dropped, 1);
    assert_eq!(b.last_route(0), Some(msg(0x20)));
    // Nothing delivered by the restore itself.
    assert_eq!([b.kvm(0), b.kvm(1), b.kvm(2)], [0, 0, 0]);
    b.write(1);
    b.mask(0, false);
    b.mask(1, false);
    assert_eq!([b.kvm(0), b.kvm(1)], [1, 1]);
    b.write(2);
    assert_eq!(b.kvm(2), 1);
    // Restoring a state with everything masked detaches again.
    b.msix
        .restore(&MsixState {
            table: vec![[0, 0, 0, 1]; 3],
            pending: vec![0],
            ..saved
        })
        .unwrap();
    assert!((0..3).all(|v| !b.attached(v)));
}

#[test]
fn reset_detaches_and_drops_what_was_collected() {
    let mut r = Rig::new(2);
    r.control(true, false);
    r.program(0, 0x33);
    r.program(1, 0x34);
    r.mask(0, false);
    r.write(1); // masked: held
    r.msix.vector(1).trigger().unwrap();
    assert!(r.attached(0));
    r.msix.reset();
    assert!(!r.attached(0) && !r.attached(1));
    assert!(!r.msix.pending(1));
    assert_eq!(r.msix.stats().dropped, 1);
    r.write(0); // after reset: MSI-X disabled, dropped
    r.control(true, false);
    r.program(0, 0x35);
    r.mask(0, false);
    r.mask(1, false);
    assert_eq!([r.kvm(0), r.kvm(1)], [0, 0]);
    assert_eq!(r.msix.stats().dropped, 2);
    r.write(0);
    assert_eq!(r.kvm(0), 1);
}

/// A sink without irqfd control (as before 0.3): the owner registered the irqfd, Msix leaves it
/// attached and writes it on delivery; direct writes are not seen by Msix.
#[test]
fn sinks_without_irqfd_control_keep_the_irqfd_as_registered() {
    struct Plain;
    impl MsiSink for Plain {
        fn send(&self, _: MsiMessage) -> io::Result<()> {
            Ok(())
        }
    }
    let msix = Msix::new(MsixConfig::in_bar(0, 1, 0), Arc::new(Plain)).unwrap();
    let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    msix.attach_irqfd(0, 5, fd.clone()).unwrap();
    msix.set_control(MSIX_CTRL_ENABLE);
    msix.vector(0).trigger().unwrap(); // masked: pending, eventfd untouched
    fd.write(1).unwrap();
    assert!(msix.pending(0));
    assert_eq!(msix.stats().pended, 1); // the direct write was not folded
    msix.bar_write(0, 12, &0u32.to_le_bytes());
    assert_eq!(fd.read().unwrap(), 2); // the direct write plus the unmask delivery
}

/// An irqfd control whose attach fails: the pending message still reaches the guest through
/// the sink, and the failure is counted.
#[test]
fn failed_attach_falls_back_to_the_sink() {
    struct Failing(RecordingMsiSink);
    impl MsiSink for Failing {
        fn send(&self, m: MsiMessage) -> io::Result<()> {
            self.0.send(m)
        }
        fn irqfd_control(&self) -> Option<&dyn IrqfdControl> {
            Some(self)
        }
    }
    impl IrqfdControl for Failing {
        fn register_irqfd(&self, _: u32, _: &EventFd) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn unregister_irqfd(&self, _: u32, _: &EventFd) -> io::Result<()> {
            Ok(())
        }
    }
    let sink = Arc::new(Failing(RecordingMsiSink::default()));
    let msix = Msix::new(MsixConfig::in_bar(0, 1, 0), sink.clone()).unwrap();
    let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    msix.attach_irqfd(0, 5, fd.clone()).unwrap();
    msix.set_control(MSIX_CTRL_ENABLE);
    msix.bar_write(0, 8, &0x44u32.to_le_bytes());
    fd.write(1).unwrap();
    msix.bar_write(0, 12, &0u32.to_le_bytes());
    assert_eq!(sink.0.vectors(), [0x44]);
    assert_eq!(msix.stats().delivery_errors, 1);
    // Still detached: the next direct write is sent through the sink once it is folded.
    fd.write(1).unwrap();
    assert!(!msix.pending(0));
    assert_eq!(sink.0.vectors(), [0x44, 0x44]);
}

/// What the guest and the device can do to a 2-vector function.
#[derive(Clone, Debug)]
enum Op {
    /// The device writes the vector's eventfd.
    Write(u16),
    /// The device calls `trigger()`.
    Trigger(u16),
    /// The guest sets/clears a vector's mask bit.
    Mask(u16, bool),
    /// The guest writes message control.
    Control(bool, bool),
    /// The guest reads the PBA.
    ReadPba,
    /// Snapshot and restore into the same function.
    SaveRestore,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u16..2).prop_map(Op::Write),
        (0u16..2).prop_map(Op::Trigger),
        (0u16..2, any::<bool>()).prop_map(|(v, m)| Op::Mask(v, m)),
        (any::<bool>(), any::<bool>()).prop_map(|(e, f)| Op::Control(e, f)),
        Just(Op::ReadPba),
        Just(Op::SaveRestore),
    ]
}

/// The spec's model: a signal is sent at once when deliverable, else sets the pending bit
/// (enabled) or is lost (disabled); a vector that becomes deliverable sends its pending message.
#[derive(Default)]
struct Model {
    enabled: bool,
    function_mask: bool,
    masked: [bool; 2],
    pending: [bool; 2],
}

impl Model {
    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_mask && !self.masked[v]
    }
    fn signal(&mut self, v: usize, sent: &mut [u64; 2]) {
        if self.deliverable(v) {
            sent[v] += 1;
        } else if self.enabled {
            self.pending[v] = true;
        }
    }
    fn settle(&mut self, sent: &mut [u64; 2]) {
        for (v, n) in sent.iter_mut().enumerate() {
            if self.deliverable(v) && self.pending[v] {
                self.pending[v] = false;
                *n += 1;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Against the model, after every step: the messages KVM injected per vector (plus any the
    /// sink sent) and the pending bits the guest reads.
    #[test]
    fn irqfd_masking_matches_the_spec_model(ops in proptest::collection::vec(op(), 1..40)) {
        let mut r = Rig::new(2);
        r.program(0, 0x20);
        r.program(1, 0x21);
        let mut m = Model { masked: [true; 2], ..Model::default() };
        for op in ops {
            let mut want = [0u64; 2];
            match op.clone() {
                Op::Write(v) => {
                    r.write(v);
                    m.signal(v as usize, &mut want);
                }
                Op::Trigger(v) => {
                    r.msix.vector(v).trigger().unwrap();
                    m.signal(v as usize, &mut want);
                }
                Op::Mask(v, masked) => {
                    r.mask(v, masked);
                    m.masked[v as usize] = masked;
                }
                Op::Control(e, f) => {
                    r.control(e, f);
                    m.enabled = e;
                    m.function_mask = f;
                }
                Op::ReadPba => {
                    let want_bits = m.pending[0] as u64 | (m.pending[1] as u64) << 1;
                    prop_assert_eq!(r.pba(0), want_bits);
                }
                Op::SaveRestore => {
                    let s = r.msix.state();
                    r.msix.restore(&s).unwrap();
                }
            }
            m.settle(&mut want);
            let got = [r.kvm(0), r.kvm(1)];
            prop_assert_eq!(got, want, "after {:?}", op);
            prop_assert!(r.sink.sent().is_empty());
            for v in 0..2 {
                prop_assert_eq!(r.attached(v), m.deliverable(v as usize));
            }
        }
        // Whatever is still held shows up as pending bits.
        prop_assert_eq!(r.msix.state().pending[0], m.pending[0] as u64 | (m.pending[1] as u64) << 1);
        prop_assert_eq!(r.msix.stats().delivery_errors, 0);
    }
}

/// Raw guest and device actions on a 3-vector function with irqfds on vectors 0 and 1.
#[derive(Clone, Debug)]
enum RawOp {
    Read { offset: u64, len: usize },
    Write { offset: u64, len: usize, value: u64 },
    Control(u16),
    Notify(u16),
    Trigger(u16),
}

fn raw_op() -> impl Strategy<Value = RawOp> {
    // The BAR holds the table at 0x800 (48 bytes) and the PBA right after it.
    let offset = prop_oneof![0x7f0u64..0x850, any::<u64>()];
    prop_oneof![
        (offset.clone(), 0usize..9).prop_map(|(offset, len)| RawOp::Read { offset, len }),
        (offset, 0usize..9, any::<u64>()).prop_map(|(offset, len, value)| RawOp::Write {
            offset,
            len,
            value
        }),
        any::<u16>().prop_map(RawOp::Control),
        (0u16..2).prop_map(RawOp::Notify),
        (0u16..4).prop_map(RawOp::Trigger),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Any access at any width never panics; after every step an irqfd is attached exactly
    /// while its vector is deliverable, and every message Msix sent is accounted for: through
    /// the sink (vector 2) or an attached irqfd (vectors 0 and 1, minus the device's own writes).
    #[test]
    fn raw_accesses_keep_irqfds_attached_only_while_deliverable(
        ops in proptest::collection::vec(raw_op(), 1..64)
    ) {
        let sink = Arc::new(RecordingMsiSink::default());
        let msix = Msix::new(MsixConfig::in_bar(2, 3, TABLE as u32), sink.clone()).unwrap();
        let fds: Vec<_> = (0..2u16)
            .map(|v| {
                let fd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
                msix.attach_irqfd(v, GSI0 + v as u32, fd.clone()).unwrap();
                fd
            })
            .collect();
        let attached = |v: usize| sink.irqfd_registered(GSI0 + v as u32, &fds[v]);
        let (mut injected, mut direct) = (0u64, 0u64);
        for op in ops {
            match op {
                RawOp::Read { offset, len } => {
                    let mut b = [0u8; 8];
                    msix.bar_read(2, offset, &mut b[..len]);
                }
                RawOp::Write { offset, len, value } => {
                    msix.bar_write(2, offset, &value.to_le_bytes()[..len]);
                }
                RawOp::Control(c) => msix.set_control(c),
                RawOp::Notify(v) => {
                    direct += attached(v as usize) as u64;
                    fds[v as usize].write(1).unwrap();
                }
                RawOp::Trigger(v) => msix.signal(v).unwrap(),
            }
            for (v, fd) in fds.iter().enumerate() {
                prop_assert_eq!(attached(v), msix.enabled() && !msix.masked(v as u16));
                if attached(v) {
                    injected += fd.read().unwrap_or(0);
                }
            }
        }
        let s = msix.stats();
        prop_assert_eq!(s.delivered, sink.sent().len() as u64 + injected - direct);
        prop_assert_eq!(s.delivery_errors, 0);
    }
}
