//! The IDT checks of software-event delivery at VM entry.
//!
//! VM entry delivers an injected event "exactly as if it had been generated normally" (SDM
//! vol. 3C §27.6.1, "Vectored-Event Injection"). For the three software types that includes the
//! checks `INT n`, `INT3`, `INTO` and `INT1` make on the IDT gate in protected and IA-32e mode
//! (SDM vol. 2, `INT n` operation):
//!
//! 1. the gate must lie inside the IDT limit (`vector·8 + 7`, or `vector·16 + 15` in IA-32e
//!    mode) and be an interrupt, trap or (not in IA-32e mode) task gate, else **#GP**;
//! 2. for a software interrupt (type 4, `INT n`) or software exception (type 6, `INT3`/`INTO`)
//!    the gate's DPL must be at least CPL, else **#GP** — a privileged software exception
//!    (type 5, `INT1`) skips this check;
//! 3. the gate must be present, else **#NP**.
//!
//! The error code names the gate: `vector·8 + 2` (IDT bit) plus the EXT bit, which is clear for
//! types 4 and 6 and set for type 5 (§27.6.1.1). A fault found here replaces the event, and the
//! return address it pushes is the current guest RIP, not RIP + instruction length
//! (§27.6.1.1).
//!
//! What is modelled and what is left to the delivery KVM performs:
//!
//! * real-address mode (CR0.PE = 0): no gate checks apply to software events beyond the IVT
//!   limit, whose #GP pushes no error code and so looks the same whoever raises it — nothing is
//!   checked here;
//! * virtual-8086 mode with CR4.VME = 1: an injected `INT n` may be redirected through the TSS
//!   interrupt-redirection bitmap; that is not modelled and the event is delivered as injected
//!   ([`EventDelivery::NotChecked`]). Without VME the protected-mode rules apply (CPL 3), and
//!   as the SDM says for injection, no IOPL check is made;
//! * a gate that cannot be read (its page is not mapped) is reported as
//!   [`EventDelivery::GateUnreadable`] and delivered as injected: KVM's own delivery raises the
//!   page fault;
//! * the checks after the gate — its code-segment selector, the stack switch through the TSS,
//!   a task gate's TSS — are made by KVM's delivery, which treats the event like a hardware
//!   one (EXT set in those error codes, RIP + length pushed). The high half of a 16-byte gate
//!   only supplies offset bits 63:32; its reserved bits are not checked.
//!
//! ```
//! use vmkit_vcpu::vmcs::delivery::{
//!     DeliveryContext, EventDelivery, GateFault, GateFaultReason, IdtMode,
//!     software_event_delivery,
//! };
//! use vmkit_vcpu::vmcs::{DescriptorTable, InterruptionInfo};
//!
//! // A 64-bit IDT at 0x1000 whose vector 0x80 is a present DPL-0 interrupt gate.
//! let ctx = DeliveryContext::new(
//!     IdtMode::Long,
//!     3,
//!     DescriptorTable { base: 0x1000, limit: 0xfff },
//! );
//! let gate = |addr: u64, buf: &mut [u8]| {
//!     assert_eq!((addr, buf.len()), (0x1000 + 0x80 * 16, 16));
//!     buf.fill(0);
//!     buf[5] = 0x8e; // P = 1, DPL = 0, type 14
//!     true
//! };
//! // `INT 0x80` from ring 3 through a DPL-0 gate raises #GP(0x80·8 + 2).
//! let d = software_event_delivery(InterruptionInfo::software_interrupt(0x80), &ctx, gate);
//! assert_eq!(
//!     d,
//!     EventDelivery::Fault(GateFault {
//!         vector: 13,
//!         error_code: 0x402,
//!         reason: GateFaultReason::Privilege,
//!     })
//! );
//! ```

use serde::{Deserialize, Serialize};

use super::checks::{CR0_PE, RFLAGS_VM};
use super::{DescriptorTable, InterruptionInfo, InterruptionType, Vmcs};

/// #NP: segment not present.
pub const EXCEPTION_NP: u8 = 11;
/// #GP: general protection.
pub const EXCEPTION_GP: u8 = 13;
/// Error-code bit 0, EXT: the fault arose while delivering an event external to the program.
pub const ERROR_CODE_EXT: u32 = 1 << 0;
/// Error-code bit 1, IDT: the index refers to a gate in the IDT.
pub const ERROR_CODE_IDT: u32 = 1 << 1;
/// CR4.VME: virtual-8086 mode extensions.
pub const CR4_VME: u64 = 1 << 0;

