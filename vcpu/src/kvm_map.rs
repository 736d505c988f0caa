//! The VMCS guest-state area mapped to and from KVM's structures, and KVM exits expressed as
//! VMX exit information.
//!
//! | VMCS (guest-state area) | KVM |
//! |---|---|
//! | RSP, RIP, RFLAGS (+ software-held GPRs) | `kvm_regs` |
//! | segments, GDTR/IDTR, CR0/CR3/CR4 as the guest sees them (guest/host mask + read shadow), EFER (+ CR2, CR8, APIC base) | `kvm_sregs` |
//! | DR7 (+ DR0–DR3, DR6) | `kvm_debugregs` |
//! | interruptibility state (STI / MOV SS / NMI blocking), VM-entry event injection | `kvm_vcpu_events` |
//! | activity state (active, HLT, wait-for-SIPI) | `kvm_mp_state` |
//! | IA32_SYSENTER_*, IA32_PAT, IA32_DEBUGCTL (+ STAR, LSTAR, CSTAR, FMASK, KERNEL_GS_BASE, TSC) | MSRs |
//! | (+ XCR0) | `kvm_xcrs` |
//!
//! Not mapped (KVM has no equivalent a VMM can set): pending debug exceptions, SMBASE,
//! IA32_PERF_GLOBAL_CTRL, PDPTEs (KVM reloads them from CR3), the VMX-preemption timer.
//!
//! Event injection follows VM-entry interruption-information semantics: external interrupts,
//! NMIs and hardware exceptions (with or without error code) become KVM "injected" events,
//! which KVM delivers through the guest IDT itself. Software interrupts, privileged software
//! exceptions and software exceptions (types 4, 5, 6) advance RIP by the VM-entry instruction
//! length before delivery, so the pushed return address is RIP + length as on VM entry.
//!
//! KVM delivers those as if they were hardware events, so the checks that `INT n`, `INT3`,
//! `INTO` and `INT1` make on their IDT gate — limit, gate type, gate DPL ≥ CPL (not for
//! `INT1`), present — are made here, by [`Vmcs::to_kvm_through_idt`] (and the KVM glue built on
//! it: [`Vmcs::apply_through_idt`], [`crate::events::inject_through_idt`]), which reads the
//! gate from guest memory. When a check fails the event becomes the #GP or #NP with error code
//! `vector·8 + 2` (+ EXT for `INT1`) it raises on VM entry, pushing the un-advanced RIP. The rule
//! and what it leaves to KVM (real mode, virtual-8086 redirection, checks after the gate) are
//! in [`crate::vmcs::delivery`]. [`Vmcs::to_kvm`] and [`Vmcs::apply`] have no guest memory and
//! map software events unchecked.

