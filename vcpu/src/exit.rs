//! Typed vCPU exits and per-kind exit statistics.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why the vCPU stopped running guest code.
///
/// Guest I/O is returned as a borrowed access into the exit buffer (complete reads by filling
/// `data`); every other exit is owned data ([`Exit`]) that can be kept, sent or logged.
#[derive(Debug)]
pub enum VcpuExit<'a> {
    /// `in` from an I/O port: fill `data`.
    ///
    /// `data.len()` is a multiple of `size`: string I/O (`rep insb/insw/insd`) reports
    /// `data.len() / size` consecutive port reads of `size` bytes in one exit. Use
    /// [`chunks_mut(size)`](slice::chunks_mut) or the run loop, which does so.
    PioRead {
        /// Port number.
        port: u16,
        /// Width of one access: 1, 2 or 4 bytes.
        size: u8,
        /// Bytes to fill in.
        data: &'a mut [u8],
    },
    /// `out` to an I/O port.
    ///
    /// `data.len()` is a multiple of `size`: string I/O (`rep outsb/outsw/outsd`) reports
    /// `data.len() / size` consecutive port writes of `size` bytes in one exit.
    PioWrite {
        /// Port number.
        port: u16,
        /// Width of one access: 1, 2 or 4 bytes.
        size: u8,
        /// Bytes written by the guest.
        data: &'a [u8],
    },
    /// A load from an address no memory slot backs: fill `data`.
    MmioRead {
        /// Guest physical address.
        addr: u64,
        /// Bytes to fill in.
        data: &'a mut [u8],
    },
    /// A store to an address no memory slot backs.
    MmioWrite {
        /// Guest physical address.
        addr: u64,
        /// Bytes written by the guest.
        data: &'a [u8],
    },
    /// Anything that is not guest I/O.
    Other(Exit),
}

/// A non-I/O exit, as owned data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Exit {
    /// The guest executed `hlt` (and no in-kernel LAPIC handled it).
    Hlt,
    /// Triple fault or other shutdown condition.
    Shutdown,
    /// A debug exception or breakpoint the VMM asked to intercept.
    Debug {
        /// Exception vector (1 = #DB, 3 = #BP).
        exception: u32,
        /// Guest RIP.
        pc: u64,
        /// DR6 at the exit.
        dr6: u64,
        /// DR7 at the exit.
        dr7: u64,
    },
    /// `vmcall`/`vmmcall` forwarded by KVM_CAP_EXIT_HYPERCALL.
    Hypercall {
        /// Hypercall number (RAX).
        nr: u64,
        /// Arguments.
        args: [u64; 6],
    },
    /// VM entry failed.
    FailEntry {
        /// Hardware entry-failure reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// KVM could not handle the exit (e.g. an instruction its emulator rejects).
    InternalError {
        /// KVM_INTERNAL_ERROR_* suberror (1 = emulation failure).
        suberror: u32,
        /// Extra data KVM reports (for emulation failures, instruction bytes among them).
        data: Vec<u64>,
    },
    /// A system event (reset, shutdown, crash) requested by the guest.
    SystemEvent {
        /// KVM_SYSTEM_EVENT_* type.
        kind: u32,
        /// Event data.
        data: Vec<u64>,
    },
    /// End of interrupt for a level-triggered vector (split irqchip).
    IoapicEoi {
        /// The vector.
        vector: u8,
    },
    /// The guest can accept an interrupt now (requested interrupt window).
    IrqWindowOpen,
    /// KVM_RUN returned early (signal or `immediate_exit`).
    Interrupted,
    /// RDMSR of an MSR that KVM forwards to userspace (KVM_CAP_X86_USER_SPACE_MSR: filtered,
    /// unknown or invalid). Answer with `KvmVcpu::complete_msr_read` or
    /// `KvmVcpu::fail_msr_access` before the next run; unanswered reads return 0.
    MsrRead {
        /// MSR index (ECX).
        index: u32,
        /// KVM_MSR_EXIT_REASON_* bits.
        reason: u32,
    },
    /// WRMSR forwarded to userspace; `KvmVcpu::fail_msr_access` makes it raise #GP.
    MsrWrite {
        /// MSR index (ECX).
        index: u32,
        /// Value written (EDX:EAX).
        data: u64,
        /// KVM_MSR_EXIT_REASON_* bits.
        reason: u32,
    },
    /// An exit this crate does not decode; the raw KVM_EXIT_* number.
    Unsupported(u32),
}

