//! virtio-pci INTx (virtio 1.2 §4.1.4.5, §4.1.5.3, §4.1.5.4; PCI 3.0 §6.2.2–6.2.4, §6.8.3.3):
//! Interrupt Pin/Line registers, notifications through the line while MSI-X is disabled, the
//! ISR read that acknowledges them, Interrupt Disable and Interrupt Status, MSI-X taking over,
//! reset, and a table of odd guest accesses with their exact effects.

use std::sync::Arc;

use vmkit_devices::interrupt::RecordingIrqLine;
use vmkit_devices::msi::RecordingMsiSink;
use vmkit_devices::pci::{PciFunction, cap_id, command, reg, status};

use crate::pci::*;
use crate::pci_tests::{MsixCap, Ones, Pci};
use crate::rng::Rng;
use crate::spec::*;

/// A virtio-rng function whose INTA# is wired to a recording line.
fn wired() -> (Pci, Arc<RecordingIrqLine>) {
    let mem =
        vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 64 << 20)]).unwrap();
    let sink = Arc::new(RecordingMsiSink::default());
    let dev = Rng::new(Ones);
    let msix = VirtioPciTransport::msix_for(&dev, sink.clone()).unwrap();
    let line = Arc::new(RecordingIrqLine::default());
    let f = VirtioPciTransport::new(dev, mem.clone(), msix)
        .unwrap()
        .with_intx(line.clone());
    (Pci { f, sink, mem }, line)
}

fn cfg(p: &mut Pci, off: u16, len: usize) -> u32 {
    let mut b = [0u8; 4];
    p.f.config_read(off, &mut b[..len]);
    u32::from_le_bytes(b)
}

fn cfg_wr(p: &mut Pci, off: u16, len: usize, v: u32) {
    p.f.config_write(off, &v.to_le_bytes()[..len]);
}

/// The status register's Interrupt Status bit as the driver reads it.
fn interrupt_status(p: &mut Pci) -> bool {
    cfg(p, reg::STATUS, 2) as u16 & status::INTERRUPT_STATUS != 0
}

/// Set or clear the command register's Interrupt Disable bit (memory space + bus master on).
fn intx_disable(p: &mut Pci, disable: bool) {
    let mut c = command::MEMORY_SPACE | command::BUS_MASTER;
    if disable {
        c |= command::INTX_DISABLE;
    }
    cfg_wr(p, reg::COMMAND, 2, c as u32);
}

fn msix_enable(p: &mut Pci, on: bool) {
    let cap = p.f.msix_cap();
    cfg_wr(p, cap + 2, 2, if on { 0x8000 } else { 0 });
}

/// Post a buffer on queue 0 and ring its doorbell (a used-buffer notification follows).
fn kick(p: &mut Pci) {
    p.post(8);
    p.wr(NOTIFY_CFG_OFFSET, 2, 0);
}

#[test]
fn interrupt_pin_and_line_registers() {
    // Without a line: no pin.
    let mut plain = Pci::new();
    assert_eq!(cfg(&mut plain, reg::INTERRUPT_PIN, 1), 0);
    let (mut p, line) = wired();
    assert_eq!(cfg(&mut p, reg::INTERRUPT_PIN, 1), 1, "INTA#");
    // Interrupt Line: a scratch byte the driver owns; Interrupt Pin, Min_Gnt and Max_Lat are
    // read-only (a dword write at 0x3c changes only the line byte).
    assert_eq!(cfg(&mut p, reg::INTERRUPT_LINE, 1), 0);
    cfg_wr(&mut p, reg::INTERRUPT_LINE, 1, 0x0b);
    assert_eq!(cfg(&mut p, reg::INTERRUPT_LINE, 4), 0x0000_010b);
    cfg_wr(&mut p, reg::INTERRUPT_LINE, 4, 0xffff_ff05);
    assert_eq!(cfg(&mut p, reg::INTERRUPT_LINE, 4), 0x0000_0105);
    cfg_wr(&mut p, reg::INTERRUPT_PIN, 1, 4);
    assert_eq!(cfg(&mut p, reg::INTERRUPT_PIN, 1), 1);
    // Interrupt Disable is writable; Interrupt Status is read-only and starts clear.
    intx_disable(&mut p, true);
    assert_eq!(
        cfg(&mut p, reg::COMMAND, 2) as u16 & command::INTX_DISABLE,
        command::INTX_DISABLE
    );
    cfg_wr(&mut p, reg::STATUS, 2, status::INTERRUPT_STATUS as u32);
    assert!(!interrupt_status(&mut p));
    assert_eq!(p.f.config_space().stats().bad_accesses, 0);
    assert_eq!(
        line.calls(),
        0,
        "nothing pending: the line was never driven"
    );
}