/// System-descriptor type 5: task gate (not in IA-32e mode).
pub const GATE_TYPE_TASK: u8 = 0x5;
/// Type 6: 16-bit interrupt gate (not in IA-32e mode).
pub const GATE_TYPE_INTERRUPT_16: u8 = 0x6;
/// Type 7: 16-bit trap gate (not in IA-32e mode).
pub const GATE_TYPE_TRAP_16: u8 = 0x7;
/// Type 14: 32-bit interrupt gate (64-bit in IA-32e mode).
pub const GATE_TYPE_INTERRUPT: u8 = 0xe;
/// Type 15: 32-bit trap gate (64-bit in IA-32e mode).
pub const GATE_TYPE_TRAP: u8 = 0xf;

/// How the IDT is laid out for the guest's operating mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum IdtMode {
    /// CR0.PE = 0: the IVT of 4-byte vectors; software events are not checked.
    Real,
    /// Protected mode (including virtual-8086 mode): 8-byte gates.
    Protected,
    /// IA-32e mode: 16-byte gates.
    Long,
}

impl IdtMode {
    /// Size of one IDT entry in bytes.
    pub const fn gate_size(self) -> u64 {
        match self {
            Self::Real => 4,
            Self::Protected => 8,
            Self::Long => 16,
        }
    }
}

/// The guest state software-event delivery depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryContext {
    /// Operating mode (IDT entry format).
    pub mode: IdtMode,
    /// Current privilege level (SS.DPL on VM entry).
    pub cpl: u8,
    /// IDTR.
    pub idtr: DescriptorTable,
    /// RFLAGS.VM = CR4.VME = 1: `INT n` may be redirected by the TSS bitmap (not modelled).
    pub vme_redirection: bool,
}

impl DeliveryContext {
    /// A context without virtual-8086 redirection.
    pub const fn new(mode: IdtMode, cpl: u8, idtr: DescriptorTable) -> Self {
        Self {
            mode,
            cpl,
            idtr,
            vme_redirection: false,
        }
    }
}

/// An IDT gate descriptor's fields (8-byte protected-mode or 16-byte IA-32e format).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IdtGate {
    /// Type (bits 43:40).
    pub type_: u8,
    /// S (bit 44): 1 would make it a code/data descriptor, never a gate.
    pub s: bool,
    /// DPL (bits 46:45).
    pub dpl: u8,
    /// P (bit 47).
    pub present: bool,
    /// Target code-segment selector (TSS selector for a task gate).
    pub selector: u16,
    /// Handler offset (bits 63:32 from the high half in IA-32e mode).
    pub offset: u64,
}

impl IdtGate {
    /// Decode the first 8 bytes of `bytes` (and, for `Long`, bytes 8..16 for the offset's high
    /// half); `None` if `bytes` is shorter than `mode`'s gate size or `mode` is `Real`.
    pub fn decode(mode: IdtMode, bytes: &[u8]) -> Option<Self> {
        let lo = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
        let hi = match mode {
            IdtMode::Real => return None,
            IdtMode::Protected => 0,
            IdtMode::Long => u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as u64,
        };
        let attr = (lo >> 40) as u8;
        Some(Self {
            type_: attr & 0xf,
            s: attr & 0x10 != 0,
            dpl: (attr >> 5) & 3,
            present: attr & 0x80 != 0,
            selector: (lo >> 16) as u16,
            offset: (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi << 32),
        })
    }

    /// Whether the descriptor is a gate an event can be delivered through in `mode`.
    pub fn is_idt_gate(&self, mode: IdtMode) -> bool {
        !self.s
            && match mode {
                IdtMode::Real => false,
                IdtMode::Protected => matches!(
                    self.type_,
                    GATE_TYPE_TASK
                        | GATE_TYPE_INTERRUPT_16
                        | GATE_TYPE_TRAP_16
                        | GATE_TYPE_INTERRUPT
                        | GATE_TYPE_TRAP
                ),
                IdtMode::Long => matches!(self.type_, GATE_TYPE_INTERRUPT | GATE_TYPE_TRAP),
            }
    }
}

/// Which gate check failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GateFaultReason {
    /// The gate's last byte lies beyond the IDT limit (#GP).
    BeyondLimit,
    /// The descriptor is not an interrupt, trap or task gate for the mode (#GP).
    NotAGate,
    /// Gate DPL < CPL for `INT n`, `INT3` or `INTO` (#GP, EXT clear).
    Privilege,
    /// The gate is not present (#NP).
    NotPresent,
}

/// The exception delivered instead of an injected software event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GateFault {
    /// [`EXCEPTION_GP`] or [`EXCEPTION_NP`].
    pub vector: u8,
    /// `event vector·8 + 2` plus [`ERROR_CODE_EXT`] for a privileged software exception.
    pub error_code: u32,
    /// The failed check.
    pub reason: GateFaultReason,
}