/// Exit kinds, for statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum ExitKind {
    /// [`VcpuExit::PioRead`].
    PioRead,
    /// [`VcpuExit::PioWrite`].
    PioWrite,
    /// [`VcpuExit::MmioRead`].
    MmioRead,
    /// [`VcpuExit::MmioWrite`].
    MmioWrite,
    /// [`Exit::Hlt`].
    Hlt,
    /// [`Exit::Shutdown`].
    Shutdown,
    /// [`Exit::Debug`].
    Debug,
    /// [`Exit::Hypercall`].
    Hypercall,
    /// [`Exit::FailEntry`].
    FailEntry,
    /// [`Exit::InternalError`].
    InternalError,
    /// [`Exit::SystemEvent`].
    SystemEvent,
    /// [`Exit::IoapicEoi`].
    IoapicEoi,
    /// [`Exit::IrqWindowOpen`].
    IrqWindowOpen,
    /// [`Exit::Interrupted`].
    Interrupted,
    /// [`Exit::Unsupported`].
    Unsupported,
    /// [`Exit::MsrRead`].
    MsrRead,
    /// [`Exit::MsrWrite`].
    MsrWrite,
}

impl ExitKind {
    /// Every kind, in declaration order.
    pub const ALL: [ExitKind; 17] = [
        ExitKind::PioRead,
        ExitKind::PioWrite,
        ExitKind::MmioRead,
        ExitKind::MmioWrite,
        ExitKind::Hlt,
        ExitKind::Shutdown,
        ExitKind::Debug,
        ExitKind::Hypercall,
        ExitKind::FailEntry,
        ExitKind::InternalError,
        ExitKind::SystemEvent,
        ExitKind::IoapicEoi,
        ExitKind::IrqWindowOpen,
        ExitKind::Interrupted,
        ExitKind::Unsupported,
        ExitKind::MsrRead,
        ExitKind::MsrWrite,
    ];

    /// The basic VMX exit reason this kind corresponds to (see [`crate::kvm_map::exit_information`]),
    /// so per-kind counts read as per-reason counts.
    ///
    /// ```
    /// use vmkit_vcpu::ExitKind;
    /// use vmkit_vcpu::vmcs::ExitReason;
    /// assert_eq!(ExitKind::PioWrite.exit_reason(), Some(ExitReason::IoInstruction));
    /// assert_eq!(ExitKind::MmioRead.exit_reason(), Some(ExitReason::EptViolation));
    /// assert_eq!(ExitKind::InternalError.exit_reason(), None);
    /// ```
    pub const fn exit_reason(self) -> Option<crate::vmcs::ExitReason> {
        use crate::vmcs::ExitReason as R;
        Some(match self {
            ExitKind::PioRead | ExitKind::PioWrite => R::IoInstruction,
            ExitKind::MmioRead | ExitKind::MmioWrite => R::EptViolation,
            ExitKind::Hlt => R::Hlt,
            ExitKind::Shutdown => R::TripleFault,
            ExitKind::Debug => R::ExceptionOrNmi,
            ExitKind::Hypercall => R::Vmcall,
            ExitKind::FailEntry => R::EntryFailureGuestState,
            ExitKind::IrqWindowOpen => R::InterruptWindow,
            ExitKind::Interrupted => R::ExternalInterrupt,
            ExitKind::MsrRead => R::Rdmsr,
            ExitKind::MsrWrite => R::Wrmsr,
            ExitKind::InternalError
            | ExitKind::SystemEvent
            | ExitKind::IoapicEoi
            | ExitKind::Unsupported => return None,
        })
    }

    /// A short lowercase name (`"pio-write"` …).
    pub const fn name(self) -> &'static str {
        match self {
            ExitKind::PioRead => "pio-read",
            ExitKind::PioWrite => "pio-write",
            ExitKind::MmioRead => "mmio-read",
            ExitKind::MmioWrite => "mmio-write",
            ExitKind::Hlt => "hlt",
            ExitKind::Shutdown => "shutdown",
            ExitKind::Debug => "debug",
            ExitKind::Hypercall => "hypercall",
            ExitKind::FailEntry => "fail-entry",
            ExitKind::InternalError => "internal-error",
            ExitKind::SystemEvent => "system-event",
            ExitKind::IoapicEoi => "ioapic-eoi",
            ExitKind::IrqWindowOpen => "irq-window-open",
            ExitKind::Interrupted => "interrupted",
            ExitKind::Unsupported => "unsupported",
            ExitKind::MsrRead => "msr-read",
            ExitKind::MsrWrite => "msr-write",
        }
    }
}