#[test]
fn used_buffer_notification_asserts_the_line_and_sets_isr_bit_0() {
    let (mut p, line) = wired();
    intx_disable(&mut p, false);
    // The driver even assigned a vector: with MSI-X disabled it does not matter.
    p.bring_up(0);
    kick(&mut p);
    assert_eq!(p.used_idx(), 1);
    assert!(line.level() && p.f.intx_asserted() && p.f.intx_pending());
    assert!(interrupt_status(&mut p));
    assert_eq!(p.f.isr_status(), VIRTIO_PCI_ISR_QUEUE);
    assert!(p.sink.sent().is_empty(), "no MSI");
    // The driver's handler reads the ISR: bits returned and cleared, line down.
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), VIRTIO_PCI_ISR_QUEUE as u64);
    assert!(!line.level() && !p.f.intx_pending() && !interrupt_status(&mut p));
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), 0);
    assert_eq!((line.asserts(), line.deasserts(), line.calls()), (1, 1, 2));
    // The next notification asserts again; one edge per notification, no redundant calls.
    kick(&mut p);
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), VIRTIO_PCI_ISR_QUEUE as u64);
    assert_eq!((line.asserts(), line.deasserts(), line.calls()), (2, 2, 4));
    assert_eq!(p.f.metrics().bad_register_accesses, 0);
}

#[test]
fn config_change_sets_isr_bit_1_and_both_share_one_assertion() {
    let (mut p, line) = wired();
    p.bring_up(VIRTIO_MSI_NO_VECTOR);
    p.f.core_mut().config_changed();
    assert!(line.level());
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), VIRTIO_PCI_ISR_CONFIG as u64);
    assert!(!line.level());
    // Config change and used buffers before the driver reads: one edge, both bits.
    p.f.core_mut().config_changed();
    kick(&mut p);
    assert_eq!(
        p.f.isr_status(),
        VIRTIO_PCI_ISR_QUEUE | VIRTIO_PCI_ISR_CONFIG
    );
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), 3);
    assert_eq!((line.asserts(), line.deasserts(), line.calls()), (2, 2, 4));
}

#[test]
fn interrupt_disable_masks_the_line_and_status_still_shows_pending() {
    let (mut p, line) = wired();
    p.bring_up(VIRTIO_MSI_NO_VECTOR);
    intx_disable(&mut p, true);
    kick(&mut p);
    assert!(!line.level(), "Interrupt Disable holds the line low");
    assert!(
        interrupt_status(&mut p),
        "Interrupt Status reflects the pending interrupt"
    );
    assert_eq!(line.calls(), 0);
    intx_disable(&mut p, false);
    assert!(
        line.level(),
        "still pending: cleared Interrupt Disable raises the line"
    );
    intx_disable(&mut p, true);
    assert!(!line.level() && interrupt_status(&mut p));
    // Acknowledged while disabled: clearing Interrupt Disable raises nothing.
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), 1);
    assert!(!interrupt_status(&mut p));
    intx_disable(&mut p, false);
    assert!(!line.level());
    assert_eq!((line.asserts(), line.deasserts()), (1, 1));
}

#[test]
fn msix_enabled_stops_intx_use() {
    let (mut p, line) = wired();
    p.bring_up(0);
    kick(&mut p);
    assert!(line.level());
    // Enabling MSI-X: the function must not use INTA# (PCI 3.0 §6.8.3.3): line down.
    p.msix_program(0, 0x51);
    assert!(!line.level() && !interrupt_status(&mut p));
    kick(&mut p);
    assert_eq!(p.sink.vectors(), [0x51]);
    assert!(!line.level());
    // The ISR bit is still set in MSI-X mode (as QEMU does); reading it changes no line.
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), 1);
    // A queue without a vector under MSI-X: no interrupt at all.
    p.wr(0x16, 2, 0);
    p.wr(0x1a, 2, VIRTIO_MSI_NO_VECTOR as u64);
    kick(&mut p);
    assert_eq!(p.sink.vectors(), [0x51]);
    assert!(!line.level());
    // MSI-X off again: stale ISR bits raise nothing, the next notification uses INTA#.
    msix_enable(&mut p, false);
    assert!(!line.level());
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), 1);
    kick(&mut p);
    assert!(line.level());
    assert_eq!(p.sink.vectors(), [0x51]);
    assert_eq!((line.asserts(), line.deasserts()), (2, 1));
}