impl GateFault {
    /// The fault as VM-entry interruption information (a hardware exception with error code).
    pub const fn interruption_info(&self) -> InterruptionInfo {
        InterruptionInfo::new(self.vector, InterruptionType::HardwareException, true)
    }
}

/// What delivering an injected event through the IDT does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventDelivery {
    /// Nothing to check: no event, not a software event, real-address mode, or an `INT n`
    /// subject to virtual-8086 redirection. Delivered as injected.
    NotChecked,
    /// The gate checks pass: delivered as injected (RIP + instruction length pushed).
    Delivered(IdtGate),
    /// The gate at this linear address could not be read: delivered as injected.
    GateUnreadable {
        /// Linear address of the gate.
        address: u64,
    },
    /// A gate check fails: this exception is delivered instead, pushing the current RIP.
    Fault(GateFault),
}

/// The outcome of delivering injected event `info` through the IDT in `ctx`.
///
/// `read_gate(linear_address, buf)` fills `buf` (the gate size of `ctx.mode`) with the gate's
/// bytes and returns false if they cannot be read; it is called at most once, only for a
/// software event whose gate lies inside the IDT limit.
pub fn software_event_delivery(
    info: InterruptionInfo,
    ctx: &DeliveryContext,
    read_gate: impl FnOnce(u64, &mut [u8]) -> bool,
) -> EventDelivery {
    let ext = match info.kind {
        InterruptionType::SoftwareInterrupt | InterruptionType::SoftwareException => 0,
        InterruptionType::PrivilegedSoftwareException => ERROR_CODE_EXT,
        _ => return EventDelivery::NotChecked,
    };
    if ctx.mode == IdtMode::Real
        || (ctx.vme_redirection && info.kind == InterruptionType::SoftwareInterrupt)
    {
        return EventDelivery::NotChecked;
    }
    let fault = |vector, ext, reason| {
        EventDelivery::Fault(GateFault {
            vector,
            error_code: (info.vector as u32) << 3 | ERROR_CODE_IDT | ext,
            reason,
        })
    };
    let size = ctx.mode.gate_size();
    let last = info.vector as u64 * size + size - 1;
    if last > ctx.idtr.limit as u64 {
        return fault(EXCEPTION_GP, ext, GateFaultReason::BeyondLimit);
    }
    let mut address = ctx.idtr.base.wrapping_add(info.vector as u64 * size);
    if ctx.mode == IdtMode::Protected {
        address &= 0xffff_ffff;
    }
    let mut buf = [0u8; 16];
    let bytes = &mut buf[..size as usize];
    if !read_gate(address, bytes) {
        return EventDelivery::GateUnreadable { address };
    }
    let Some(gate) = IdtGate::decode(ctx.mode, bytes) else {
        return EventDelivery::GateUnreadable { address };
    };
    if !gate.is_idt_gate(ctx.mode) {
        return fault(EXCEPTION_GP, ext, GateFaultReason::NotAGate);
    }
    if ext == 0 && gate.dpl < ctx.cpl {
        return fault(EXCEPTION_GP, 0, GateFaultReason::Privilege);
    }
    if !gate.present {
        return fault(EXCEPTION_NP, ext, GateFaultReason::NotPresent);
    }
    EventDelivery::Delivered(gate)
}

impl Vmcs {
    /// The guest state event delivery depends on: IA-32e mode from the "IA-32e mode guest"
    /// entry control, real-address mode when CR0.PE = 0 under "unrestricted guest", CPL =
    /// SS.DPL, the guest IDTR, and virtual-8086 redirection from RFLAGS.VM and CR4.VME (as the
    /// guest sees CR4).
    pub fn delivery_context(&self) -> DeliveryContext {
        let g = &self.guest;
        let mode = if self.ia32e_mode_guest() {
            IdtMode::Long
        } else if self.unrestricted_guest() && g.cr0 & CR0_PE == 0 {
            IdtMode::Real
        } else {
            IdtMode::Protected
        };
        DeliveryContext {
            mode,
            cpl: self.cpl(),
            idtr: g.idtr,
            vme_redirection: g.rflags & RFLAGS_VM != 0 && self.guest_visible_cr4() & CR4_VME != 0,
        }
    }

    /// What delivering the VM-entry injection (if any) through the guest IDT does, reading the
    /// gate with `read_gate` (see [`software_event_delivery`]).
    pub fn software_event_delivery(
        &self,
        read_gate: impl FnOnce(u64, &mut [u8]) -> bool,
    ) -> EventDelivery {
        match self.entry_interruption() {
            Some(info) => software_event_delivery(info, &self.delivery_context(), read_gate),
            None => EventDelivery::NotChecked,
        }
    }
}

#[cfg(test)]
mod tests;