use kvm_bindings::{
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SHADOW, KVM_X86_SHADOW_INT_MOV_SS,
    KVM_X86_SHADOW_INT_STI, kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::exit::{Exit, VcpuExit};
use crate::vmcs::checks::{
    self, ACTIVITY_ACTIVE, ACTIVITY_HLT, ACTIVITY_WAIT_SIPI, GuestStateError, INTR_BLOCKING_MOV_SS,
    INTR_BLOCKING_NMI, INTR_BLOCKING_STI,
};
use crate::vmcs::controls::{entry, primary, secondary};
use crate::vmcs::delivery::{EventDelivery, GateFault};
use crate::vmcs::exit_reason::{EptViolationQualification, IoDirection, IoQualification};
use crate::vmcs::{
    DescriptorTable, ExitReason, GeneralRegisters, InterruptionInfo, InterruptionType, Vmcs,
    VmcsSegment, ar,
};

/// MSR indices (SDM vol. 4), named as in the SDM.
pub mod msr {
    /// IA32_TIME_STAMP_COUNTER.
    pub const IA32_TSC: u32 = 0x10;
    /// IA32_APIC_BASE.
    pub const IA32_APIC_BASE: u32 = 0x1b;
    /// IA32_SYSENTER_CS.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// IA32_DEBUGCTL.
    pub const IA32_DEBUGCTL: u32 = 0x1d9;
    /// IA32_PAT.
    pub const IA32_PAT: u32 = 0x277;
    /// IA32_EFER.
    pub const IA32_EFER: u32 = 0xc000_0080;
    /// IA32_STAR.
    pub const IA32_STAR: u32 = 0xc000_0081;
    /// IA32_LSTAR.
    pub const IA32_LSTAR: u32 = 0xc000_0082;
    /// IA32_CSTAR.
    pub const IA32_CSTAR: u32 = 0xc000_0083;
    /// IA32_FMASK.
    pub const IA32_FMASK: u32 = 0xc000_0084;
    /// IA32_FS_BASE.
    pub const IA32_FS_BASE: u32 = 0xc000_0100;
    /// IA32_GS_BASE.
    pub const IA32_GS_BASE: u32 = 0xc000_0101;
    /// IA32_KERNEL_GS_BASE.
    pub const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// The MSRs the mapping carries, in the order of [`KvmGuestState::msrs`].
pub const GUEST_STATE_MSRS: [u32; 10] = [
    msr::IA32_SYSENTER_CS,
    msr::IA32_SYSENTER_ESP,
    msr::IA32_SYSENTER_EIP,
    msr::IA32_PAT,
    msr::IA32_STAR,
    msr::IA32_LSTAR,
    msr::IA32_CSTAR,
    msr::IA32_FMASK,
    msr::IA32_KERNEL_GS_BASE,
    msr::IA32_TSC,
];

/// Errors mapping a VMCS to KVM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum MapError {
    /// The guest state fails the VM-entry checks; it is never handed to KVM.
    #[error("invalid guest state")]
    GuestState(#[from] GuestStateError),
    /// KVM's `kvm_dtable` limit is 16 bits.
    #[error("descriptor-table limit {0:#x} does not fit KVM")]
    TableLimit(u32),
    /// Activity state KVM cannot express (shutdown).
    #[error("activity state {0} has no KVM equivalent")]
    ActivityState(u32),
    /// Blocking by SMI has no KVM equivalent outside SMM ([`Vmcs::to_kvm`] refuses it first,
    /// as [`GuestStateError::SmiBlockingOutsideSmm`]).
    #[error("blocking by SMI has no KVM equivalent")]
    SmiBlocking,
}

/// The KVM structures that hold a guest-state area.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KvmGuestState {
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// DR0–DR3, DR6, DR7.
    pub debugregs: kvm_debugregs,
    /// Interrupt shadow, NMI masking, injected event.
    pub events: kvm_vcpu_events,
    /// Activity state.
    pub mp_state: kvm_mp_state,
    /// [`GUEST_STATE_MSRS`], in that order.
    pub msrs: Vec<kvm_msr_entry>,
    /// XCR0.
    pub xcrs: kvm_xcrs,
}

/// VMCS access rights → KVM segment.
pub fn segment_to_kvm(s: &VmcsSegment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_(),
        present: s.has(ar::P) as u8,
        dpl: s.dpl(),
        db: s.has(ar::DB) as u8,
        s: s.has(ar::S) as u8,
        l: s.has(ar::L) as u8,
        g: s.has(ar::G) as u8,
        avl: s.has(ar::AVL) as u8,
        unusable: s.unusable() as u8,
        padding: 0,
    }
}

/// KVM segment → VMCS access rights.
pub fn segment_from_kvm(k: &kvm_segment) -> VmcsSegment {
    let bit = |v: u8, b: u32| if v != 0 { b } else { 0 };
    VmcsSegment {
        selector: k.selector,
        base: k.base,
        limit: k.limit,
        access_rights: (k.type_ as u32 & ar::TYPE_MASK)
            | bit(k.s, ar::S)
            | ((k.dpl as u32 & 3) << ar::DPL_SHIFT)
            | bit(k.present, ar::P)
            | bit(k.avl, ar::AVL)
            | bit(k.l, ar::L)
            | bit(k.db, ar::DB)
            | bit(k.g, ar::G)
            | bit(k.unusable, ar::UNUSABLE),
    }
}