#[test]
fn reset_deasserts() {
    let (mut p, line) = wired();
    p.bring_up(VIRTIO_MSI_NO_VECTOR);
    kick(&mut p);
    assert!(line.level());
    p.wr(0x14, 1, 0); // device_status = 0: reset
    assert_eq!(p.status(), 0);
    assert!(!line.level() && !interrupt_status(&mut p));
    assert_eq!(p.f.isr_status(), 0);
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), 0);
    assert_eq!((line.asserts(), line.deasserts()), (1, 1));
}

#[test]
fn isr_read_through_the_pci_cfg_window_deasserts() {
    let (mut p, line) = wired();
    p.bring_up(VIRTIO_MSI_NO_VECTOR);
    kick(&mut p);
    let cap = pci_cfg_cap(&mut p);
    cfg_wr(&mut p, cap + 4, 1, 0); // cap.bar
    cfg_wr(&mut p, cap + 12, 4, 1); // cap.length
    cfg_wr(&mut p, cap + 8, 4, ISR_CFG_OFFSET as u32); // cap.offset
    assert_eq!(cfg(&mut p, cap + 16, 1), 1);
    assert!(!line.level());
    assert_eq!(p.f.metrics().bad_register_accesses, 0);
}

fn pci_cfg_cap(p: &mut Pci) -> u16 {
    p.f.config_space()
        .capabilities()
        .into_iter()
        .filter(|c| c.0 == cap_id::VENDOR_SPECIFIC)
        .map(|c| c.1)
        .find(|&at| p.f.config_space().get_u8(at + 3) == VIRTIO_PCI_CAP_PCI_CFG)
        .unwrap()
}

/// A guest access in the odd-access table.
#[derive(Clone, Copy, Debug)]
enum Access {
    /// BAR 0 read of `len` bytes at `offset`.
    Read(u64, usize),
    /// BAR 0 write.
    Write(u64, usize, u64),
    /// Configuration write.
    Config(u16, usize, u32),
    /// A `cap.length`-byte BAR read through the PCI configuration access window.
    Window(u32, u32),
}