impl Exit {
    /// The kind of this exit.
    pub fn kind(&self) -> ExitKind {
        match self {
            Exit::Hlt => ExitKind::Hlt,
            Exit::Shutdown => ExitKind::Shutdown,
            Exit::Debug { .. } => ExitKind::Debug,
            Exit::Hypercall { .. } => ExitKind::Hypercall,
            Exit::FailEntry { .. } => ExitKind::FailEntry,
            Exit::InternalError { .. } => ExitKind::InternalError,
            Exit::SystemEvent { .. } => ExitKind::SystemEvent,
            Exit::IoapicEoi { .. } => ExitKind::IoapicEoi,
            Exit::IrqWindowOpen => ExitKind::IrqWindowOpen,
            Exit::Interrupted => ExitKind::Interrupted,
            Exit::Unsupported(_) => ExitKind::Unsupported,
            Exit::MsrRead { .. } => ExitKind::MsrRead,
            Exit::MsrWrite { .. } => ExitKind::MsrWrite,
        }
    }

    /// For an emulation failure that carries them (KVM_INTERNAL_ERROR_EMULATION with
    /// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES), the bytes KVM fetched at the
    /// failing RIP — the instruction it could not emulate comes first: `data[0]` = flags, then a
    /// length byte and up to 15 bytes.
    ///
    /// ```
    /// use vmkit_vcpu::Exit;
    /// // `int3` (0xcc), 1 byte.
    /// let e = Exit::InternalError { suberror: 1, data: vec![1, 0xcc01, 0] };
    /// assert_eq!(e.instruction_bytes(), Some(vec![0xcc]));
    /// assert_eq!(Exit::Hlt.instruction_bytes(), None);
    /// ```
    pub fn instruction_bytes(&self) -> Option<Vec<u8>> {
        let Exit::InternalError { suberror, data } = self else {
            return None;
        };
        if *suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
            return None;
        }
        let [flags, a, b, ..] = data.as_slice() else {
            return None;
        };
        if flags & kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES as u64 == 0 {
            return None;
        }
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&a.to_le_bytes());
        raw[8..].copy_from_slice(&b.to_le_bytes());
        let len = (raw[0] as usize).min(15);
        Some(raw[1..1 + len].to_vec())
    }
}

impl VcpuExit<'_> {
    /// The kind of this exit.
    pub fn kind(&self) -> ExitKind {
        match self {
            VcpuExit::PioRead { .. } => ExitKind::PioRead,
            VcpuExit::PioWrite { .. } => ExitKind::PioWrite,
            VcpuExit::MmioRead { .. } => ExitKind::MmioRead,
            VcpuExit::MmioWrite { .. } => ExitKind::MmioWrite,
            VcpuExit::Other(e) => e.kind(),
        }
    }
}

/// Exit counts per [`ExitKind`]: an array increment per exit, cheap enough to leave on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStats {
    counts: [u64; ExitKind::ALL.len()],
}

impl ExitStats {
    /// Count one exit of `kind`.
    #[inline]
    pub fn record(&mut self, kind: ExitKind) {
        self.counts[kind as usize] += 1;
    }

    /// Exits of `kind` so far.
    pub fn get(&self, kind: ExitKind) -> u64 {
        self.counts[kind as usize]
    }

    /// All exits so far.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Kinds with a non-zero count, with their counts.
    pub fn iter(&self) -> impl Iterator<Item = (ExitKind, u64)> + '_ {
        ExitKind::ALL
            .iter()
            .map(|&k| (k, self.get(k)))
            .filter(|&(_, n)| n > 0)
    }
}

/// A two-column table of the non-zero counts (`kind  count`), then the total.
impl fmt::Display for ExitStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<16} {:>10}", "exit", "count")?;
        for (k, n) in self.iter() {
            writeln!(f, "{:<16} {:>10}", k.name(), n)?;
        }
        write!(f, "{:<16} {:>10}", "total", self.total())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_and_render() {
        let mut s = ExitStats::default();
        s.record(ExitKind::PioWrite);
        s.record(ExitKind::PioWrite);
        s.record(Exit::Hlt.kind());
        assert_eq!(s.get(ExitKind::PioWrite), 2);
        assert_eq!(s.total(), 3);
        let table = s.to_string();
        assert!(table.contains("pio-write"));
        assert!(!table.contains("mmio-read"));
        assert!(table.ends_with("total                     3"), "{table}");
    }

    #[test]
    fn kinds_are_indexed_in_order() {
        for (i, k) in ExitKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
    }
}