fn dtable(t: &DescriptorTable) -> Result<kvm_bindings::kvm_dtable, MapError> {
    let limit = u16::try_from(t.limit).map_err(|_| MapError::TableLimit(t.limit))?;
    Ok(kvm_bindings::kvm_dtable {
        base: t.base,
        limit,
        padding: [0; 3],
    })
}

impl Vmcs {
    /// Check the guest state (SDM §27.3.1) and map it to KVM structures.
    pub fn to_kvm(&self) -> Result<KvmGuestState, MapError> {
        checks::check_guest_state(self)?;
        self.to_kvm_unchecked()
    }

    /// [`to_kvm`](Self::to_kvm) with the IDT checks of software-event delivery
    /// ([`crate::vmcs::delivery`]): `read_gate(linear_address, buf)` reads the injected event's
    /// IDT gate (returning false when it cannot). When a check fails, the KVM state injects the
    /// resulting #GP/#NP with its error code at the current RIP instead of the event.
    ///
    /// ```
    /// use vmkit_vcpu::Vmcs;
    /// use vmkit_vcpu::vmcs::delivery::EventDelivery;
    /// use vmkit_vcpu::vmcs::{DescriptorTable, InterruptionInfo, ar};
    ///
    /// let mut vmcs = Vmcs::flat_64(0x9000, 0x10_0000, 0x8_0000);
    /// vmcs.guest.idtr = DescriptorTable { base: 0x1000, limit: 0xfff };
    /// // Ring 3.
    /// for s in [&mut vmcs.guest.cs, &mut vmcs.guest.ss] {
    ///     s.selector |= 3;
    ///     s.access_rights |= 3 << ar::DPL_SHIFT;
    /// }
    /// // `INT 0x30` (2 bytes) through a DPL-0 gate.
    /// vmcs.inject(InterruptionInfo::software_interrupt(0x30), 0, 2);
    /// let (k, d) = vmcs.to_kvm_through_idt(|_, gate| {
    ///     gate.fill(0);
    ///     gate[5] = 0x8e; // present 64-bit interrupt gate, DPL 0
    ///     true
    /// })?;
    /// assert!(matches!(d, EventDelivery::Fault(_)));
    /// assert_eq!(k.events.exception.nr, 13);
    /// assert_eq!(k.events.exception.error_code, 0x30 * 8 + 2);
    /// assert_eq!(k.regs.rip, 0x10_0000); // not advanced: #GP is a fault of the INT
    /// # Ok::<(), vmkit_vcpu::kvm_map::MapError>(())
    /// ```
    pub fn to_kvm_through_idt(
        &self,
        read_gate: impl FnOnce(u64, &mut [u8]) -> bool,
    ) -> Result<(KvmGuestState, EventDelivery), MapError> {
        checks::check_guest_state(self)?;
        self.to_kvm_unchecked_through_idt(read_gate)
    }

    /// [`to_kvm_through_idt`](Self::to_kvm_through_idt) without the VM-entry checks.
    pub fn to_kvm_unchecked_through_idt(
        &self,
        read_gate: impl FnOnce(u64, &mut [u8]) -> bool,
    ) -> Result<(KvmGuestState, EventDelivery), MapError> {
        let delivery = self.software_event_delivery(read_gate);
        let k = match delivery {
            EventDelivery::Fault(f) => self.with_fault_injected(&f).to_kvm_unchecked()?,
            _ => self.to_kvm_unchecked()?,
        };
        Ok((k, delivery))
    }

    /// This VMCS injecting `f` (at the current RIP) instead of its event.
    pub(crate) fn with_fault_injected(&self, f: &GateFault) -> Vmcs {
        let mut v = self.clone();
        v.inject(f.interruption_info(), f.error_code, 0);
        v
    }

