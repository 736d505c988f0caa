//! Versioned, serde-serialisable vCPU state: the VMCS guest area (registers, segments, control
//! registers, mapped MSRs, XCR0, interruptibility and activity state), KVM's exact event state,
//! further MSRs, the local APIC and the XSAVE area. It restores into a fresh vCPU.
//!
//! ```no_run
//! use vmkit_vcpu::snapshot::VcpuState;
//! # fn demo(old: &mut vmkit_vcpu::KvmVcpu, new: &mut vmkit_vcpu::KvmVcpu) -> Result<(), Box<dyn std::error::Error>> {
//! let state = VcpuState::save(old, &[], true)?; // true: the VM has an in-kernel irqchip
//! let json = serde_json::to_string(&state)?;
//! // ... new VM, same memory contents ...
//! let state: VcpuState = serde_json::from_str(&json)?;
//! state.restore(new)?;
//! # Ok(()) }
//! ```

use kvm_bindings::{kvm_lapic_state, kvm_msr_entry, kvm_vcpu_events};
use serde::{Deserialize, Serialize};

use crate::kvm_ext::read_guest_state;
use crate::vmcs::Vmcs;
use crate::{Error, KvmVcpu, VcpuGuestState};

/// Current [`VcpuState::version`].
pub const VCPU_STATE_VERSION: u32 = 1;

/// A saved vCPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    /// Format version ([`VCPU_STATE_VERSION`]).
    pub version: u32,
    /// Guest-state area and the controls that describe it.
    pub vmcs: Vmcs,
    /// KVM's event state as read (pending exceptions, SMM, NMI pending …), restored last.
    pub events: kvm_vcpu_events,
    /// MSRs beyond those the VMCS mapping carries.
    pub msrs: Vec<kvm_msr_entry>,
    /// Local APIC registers, when the VM has an in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    /// The 4-KiB XSAVE area (x87, SSE, AVX state …) as 1024 little-endian words.
    pub xsave: Vec<u32>,
}

impl VcpuState {
    /// Save `vcpu`: first completes an I/O exit still pending in KVM (KVM_RUN with
    /// `immediate_exit`, as the KVM API asks before saving), then reads the state. `extra_msrs`
    /// are saved too; `lapic` reads the in-kernel LAPIC.
    pub fn save(vcpu: &mut KvmVcpu, extra_msrs: &[u32], lapic: bool) -> Result<Self, Error> {
        complete_pending_io(vcpu)?;
        Self::save_from(vcpu, extra_msrs, lapic)
    }

    /// Save from any backend whose last exit needs no completion.
    pub fn save_from<V: VcpuGuestState + ?Sized>(
        vcpu: &V,
        extra_msrs: &[u32],
        lapic: bool,
    ) -> Result<Self, Error> {
        let k = read_guest_state(vcpu)?;
        Ok(Self {
            version: VCPU_STATE_VERSION,
            vmcs: Vmcs::from_kvm(&k),
            events: k.events,
            msrs: vcpu.get_msrs(extra_msrs)?,
            lapic: if lapic { Some(vcpu.lapic()?) } else { None },
            xsave: vcpu.xsave()?.region.to_vec(),
        })
    }

    /// Load into `vcpu` (normally fresh, in a VM with the same memory contents). The VMCS passes
    /// the VM-entry checks first; nothing is written if it does not.
    pub fn restore<V: VcpuGuestState + ?Sized>(&self, vcpu: &mut V) -> Result<(), Error> {
        if self.version != VCPU_STATE_VERSION {
            return Err(Error::StateVersion(self.version));
        }
        let mut xsave = vcpu.xsave()?;
        if self.xsave.len() != xsave.region.len() {
            return Err(Error::StateVersion(self.version));
        }
        self.vmcs.apply(vcpu)?;
        xsave.region.copy_from_slice(&self.xsave);
        vcpu.set_xsave(&xsave)?;
        vcpu.set_msrs(&self.msrs)?;
        if let Some(l) = &self.lapic {
            vcpu.set_lapic(l)?;
        }
        vcpu.set_vcpu_events(&self.events)
    }
}

/// Finish an I/O or MMIO exit inside KVM without running guest code: KVM_RUN with
/// `immediate_exit` set completes the instruction (e.g. advances RIP past an `out`) and returns
/// EINTR.
pub fn complete_pending_io(vcpu: &mut KvmVcpu) -> Result<(), Error> {
    // Straight on the fd: the vCPU's handle gate would clear `immediate_exit` at entry.
    let fd = vcpu.fd_mut();
    fd.set_kvm_immediate_exit(1);
    let r = match fd.run() {
        Ok(_) => Ok(()),
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(source) => Err(Error::Kvm {
            op: "KVM_RUN",
            source,
        }),
    };
    fd.set_kvm_immediate_exit(0);
    r
}