/// Each access starts from a pending INTx interrupt (ISR = queue bit, line high) and must
/// leave exactly: the value read, the ISR, the line, the Interrupt Status bit and the
/// `bad_register_accesses` increment.
#[test]
fn odd_isr_and_intx_accesses() {
    use Access::*;
    let isr = ISR_CFG_OFFSET;
    #[rustfmt::skip]
    let table: &[(Access, u64, u8, bool, u64)] = &[
        // (access, value read, ISR after, line after, bad accesses)
        (Read(isr, 1), 1, 0, false, 0),         // the one ISR access
        (Read(isr, 2), 0, 1, true, 1),          // the ISR is one byte
        (Read(isr, 4), 0, 1, true, 1),
        (Read(isr, 8), 0, 1, true, 1),
        (Read(isr + 1, 1), 0, 1, true, 1),      // inside the ISR capability, not the ISR
        (Read(isr + 2, 2), 0, 1, true, 1),
        (Read(isr + 3, 1), 0, 1, true, 1),
        (Read(isr - 1, 1), 0, 1, true, 1),
        (Read(isr + 0x10, 1), 0, 1, true, 1),
        (Write(isr, 1, 0), 0, 1, true, 1),      // writes to the ISR are ignored
        (Write(isr, 1, 0xff), 0, 1, true, 1),
        (Write(isr, 4, 0), 0, 1, true, 1),
        (Write(isr + 1, 1, 0), 0, 1, true, 1),
        (Config(reg::INTERRUPT_PIN, 1, 0), 0, 1, true, 0), // read-only: pin stays INTA#
        (Config(reg::INTERRUPT_LINE, 1, 0xff), 0, 1, true, 0), // scratch: no effect
        (Config(reg::STATUS, 2, 0xffff), 0, 1, true, 0), // Interrupt Status is read-only
        (Window(isr as u32, 1), 1, 0, false, 0), // the ISR through the window: acknowledges
        (Window(isr as u32, 2), 0, 1, true, 1),  // a 2-byte ISR read through it
        (Window(isr as u32, 4), 0, 1, true, 1),
    ];
    for &(access, value, isr_after, level, bad) in table {
        let (mut p, line) = wired();
        p.bring_up(VIRTIO_MSI_NO_VECTOR);
        intx_disable(&mut p, false);
        kick(&mut p);
        assert!(line.level());
        let bad0 = p.f.metrics().bad_register_accesses;
        let got = match access {
            Read(off, len) => p.rd(off, len),
            Write(off, len, v) => {
                p.wr(off, len, v);
                0
            }
            Config(off, len, v) => {
                cfg_wr(&mut p, off, len, v);
                0
            }
            Window(off, len) => {
                let cap = pci_cfg_cap(&mut p);
                cfg_wr(&mut p, cap + 12, 4, len);
                cfg_wr(&mut p, cap + 8, 4, off);
                cfg(&mut p, cap + 16, len as usize) as u64
            }
        };
        let ctx = format!("{access:?}");
        assert_eq!(got, value, "{ctx}");
        assert_eq!(p.f.isr_status(), isr_after, "{ctx}");
        assert_eq!(line.level(), level, "{ctx}");
        assert_eq!(interrupt_status(&mut p), level, "{ctx}");
        assert_eq!(p.f.metrics().bad_register_accesses - bad0, bad, "{ctx}");
        assert_eq!(cfg(&mut p, reg::INTERRUPT_PIN, 1), 1, "{ctx}");
        assert_eq!(p.f.config_space().stats().bad_accesses, 0, "{ctx}");
        assert_eq!(p.status(), 0xf, "{ctx}");
        assert_eq!(line.asserts(), 1, "{ctx}");
    }
}

/// A device that keeps its activation, to look at the interrupt handle it was given.
#[derive(Default)]
struct Probe(Option<crate::Activation>);

impl crate::VirtioDevice for Probe {
    fn device_type(&self) -> u32 {
        4
    }
    fn device_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn activate(&mut self, a: crate::Activation) -> Result<(), crate::DeviceError> {
        self.0 = Some(a);
        Ok(())
    }
    fn queue_notify(&mut self, _: u16) -> Result<(), crate::DeviceError> {
        Ok(())
    }
    fn reset(&mut self) {
        self.0 = None;
    }
}

/// A device writing its irqfd directly would bypass INTx: while notifications go out as INTx
/// the handle offers no notifier (the device calls `signal`), under MSI-X it offers the
/// vector's irqfd.
#[test]
fn no_irqfd_notifier_while_intx_is_in_use() {
    use crate::InterruptCause;
    let mem =
        vm_memory::GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 64 << 20)]).unwrap();
    let sink = Arc::new(RecordingMsiSink::default());
    let msix = VirtioPciTransport::msix_for(&Probe::default(), sink.clone()).unwrap();
    let fd = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    msix.attach_irqfd(0, 24, Arc::new(fd)).unwrap();
    let line = Arc::new(RecordingIrqLine::default());
    let f = VirtioPciTransport::new(Probe::default(), mem.clone(), msix)
        .unwrap()
        .with_intx(line.clone());
    let mut p = Pci2 { f, line };
    p.bring_up();
    let irq = p.f.device().0.as_ref().unwrap().interrupt.clone();
    assert!(irq.notifier(InterruptCause::Queue(0)).is_none());
    irq.signal(InterruptCause::Queue(0)).unwrap();
    assert!(p.line.level());
    let cap = p.f.msix_cap();
    p.f.config_write(cap + 2, &0x8000u16.to_le_bytes());
    assert!(irq.notifier(InterruptCause::Queue(0)).is_some());
    assert!(
        irq.notifier(InterruptCause::Config).is_none(),
        "no config vector"
    );
    assert!(!p.line.level());
}

struct Pci2 {
    f: VirtioPciTransport<Probe>,
    line: Arc<RecordingIrqLine>,
}