    /// Map to KVM structures without the VM-entry checks (representability is still checked).
    pub fn to_kvm_unchecked(&self) -> Result<KvmGuestState, MapError> {
        let g = &self.guest;
        let r = &g.regs;
        let mut rip = g.rip;
        let mut events = kvm_vcpu_events {
            flags: KVM_VCPUEVENT_VALID_SHADOW | KVM_VCPUEVENT_VALID_NMI_PENDING,
            ..Default::default()
        };
        if g.interruptibility_state & checks::INTR_BLOCKING_SMI != 0 {
            return Err(MapError::SmiBlocking);
        }
        if g.interruptibility_state & INTR_BLOCKING_STI != 0 {
            events.interrupt.shadow |= KVM_X86_SHADOW_INT_STI as u8;
        }
        if g.interruptibility_state & INTR_BLOCKING_MOV_SS != 0 {
            events.interrupt.shadow |= KVM_X86_SHADOW_INT_MOV_SS as u8;
        }
        events.nmi.masked = (g.interruptibility_state & INTR_BLOCKING_NMI != 0) as u8;
        if let Some(i) = self.entry_interruption() {
            if i.kind.is_software() {
                rip = rip.wrapping_add(self.entry.instruction_length as u64);
            }
            match i.kind {
                InterruptionType::ExternalInterrupt | InterruptionType::SoftwareInterrupt => {
                    events.interrupt.injected = 1;
                    events.interrupt.nr = i.vector;
                }
                InterruptionType::Nmi => events.nmi.injected = 1,
                InterruptionType::HardwareException
                | InterruptionType::SoftwareException
                | InterruptionType::PrivilegedSoftwareException => {
                    events.exception.injected = 1;
                    events.exception.nr = i.vector;
                    events.exception.has_error_code = i.deliver_error_code as u8;
                    events.exception.error_code = self.entry.exception_error_code;
                }
                InterruptionType::Reserved | InterruptionType::OtherEvent => {}
            }
        }
        let regs = kvm_regs {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rsp: g.rsp,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
            rip,
            rflags: g.rflags,
        };
        let sregs = kvm_sregs {
            cs: segment_to_kvm(&g.cs),
            ds: segment_to_kvm(&g.ds),
            es: segment_to_kvm(&g.es),
            fs: segment_to_kvm(&g.fs),
            gs: segment_to_kvm(&g.gs),
            ss: segment_to_kvm(&g.ss),
            tr: segment_to_kvm(&g.tr),
            ldt: segment_to_kvm(&g.ldtr),
            gdt: dtable(&g.gdtr)?,
            idt: dtable(&g.idtr)?,
            cr0: self.guest_visible_cr0(),
            cr2: g.cr2,
            cr3: g.cr3,
            cr4: self.guest_visible_cr4(),
            cr8: g.cr8,
            efer: g.ia32_efer,
            apic_base: g.msrs.apic_base,
            interrupt_bitmap: [0; 4],
        };
        let debugregs = kvm_debugregs {
            db: g.dr0_3,
            dr6: g.dr6,
            dr7: g.dr7,
            ..Default::default()
        };
        let mp_state = kvm_mp_state {
            mp_state: match g.activity_state {
                ACTIVITY_ACTIVE => KVM_MP_STATE_RUNNABLE,
                ACTIVITY_HLT => KVM_MP_STATE_HALTED,
                ACTIVITY_WAIT_SIPI => KVM_MP_STATE_INIT_RECEIVED,
                other => return Err(MapError::ActivityState(other)),
            },
        };
        let m = &g.msrs;
        let values = [
            g.ia32_sysenter_cs as u64,
            g.ia32_sysenter_esp,
            g.ia32_sysenter_eip,
            g.ia32_pat,
            m.star,
            m.lstar,
            m.cstar,
            m.fmask,
            m.kernel_gs_base,
            m.tsc,
        ];
        let msrs = GUEST_STATE_MSRS
            .iter()
            .zip(values)
            .map(|(&index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].value = g.xcr0;
        Ok(KvmGuestState {
            regs,
            sregs,
            debugregs,
            events,
            mp_state,
            msrs,
            xcrs,
        })
    }

    /// A VMCS holding KVM's guest state. CR0.NE and CR4.VMXE (fixed to 1 in VMX operation) are
    /// set in the guest-state area and owned by the host through the guest/host masks, the read
    /// shadows holding what the guest sees; "unrestricted guest" is on (as KVM uses it), "IA-32e
    /// mode guest" follows EFER.LMA.
    pub fn from_kvm(k: &KvmGuestState) -> Vmcs {
        let mut v = Vmcs::default();
        v.update_from_kvm(k);
        v
    }

    /// Overwrite the guest-state area (and the controls [`from_kvm`](Self::from_kvm) derives)
    /// with KVM's state, keeping every other field.
    pub fn update_from_kvm(&mut self, k: &KvmGuestState) {
        let s = &k.sregs;
        let r = &k.regs;
        self.execution.primary_processor_based |= primary::ACTIVATE_SECONDARY_CONTROLS;
        self.execution.secondary_processor_based |= secondary::UNRESTRICTED_GUEST;
        self.execution.cr0_guest_host_mask = checks::CR0_NE;
        self.execution.cr0_read_shadow = s.cr0;
        self.execution.cr4_guest_host_mask = checks::CR4_VMXE;
        self.execution.cr4_read_shadow = s.cr4;
        self.entry.controls |= entry::LOAD_IA32_EFER;
        if s.efer & checks::EFER_LMA != 0 {
            self.entry.controls |= entry::IA32E_MODE_GUEST;
        } else {
            self.entry.controls &= !entry::IA32E_MODE_GUEST;
        }
        let g = &mut self.guest;
        g.regs = GeneralRegisters {
            rax: r.rax,
            rbx: r.rbx,
            rcx: r.rcx,
            rdx: r.rdx,
            rsi: r.rsi,
            rdi: r.rdi,
            rbp: r.rbp,
            r8: r.r8,
            r9: r.r9,
            r10: r.r10,
            r11: r.r11,
            r12: r.r12,
            r13: r.r13,
            r14: r.r14,
            r15: r.r15,
        };
        g.rsp = r.rsp;
        g.rip = r.rip;
        g.rflags = r.rflags;
        g.cs = segment_from_kvm(&s.cs);
        g.ds = segment_from_kvm(&s.ds);
        g.es = segment_from_kvm(&s.es);
        g.fs = segment_from_kvm(&s.fs);
        g.gs = segment_from_kvm(&s.gs);
        g.ss = segment_from_kvm(&s.ss);
        g.tr = segment_from_kvm(&s.tr);
        g.ldtr = segment_from_kvm(&s.ldt);
        g.gdtr = DescriptorTable {
            base: s.gdt.base,
            limit: s.gdt.limit as u32,
        };
        g.idtr = DescriptorTable {
            base: s.idt.base,
            limit: s.idt.limit as u32,
        };
        g.cr0 = s.cr0 | checks::CR0_NE;
        g.cr2 = s.cr2;
        g.cr3 = s.cr3;
        g.cr4 = s.cr4 | checks::CR4_VMXE;
        g.cr8 = s.cr8;
        g.ia32_efer = s.efer;
        g.msrs.apic_base = s.apic_base;
        g.dr0_3 = k.debugregs.db;
        g.dr6 = k.debugregs.dr6;
        g.dr7 = k.debugregs.dr7;
        g.vmcs_link_pointer = u64::MAX;
        let e = &k.events;
        let mut intr = 0;
        if e.interrupt.shadow & KVM_X86_SHADOW_INT_STI as u8 != 0 {
            intr |= INTR_BLOCKING_STI;
        }
        if e.interrupt.shadow & KVM_X86_SHADOW_INT_MOV_SS as u8 != 0 {
            intr |= INTR_BLOCKING_MOV_SS;
        }
        if e.nmi.masked != 0 {
            intr |= INTR_BLOCKING_NMI;
        }
        g.interruptibility_state = intr;
        g.activity_state = match k.mp_state.mp_state {
            KVM_MP_STATE_HALTED => ACTIVITY_HLT,
            KVM_MP_STATE_INIT_RECEIVED => ACTIVITY_WAIT_SIPI,
            _ => ACTIVITY_ACTIVE,
        };
        for m in &k.msrs {
            match m.index {
                msr::IA32_SYSENTER_CS => g.ia32_sysenter_cs = m.data as u32,
                msr::IA32_SYSENTER_ESP => g.ia32_sysenter_esp = m.data,
                msr::IA32_SYSENTER_EIP => g.ia32_sysenter_eip = m.data,
                msr::IA32_PAT => g.ia32_pat = m.data,
                msr::IA32_DEBUGCTL => g.ia32_debugctl = m.data,
                msr::IA32_STAR => g.msrs.star = m.data,
                msr::IA32_LSTAR => g.msrs.lstar = m.data,
                msr::IA32_CSTAR => g.msrs.cstar = m.data,
                msr::IA32_FMASK => g.msrs.fmask = m.data,
                msr::IA32_KERNEL_GS_BASE => g.msrs.kernel_gs_base = m.data,
                msr::IA32_TSC => g.msrs.tsc = m.data,
                _ => {}
            }
        }
        let nr = (k.xcrs.nr_xcrs as usize).min(k.xcrs.xcrs.len());
        if let Some(x) = k.xcrs.xcrs[..nr].iter().find(|x| x.xcr == 0) {
            g.xcr0 = x.value;
        }
        // In-flight events become the VM-entry injection that re-delivers them.
        let (info, code, len) = if e.exception.injected != 0 {
            let i = InterruptionInfo::new(
                e.exception.nr,
                InterruptionType::HardwareException,
                e.exception.has_error_code != 0,
            );
            (Some(i), e.exception.error_code, 0)
        } else if e.nmi.injected != 0 {
            (Some(InterruptionInfo::nmi()), 0, 0)
        } else if e.interrupt.injected != 0 && e.interrupt.soft != 0 {
            // KVM keeps RIP at the `INT n` (2 bytes, CD ib) while it is being delivered.
            (
                Some(InterruptionInfo::software_interrupt(e.interrupt.nr)),
                0,
                2,
            )
        } else if e.interrupt.injected != 0 {
            (
                Some(InterruptionInfo::external_interrupt(e.interrupt.nr)),
                0,
                0,
            )
        } else {
            (None, 0, 0)
        };
        self.entry.interruption_info = info.map_or(0, InterruptionInfo::to_raw);
        self.entry.exception_error_code = code;
        self.entry.instruction_length = len;
    }

    /// Fill the VM-exit information area from a KVM exit (see [`exit_information`]); other
    /// exit-information fields are cleared. Returns false (and leaves the area unchanged) for
    /// exits with no VMX equivalent.
    pub fn record_exit(&mut self, exit: &VcpuExit<'_>) -> bool {
        match exit_information(exit) {
            Some(info) => {
                self.exit_info = Default::default();
                self.exit_info.exit_reason = info.reason_raw;
                self.exit_info.exit_qualification = info.qualification;
                self.exit_info.guest_physical_address = info.guest_physical_address;
                self.exit_info.interruption_info = info.interruption_info;
                true
            }
            None => false,
        }
    }
}

/// A KVM exit expressed as VMX exit information (SDM §25.9, §28.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInformation {
    /// The basic exit reason.
    pub reason: ExitReason,
    /// The raw exit-reason field (bit 31 set for VM-entry failures).
    pub reason_raw: u32,
    /// Exit qualification (I/O: table 28-5; EPT violation: table 28-7).
    pub qualification: u64,
    /// Guest-physical address (EPT violations: the MMIO address).
    pub guest_physical_address: u64,
    /// VM-exit interruption information (exceptions).
    pub interruption_info: u32,
}

