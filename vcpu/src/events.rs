//! Event injection with VM-entry interruption-information semantics (SDM vol. 3C §27.6) and
//! interrupt-window handling.
//!
//! [`inject`] takes an [`InterruptionInfo`] (external interrupt, NMI, hardware exception with or
//! without error code, software interrupt), checks it against the vCPU's current guest state
//! with the VM-entry rules (RFLAGS.IF = 1 and no STI/MOV SS shadow for external interrupts, the
//! error-code rules, vector ranges …) and hands it to KVM for the next entry.
//!
//! External interrupts usually arrive when the guest cannot take them. [`InterruptQueue`] holds
//! them: before each entry the run loop either injects the oldest one (window open) or asks KVM
//! for an interrupt-window exit, as a VMM sets "interrupt-window exiting" on VMX. Each raised
//! interrupt is injected exactly once, in order.
//!
//! [`inject`] has no guest memory, so a software event goes to KVM unchecked, and KVM delivers
//! it like a hardware event. [`inject_through_idt`] also reads the event's IDT gate and makes
//! the checks VM entry makes for `INT n`, `INT3`, `INTO` and `INT1` (limit, gate type, DPL ≥
//! CPL, present; see [`crate::vmcs::delivery`]), injecting the resulting #GP/#NP instead.
//!
//! The rules are those of VM entry, so they can be tried on a plain [`Vmcs`]:
//!
//! ```
//! use vmkit_vcpu::Vmcs;
//! use vmkit_vcpu::events::{InterruptQueue, WindowAction};
//! use vmkit_vcpu::vmcs::checks::{GuestStateError, check_guest_state};
//! use vmkit_vcpu::vmcs::InterruptionInfo;
//!
//! let mut vmcs = Vmcs::flat_64(0x9000, 0x10_0000, 0x8_0000); // RFLAGS.IF = 0
//! // #GP with error code 0x18: deliverable.
//! vmcs.inject(InterruptionInfo::hardware_exception(13), 0x18, 0);
//! check_guest_state(&vmcs).unwrap();
//! // An external interrupt while IF = 0 is refused: it must wait for an interrupt window.
//! vmcs.inject(InterruptionInfo::external_interrupt(0x20), 0, 0);
//! assert_eq!(check_guest_state(&vmcs), Err(GuestStateError::RflagsIfClearForInterrupt));
//!
//! // So it goes to the queue, which asks for a window until the guest can take it.
//! struct Guest { window_open: bool, asked: bool, got: Vec<u8> }
//! impl vmkit_vcpu::VcpuInterruptWindow for Guest {
//!     fn interrupt_window_open(&mut self) -> bool { self.window_open }
//!     fn request_interrupt_window(&mut self, on: bool) { self.asked = on }
//!     fn inject_external_interrupt(&mut self, v: u8) -> Result<(), vmkit_vcpu::Error> {
//!         self.got.push(v);
//!         Ok(())
//!     }
//! }
//! let irqs = InterruptQueue::new();
//! irqs.raise(0x20);
//! let mut g = Guest { window_open: false, asked: false, got: vec![] };
//! assert_eq!(irqs.before_entry(&mut g)?, WindowAction::WindowRequested);
//! g.window_open = true; // the guest executed STI and one more instruction
//! assert_eq!(irqs.before_entry(&mut g)?, WindowAction::Injected(0x20));
//! assert_eq!(irqs.before_entry(&mut g)?, WindowAction::Idle);
//! assert_eq!(g.got, [0x20]); // exactly once
//! # Ok::<(), vmkit_vcpu::Error>(())
//! ```
//!
//! On KVM:
//!
//! ```no_run
//! use vmkit_vcpu::events::{InterruptQueue, inject};
//! use vmkit_vcpu::vmcs::InterruptionInfo;
//! # fn demo(vcpu: &mut vmkit_vcpu::KvmVcpu) -> Result<(), vmkit_vcpu::Error> {
//! // #GP(0x18) at the next entry.
//! inject(vcpu, InterruptionInfo::hardware_exception(13), 0x18, 0)?;
//! // External interrupts whenever the guest can take them: run with
//! // control::run_controlled(…, RunControl::new()?.with_interrupts(irqs.clone())).
//! let irqs = InterruptQueue::new();
//! irqs.raise(0x20);
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::kvm_ext::read_guest_state;
use crate::kvm_map::KvmGuestState;
use crate::vmcs::delivery::EventDelivery;
use crate::vmcs::{InterruptionInfo, Vmcs};
use crate::{Error, VcpuGuestState, VcpuInterruptWindow};