impl Pci2 {
    fn bring_up(&mut self) {
        let w = |f: &mut VirtioPciTransport<Probe>, off: u64, v: &[u8]| f.bar_write(0, off, v);
        w(&mut self.f, 0x14, &[1]);
        w(&mut self.f, 0x14, &[3]);
        w(&mut self.f, 0x08, &1u32.to_le_bytes());
        w(&mut self.f, 0x0c, &1u32.to_le_bytes());
        w(&mut self.f, 0x14, &[0xb]);
        w(&mut self.f, 0x1a, &0u16.to_le_bytes()); // queue 0 → vector 0
        w(&mut self.f, 0x14, &[0xf]);
        assert!(self.f.core().is_activated());
    }
}

/// A driver action in the model test.
#[derive(Clone, Copy, Debug)]
enum Action {
    Kick,
    ConfigChanged,
    IsrRead,
    InterruptDisable(bool),
    MsixEnable(bool),
    Reset,
}

fn action() -> impl proptest::strategy::Strategy<Value = Action> {
    use proptest::prelude::*;
    prop_oneof![
        3 => Just(Action::Kick),
        2 => Just(Action::ConfigChanged),
        3 => Just(Action::IsrRead),
        2 => any::<bool>().prop_map(Action::InterruptDisable),
        2 => any::<bool>().prop_map(Action::MsixEnable),
        1 => Just(Action::Reset),
    ]
}

/// Bring the device up with queue 0 and configuration changes on MSI-X vector 0.
fn bring_up_with_vectors(p: &mut Pci) {
    p.bring_up(0);
    p.wr(0x10, 2, 0);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

    /// Random driver sequences against the spec's model (virtio 1.2 §4.1.4.5, §4.1.5.3/4,
    /// PCI 3.0 §6.2.3, §6.8.3.3): the ISR, the pending state (Interrupt Status), the line
    /// (pending and not disabled, driven only on a change) and the MSI count after every step.
    #[test]
    fn intx_follows_the_spec_model(actions in proptest::collection::vec(action(), 1..40)) {
        let (mut p, line) = wired();
        // Vector 0 programmed and unmasked while MSI-X is still disabled.
        let e = MSIX_TABLE_OFFSET as u64;
        for (off, v) in [(0, 0xfee0_0000u64), (4, 0), (8, 0x51), (12, 0)] {
            p.wr(e + off, 4, v);
        }
        bring_up_with_vectors(&mut p);
        let (mut isr, mut pending, mut disabled, mut msix, mut msis) = (0u8, false, false, false, 0);
        for a in actions {
            match a {
                Action::Kick | Action::ConfigChanged => {
                    if let Action::Kick = a {
                        kick(&mut p);
                        isr |= VIRTIO_PCI_ISR_QUEUE;
                    } else {
                        p.f.core_mut().config_changed();
                        isr |= VIRTIO_PCI_ISR_CONFIG;
                    }
                    if msix {
                        msis += 1;
                    } else {
                        pending = true;
                    }
                }
                Action::IsrRead => {
                    proptest::prop_assert_eq!(p.rd(ISR_CFG_OFFSET, 1), isr as u64);
                    isr = 0;
                    pending = false;
                }
                Action::InterruptDisable(d) => {
                    intx_disable(&mut p, d);
                    disabled = d;
                }
                Action::MsixEnable(on) => {
                    msix_enable(&mut p, on);
                    msix = on;
                    if on {
                        pending = false;
                    }
                }
                Action::Reset => {
                    p.wr(0x14, 1, 0);
                    isr = 0;
                    pending = false;
                    bring_up_with_vectors(&mut p);
                }
            }
            proptest::prop_assert_eq!(p.f.isr_status(), isr, "{:?}", a);
            proptest::prop_assert_eq!(p.f.intx_pending(), pending, "{:?}", a);
            proptest::prop_assert_eq!(interrupt_status(&mut p), pending, "{:?}", a);
            proptest::prop_assert_eq!(line.level(), pending && !disabled, "{:?}", a);
            proptest::prop_assert_eq!(line.calls(), line.asserts() + line.deasserts());
            proptest::prop_assert_eq!(p.sink.sent().len(), msis, "{:?}", a);
        }
        proptest::prop_assert_eq!(p.f.metrics().bad_register_accesses, 0);
    }
}