impl ExitInformation {
    fn new(reason: ExitReason) -> Self {
        Self {
            reason,
            reason_raw: reason.number() as u32,
            qualification: 0,
            guest_physical_address: 0,
            interruption_info: 0,
        }
    }
}

/// The VMX exit a KVM exit stands for:
///
/// * PIO → I/O instruction (qualification: size, direction, port; a transfer of several
///   elements sets string + REP, a single one leaves both 0 since KVM does not say);
/// * MMIO → EPT violation (read or write, GPA, page not present);
/// * HLT → HLT; MSR exits → RDMSR / WRMSR; hypercall → VMCALL;
/// * debug → exception or NMI (#DB as hardware exception, #BP as software exception);
/// * shutdown → triple fault; interrupt window open → interrupt window;
/// * failed entry → KVM's hardware entry-failure reason (a VMX exit reason) with bit 31 set;
/// * KVM_RUN interrupted by a signal → external interrupt.
///
/// `None` for internal errors (their instruction bytes are in [`Exit::InternalError`]) and
/// exits with no VMX counterpart.
pub fn exit_information(exit: &VcpuExit<'_>) -> Option<ExitInformation> {
    let io = |port: u16, size: u8, len: usize, direction| {
        let mut i = ExitInformation::new(ExitReason::IoInstruction);
        let repeated = len > usize::from(size);
        i.qualification = IoQualification {
            size: size.clamp(1, 4),
            direction,
            string: repeated,
            rep: repeated,
            immediate: false,
            port,
        }
        .encode();
        i
    };
    let mmio = |addr: u64, write: bool| {
        let mut i = ExitInformation::new(ExitReason::EptViolation);
        i.qualification = EptViolationQualification {
            read: !write,
            write,
            ..Default::default()
        }
        .encode();
        i.guest_physical_address = addr;
        i
    };
    Some(match exit {
        VcpuExit::PioRead { port, size, data } => io(*port, *size, data.len(), IoDirection::In),
        VcpuExit::PioWrite { port, size, data } => io(*port, *size, data.len(), IoDirection::Out),
        VcpuExit::MmioRead { addr, .. } => mmio(*addr, false),
        VcpuExit::MmioWrite { addr, .. } => mmio(*addr, true),
        VcpuExit::Other(e) => match e {
            Exit::Hlt => ExitInformation::new(ExitReason::Hlt),
            Exit::Shutdown => ExitInformation::new(ExitReason::TripleFault),
            Exit::MsrRead { .. } => ExitInformation::new(ExitReason::Rdmsr),
            Exit::MsrWrite { .. } => ExitInformation::new(ExitReason::Wrmsr),
            Exit::Hypercall { .. } => ExitInformation::new(ExitReason::Vmcall),
            Exit::IrqWindowOpen => ExitInformation::new(ExitReason::InterruptWindow),
            Exit::Interrupted => ExitInformation::new(ExitReason::ExternalInterrupt),
            Exit::Debug { exception, .. } => {
                let mut i = ExitInformation::new(ExitReason::ExceptionOrNmi);
                let vector = *exception as u8;
                let kind = if vector == 3 {
                    InterruptionType::SoftwareException
                } else {
                    InterruptionType::HardwareException
                };
                i.interruption_info = InterruptionInfo::new(vector, kind, false).to_raw();
                i
            }
            Exit::FailEntry { reason, .. } => {
                let basic = *reason as u16;
                let r = ExitReason::from_basic(basic)?;
                let mut i = ExitInformation::new(r);
                i.reason_raw = basic as u32 | crate::vmcs::exit_reason::EXIT_REASON_ENTRY_FAILURE;
                i
            }
            _ => return None,
        },
    })
}