/// Inject `info` (with `error_code` and, for software events, `instruction_length`) at the next
/// VM entry of `vcpu`. The current guest state plus the event must pass the VM-entry checks
/// ([`crate::vmcs::checks`]); otherwise nothing is injected and the violated rule is returned.
/// Software events are not checked against their IDT gate: see [`inject_through_idt`].
pub fn inject<V: VcpuGuestState + ?Sized>(
    vcpu: &mut V,
    info: InterruptionInfo,
    error_code: u32,
    instruction_length: u32,
) -> Result<(), Error> {
    inject_mapped(vcpu, info, error_code, instruction_length, |vmcs, _| {
        Ok((vmcs.to_kvm()?, ()))
    })
}

/// Read the vCPU's state, add the event, map it with `map` and write back what injection
/// changes: the registers (RIP advanced past a software event) and the vCPU events.
fn inject_mapped<V: VcpuGuestState + ?Sized, R>(
    vcpu: &mut V,
    info: InterruptionInfo,
    error_code: u32,
    instruction_length: u32,
    map: impl FnOnce(&Vmcs, &V) -> Result<(KvmGuestState, R), Error>,
) -> Result<R, Error> {
    let mut vmcs = Vmcs::from_kvm(&read_guest_state(vcpu)?);
    vmcs.inject(info, error_code, instruction_length);
    let (k, r) = map(&vmcs, vcpu)?;
    if info.kind.is_software() {
        vcpu.set_regs(&k.regs)?;
    }
    vcpu.set_vcpu_events(&k.events)?;
    Ok(r)
}

/// [`inject`] with the IDT checks of software-event delivery ([`crate::vmcs::delivery`]):
/// `read_gate(vcpu, linear_address, buf)` reads the event's IDT gate — on KVM with
/// [`KvmVcpu::read_guest_linear`](crate::KvmVcpu::read_guest_linear). A software interrupt
/// or software exception through a gate whose DPL is below CPL, a not-present gate or one
/// beyond the IDT limit injects the #GP/#NP VM entry would deliver (error code `vector·8 + 2`,
/// + EXT for `INT1`) at the current RIP instead. Returns what the delivery will do.
///
/// ```no_run
/// use vmkit_vcpu::events::inject_through_idt;
/// use vmkit_vcpu::vmcs::InterruptionInfo;
/// # fn demo(vcpu: &mut vmkit_vcpu::KvmVcpu, mem: &vm_memory::GuestMemoryMmap)
/// #     -> Result<(), vmkit_vcpu::Error> {
/// // `INT 0x80` as if a 2-byte `int 0x80` preceded the current RIP.
/// let d = inject_through_idt(vcpu, InterruptionInfo::software_interrupt(0x80), 0, 2, |v, a, b| {
///     v.read_guest_linear(mem, a, b)
/// })?;
/// println!("{d:?}");
/// # Ok(()) }
/// ```
pub fn inject_through_idt<V: VcpuGuestState + ?Sized>(
    vcpu: &mut V,
    info: InterruptionInfo,
    error_code: u32,
    instruction_length: u32,
    read_gate: impl FnOnce(&V, u64, &mut [u8]) -> bool,
) -> Result<EventDelivery, Error> {
    inject_mapped(vcpu, info, error_code, instruction_length, |vmcs, v| {
        Ok(vmcs.to_kvm_through_idt(|a, buf| read_gate(v, a, buf))?)
    })
}

#[derive(Debug, Default)]
struct Inner {
    pending: Mutex<VecDeque<u8>>,
    len: AtomicUsize,
}

/// Pending external interrupts for one vCPU, shared with whoever raises them (devices, other
/// threads). Checking an empty queue costs one atomic load.
///
/// ```
/// use vmkit_vcpu::events::InterruptQueue;
/// let q = InterruptQueue::new();
/// let device_side = q.clone();
/// device_side.raise(0x21);
/// device_side.raise(0x20);
/// assert_eq!(q.pending(), 2);
/// ```
#[derive(Clone, Debug, Default)]
pub struct InterruptQueue(Arc<Inner>);

/// What [`InterruptQueue::before_entry`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowAction {
    /// Nothing pending.
    Idle,
    /// Injected this vector.
    Injected(u8),
    /// The guest cannot take an interrupt now; an interrupt-window exit was requested.
    WindowRequested,
}

impl InterruptQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queue external interrupt `vector`.
    pub fn raise(&self, vector: u8) {
        let mut q = self.0.pending.lock().unwrap_or_else(|e| e.into_inner());
        q.push_back(vector);
        self.0.len.store(q.len(), Ordering::Release);
    }

    /// Interrupts not yet injected.
    #[inline]
    pub fn pending(&self) -> usize {
        self.0.len.load(Ordering::Acquire)
    }

    /// Call before every entry: inject the oldest pending interrupt if the last exit reported
    /// an open window, otherwise request an interrupt-window exit. Keeps the window request on
    /// while more interrupts wait.
    #[inline]
    pub fn before_entry<V: VcpuInterruptWindow + ?Sized>(
        &self,
        vcpu: &mut V,
    ) -> Result<WindowAction, Error> {
        if self.pending() == 0 {
            vcpu.request_interrupt_window(false);
            return Ok(WindowAction::Idle);
        }
        if !vcpu.interrupt_window_open() {
            vcpu.request_interrupt_window(true);
            return Ok(WindowAction::WindowRequested);
        }
        let mut q = self.0.pending.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&vector) = q.front() else {
            vcpu.request_interrupt_window(false);
            return Ok(WindowAction::Idle);
        };
        vcpu.inject_external_interrupt(vector)?;
        q.pop_front();
        self.0.len.store(q.len(), Ordering::Release);
        vcpu.request_interrupt_window(!q.is_empty());
        Ok(WindowAction::Injected(vector))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct FakeWindow {
        open: bool,
        requested: bool,
        injected: Vec<u8>,
    }

    impl VcpuInterruptWindow for FakeWindow {
        fn interrupt_window_open(&mut self) -> bool {
            self.open
        }
        fn request_interrupt_window(&mut self, on: bool) {
            self.requested = on;
        }
        fn inject_external_interrupt(&mut self, vector: u8) -> Result<(), Error> {
            self.open = false; // KVM reports "not ready" until it is delivered
            self.injected.push(vector);
            Ok(())
        }
    }

    #[test]
    fn queued_until_window_then_each_once_in_order() {
        let q = InterruptQueue::new();
        let mut v = FakeWindow::default();
        assert_eq!(q.before_entry(&mut v).unwrap(), WindowAction::Idle);
        q.raise(0x20);
        q.raise(0x21);
        assert_eq!(
            q.before_entry(&mut v).unwrap(),
            WindowAction::WindowRequested
        );
        assert!(v.requested && v.injected.is_empty());
        v.open = true;
        assert_eq!(
            q.before_entry(&mut v).unwrap(),
            WindowAction::Injected(0x20)
        );
        assert!(v.requested, "second interrupt still waits");
        assert_eq!(
            q.before_entry(&mut v).unwrap(),
            WindowAction::WindowRequested
        );
        v.open = true;
        assert_eq!(
            q.before_entry(&mut v).unwrap(),
            WindowAction::Injected(0x21)
        );
        assert!(!v.requested);
        assert_eq!(q.before_entry(&mut v).unwrap(), WindowAction::Idle);
        assert_eq!(v.injected, [0x20, 0x21]);
        assert_eq!(q.pending(), 0);
    }
}
