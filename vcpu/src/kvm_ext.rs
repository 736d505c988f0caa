//! KVM implementations of the state, event, MSR and interrupt-window traits, and the KVM
//! mechanisms that express VMCS execution controls (exception bitmap → KVM_SET_GUEST_DEBUG,
//! MSR bitmap → KVM_X86_SET_MSR_FILTER with KVM_CAP_X86_USER_SPACE_MSR) and exit completions
//! (MSR answers, hypercall results).

use kvm_bindings::{
    KVM_CAP_EXIT_HYPERCALL, KVM_CAP_X86_USER_SPACE_MSR, KVM_EXIT_HYPERCALL, KVM_EXIT_X86_RDMSR,
    KVM_EXIT_X86_WRMSR, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_USE_SW_BP,
    KVM_MAX_MSR_ENTRIES, KVM_MSR_EXIT_REASON_FILTER, Msrs, kvm_debugregs, kvm_enable_cap,
    kvm_guest_debug, kvm_interrupt, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::kvm_map::{GUEST_STATE_MSRS, KvmGuestState};
use crate::vmcs::controls::primary;
use crate::vmcs::delivery::EventDelivery;
use crate::vmcs::{MsrBitmap, Vmcs};
use crate::{
    Error, KvmVcpu, KvmVm, VcpuEvents, VcpuExtendedState, VcpuGuestState, VcpuInterruptWindow,
    VcpuMsrs,
};

mod ioctls {
    #![allow(missing_docs)]
    use kvm_bindings::kvm_interrupt;
    use vmm_sys_util::ioctl_iow_nr;
    const KVMIO: u32 = 0xae;
    ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
}
use ioctls::KVM_INTERRUPT;

/// KVM hypercall number of `KVM_HC_MAP_GPA_RANGE`, the only one KVM_CAP_EXIT_HYPERCALL forwards.
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;

/// Exception vectors KVM_SET_GUEST_DEBUG can intercept: #DB (1) and #BP (3).
pub const INTERCEPTABLE_EXCEPTIONS: u32 = (1 << 1) | (1 << 3);

impl VcpuEvents for KvmVcpu {
    fn vcpu_events(&self) -> Result<kvm_vcpu_events, Error> {
        self.fd()
            .get_vcpu_events()
            .map_err(Error::kvm("KVM_GET_VCPU_EVENTS"))
    }
    fn set_vcpu_events(&mut self, events: &kvm_vcpu_events) -> Result<(), Error> {
        self.fd()
            .set_vcpu_events(events)
            .map_err(Error::kvm("KVM_SET_VCPU_EVENTS"))
    }
    fn mp_state(&self) -> Result<kvm_mp_state, Error> {
        self.fd()
            .get_mp_state()
            .map_err(Error::kvm("KVM_GET_MP_STATE"))
    }
    fn set_mp_state(&mut self, state: kvm_mp_state) -> Result<(), Error> {
        self.fd()
            .set_mp_state(state)
            .map_err(Error::kvm("KVM_SET_MP_STATE"))
    }
}

fn msr_list(entries: &[kvm_msr_entry]) -> Result<Msrs, Error> {
    if entries.len() > KVM_MAX_MSR_ENTRIES {
        return Err(Error::TooManyMsrs(entries.len()));
    }
    Msrs::from_entries(entries).map_err(|_| Error::TooManyMsrs(entries.len()))
}

impl VcpuMsrs for KvmVcpu {
    fn get_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, Error> {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_list(&entries)?;
        let n = self
            .fd()
            .get_msrs(&mut msrs)
            .map_err(Error::kvm("KVM_GET_MSRS"))?;
        let got = msrs.as_slice();
        if n < got.len() {
            return Err(Error::MsrRejected {
                index: got[n].index,
            });
        }
        Ok(got.to_vec())
    }

    fn set_msrs(&mut self, entries: &[kvm_msr_entry]) -> Result<(), Error> {
        let msrs = msr_list(entries)?;
        let n = self
            .fd()
            .set_msrs(&msrs)
            .map_err(Error::kvm("KVM_SET_MSRS"))?;
        match entries.get(n) {
            Some(e) => Err(Error::MsrRejected { index: e.index }),
            None => Ok(()),
        }
    }
}

impl VcpuExtendedState for KvmVcpu {
    fn debug_regs(&self) -> Result<kvm_debugregs, Error> {
        self.fd()
            .get_debug_regs()
            .map_err(Error::kvm("KVM_GET_DEBUGREGS"))
    }
    fn set_debug_regs(&mut self, regs: &kvm_debugregs) -> Result<(), Error> {
        self.fd()
            .set_debug_regs(regs)
            .map_err(Error::kvm("KVM_SET_DEBUGREGS"))
    }
    fn xcrs(&self) -> Result<kvm_xcrs, Error> {
        self.fd().get_xcrs().map_err(Error::kvm("KVM_GET_XCRS"))
    }
    fn set_xcrs(&mut self, xcrs: &kvm_xcrs) -> Result<(), Error> {
        self.fd().set_xcrs(xcrs).map_err(Error::kvm("KVM_SET_XCRS"))
    }
    fn xsave(&self) -> Result<kvm_xsave, Error> {
        self.fd().get_xsave().map_err(Error::kvm("KVM_GET_XSAVE"))
    }
    fn set_xsave(&mut self, xsave: &kvm_xsave) -> Result<(), Error> {
        // SAFETY: `xsave` is a complete legacy `kvm_xsave` (4 KiB region, no flexible tail):
        // KVM_SET_XSAVE reads exactly that many bytes, since KVM_CAP_XSAVE2 is not enabled on
        // this VM.
        unsafe { self.fd().set_xsave(xsave) }.map_err(Error::kvm("KVM_SET_XSAVE"))
    }
    fn lapic(&self) -> Result<kvm_lapic_state, Error> {
        self.fd().get_lapic().map_err(Error::kvm("KVM_GET_LAPIC"))
    }
    fn set_lapic(&mut self, lapic: &kvm_lapic_state) -> Result<(), Error> {
        self.fd()
            .set_lapic(lapic)
            .map_err(Error::kvm("KVM_SET_LAPIC"))
    }
}

impl VcpuInterruptWindow for KvmVcpu {
    #[inline]
    fn interrupt_window_open(&mut self) -> bool {
        let run = self.fd_mut().get_kvm_run();
        run.ready_for_interrupt_injection != 0 && run.if_flag != 0
    }
    #[inline]
    fn request_interrupt_window(&mut self, on: bool) {
        self.fd_mut().get_kvm_run().request_interrupt_window = on as u8;
    }
    fn inject_external_interrupt(&mut self, vector: u8) -> Result<(), Error> {
        let irq = kvm_interrupt { irq: vector as u32 };
        // SAFETY: KVM_INTERRUPT reads one `kvm_interrupt` from the pointer, which refers to a
        // live local; the fd is this vCPU's.
        let ret = unsafe { ioctl_with_ref(self.fd(), KVM_INTERRUPT(), &irq) };
        if ret < 0 {
            return Err(Error::Kvm {
                op: "KVM_INTERRUPT",
                source: vmm_sys_util::errno::Error::last(),
            });
        }
        Ok(())
    }
}

/// Read the whole guest-state mapping from a vCPU.
pub fn read_guest_state<V: VcpuGuestState + ?Sized>(v: &V) -> Result<KvmGuestState, Error> {
    Ok(KvmGuestState {
        regs: v.regs()?,
        sregs: v.sregs()?,
        debugregs: v.debug_regs()?,
        events: v.vcpu_events()?,
        mp_state: v.mp_state()?,
        msrs: v.get_msrs(&GUEST_STATE_MSRS)?,
        xcrs: v.xcrs()?,
    })
}

/// Write the whole guest-state mapping to a vCPU (special registers first: they set the mode).
pub fn write_guest_state<V: VcpuGuestState + ?Sized>(
    v: &mut V,
    s: &KvmGuestState,
) -> Result<(), Error> {
    v.set_sregs(&s.sregs)?;
    v.set_regs(&s.regs)?;
    v.set_msrs(&s.msrs)?;
    v.set_debug_regs(&s.debugregs)?;
    v.set_xcrs(&s.xcrs)?;
    v.set_vcpu_events(&s.events)?;
    v.set_mp_state(s.mp_state)
}

impl Vmcs {
    /// Run the VM-entry checks and load the guest-state area into `vcpu` (the equivalent of
    /// VMLAUNCH's guest-state loading). A VMCS that fails the checks is never handed to KVM.
    /// An injected software event is not checked against its IDT gate: see
    /// [`apply_through_idt`](Self::apply_through_idt).
    pub fn apply<V: VcpuGuestState + ?Sized>(&self, vcpu: &mut V) -> Result<(), Error> {
        let k = self.to_kvm()?;
        write_guest_state(vcpu, &k)
    }

    /// [`apply`](Self::apply) with the IDT checks of software-event delivery (see
    /// [`Vmcs::to_kvm_through_idt`]). The state is loaded first, so `read_gate(vcpu, address,
    /// buf)` reads the gate under the new state's paging (e.g. with
    /// [`KvmVcpu::read_guest_linear`]); if a check fails, the resulting #GP/#NP replaces the
    /// injected event and RIP is not advanced.
    pub fn apply_through_idt<V: VcpuGuestState + ?Sized>(
        &self,
        vcpu: &mut V,
        read_gate: impl FnOnce(&V, u64, &mut [u8]) -> bool,
    ) -> Result<EventDelivery, Error> {
        let k = self.to_kvm()?;
        write_guest_state(vcpu, &k)?;
        let v: &V = vcpu;
        let delivery = self.software_event_delivery(|a, buf| read_gate(v, a, buf));
        if let EventDelivery::Fault(f) = delivery {
            let k = self.with_fault_injected(&f).to_kvm()?;
            vcpu.set_regs(&k.regs)?;
            vcpu.set_vcpu_events(&k.events)?;
        }
        Ok(delivery)
    }

    /// The guest-state area of `vcpu` as a VMCS (see [`Vmcs::from_kvm`]).
    pub fn read_from<V: VcpuGuestState + ?Sized>(vcpu: &V) -> Result<Vmcs, Error> {
        Ok(Vmcs::from_kvm(&read_guest_state(vcpu)?))
    }
}

impl Vmcs {
    /// Express the VM-execution controls KVM has mechanisms for: the exception bitmap
    /// ([`KvmVcpu::set_exception_bitmap`]), MSR bitmaps ([`KvmVm::apply_msr_controls`], VM-wide)
    /// and "interrupt-window exiting" (`kvm_run.request_interrupt_window`). HLT, I/O and CPUID
    /// need no setup: without an in-kernel irqchip KVM exits on HLT and on I/O no device in the
    /// kernel claims; CPUID is answered by KVM from the table set with KVM_SET_CPUID2
    /// ([`crate::cpuid`]).
    pub fn apply_controls(&self, vm: &KvmVm, vcpu: &mut KvmVcpu) -> Result<(), Error> {
        vcpu.set_exception_bitmap(self.execution.exception_bitmap)?;
        vm.apply_msr_controls(self)?;
        let window = self.execution.primary_processor_based & primary::INTERRUPT_WINDOW_EXITING;
        crate::VcpuInterruptWindow::request_interrupt_window(vcpu, window != 0);
        Ok(())
    }
}

impl KvmVcpu {
    /// Read guest-linear memory: each page of `addr..addr + buf.len()` is translated with
    /// KVM_TRANSLATE under the vCPU's current paging mode, then read from `mem`. False when a
    /// page is not mapped or the memory read fails (nothing guest-controlled can panic here).
    pub fn read_guest_linear<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        addr: u64,
        buf: &mut [u8],
    ) -> bool {
        let mut done = 0;
        while done < buf.len() {
            let la = addr.wrapping_add(done as u64);
            let in_page = (0x1000 - (la & 0xfff)) as usize;
            let n = in_page.min(buf.len() - done);
            let Ok(t) = self.fd().translate_gva(la) else {
                return false;
            };
            if t.valid == 0 {
                return false;
            }
            let Some(chunk) = buf.get_mut(done..done + n) else {
                return false;
            };
            if mem
                .read_slice(chunk, GuestAddress(t.physical_address))
                .is_err()
            {
                return false;
            }
            done += n;
        }
        true
    }

    /// Express the exception bitmap with KVM_SET_GUEST_DEBUG: bit 1 (#DB) → hardware
    /// breakpoints/single-step interception, bit 3 (#BP) → software breakpoint interception.
    /// Intercepted exceptions exit as [`crate::Exit::Debug`]. Other vectors cannot be
    /// intercepted through the KVM API: [`Error::UnsupportedExceptionBitmap`].
    pub fn set_exception_bitmap(&mut self, bitmap: u32) -> Result<(), Error> {
        if bitmap & !INTERCEPTABLE_EXCEPTIONS != 0 {
            return Err(Error::UnsupportedExceptionBitmap(bitmap));
        }
        let mut control = 0;
        if bitmap & (1 << 1) != 0 {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
        }
        if bitmap & (1 << 3) != 0 {
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP;
        }
        let dbg = kvm_guest_debug {
            control,
            ..Default::default()
        };
        self.fd()
            .set_guest_debug(&dbg)
            .map_err(Error::kvm("KVM_SET_GUEST_DEBUG"))
    }

    fn msr_exit(
        &mut self,
    ) -> Result<&mut kvm_bindings::kvm_run__bindgen_ty_1__bindgen_ty_23, Error> {
        let run = self.fd_mut().get_kvm_run();
        if run.exit_reason != KVM_EXIT_X86_RDMSR && run.exit_reason != KVM_EXIT_X86_WRMSR {
            return Err(Error::NotInExit("an MSR exit"));
        }
        // SAFETY: exit_reason says KVM filled the `msr` member of the union; it is plain data.
        Ok(unsafe { &mut run.__bindgen_anon_1.msr })
    }

    /// Answer the pending [`crate::Exit::MsrRead`]: the guest's RDMSR returns `value`.
    pub fn complete_msr_read(&mut self, value: u64) -> Result<(), Error> {
        let m = self.msr_exit()?;
        m.data = value;
        m.error = 0;
        Ok(())
    }

    /// Fail the pending MSR access: the guest gets #GP(0) on RDMSR/WRMSR.
    pub fn fail_msr_access(&mut self) -> Result<(), Error> {
        self.msr_exit()?.error = 1;
        Ok(())
    }

    /// Set the return value (RAX) of the pending [`crate::Exit::Hypercall`].
    pub fn set_hypercall_result(&mut self, ret: u64) -> Result<(), Error> {
        let run = self.fd_mut().get_kvm_run();
        if run.exit_reason != KVM_EXIT_HYPERCALL {
            return Err(Error::NotInExit("a hypercall exit"));
        }
        // Writing a plain-data union member is safe; exit_reason says it is the live one.
        run.__bindgen_anon_1.hypercall.ret = ret;
        Ok(())
    }
}

impl KvmVm {
    /// Create the in-kernel irqchip (PIC, IOAPIC, LAPICs); call before creating vCPUs. With it,
    /// HLT and interrupt delivery are handled in the kernel and LAPIC state can be saved.
    pub fn create_irqchip(&self) -> Result<(), Error> {
        self.fd()
            .create_irq_chip()
            .map_err(Error::kvm("KVM_CREATE_IRQCHIP"))
    }

    /// Express the VMCS MSR controls with KVM: KVM_CAP_X86_USER_SPACE_MSR (filter reason) and
    /// KVM_X86_SET_MSR_FILTER built from the MSR bitmap. With "use MSR bitmaps" set, accesses
    /// whose bitmap bit is 1 exit to userspace ([`crate::Exit::MsrRead`] /
    /// [`crate::Exit::MsrWrite`]), as do MSRs outside the bitmap ranges; without it, every
    /// RDMSR/WRMSR exits. KVM's filter is per VM: every vCPU of the VM follows the last call.
    pub fn apply_msr_controls(&self, vmcs: &Vmcs) -> Result<(), Error> {
        self.enable_user_space_msr()?;
        if vmcs.execution.primary_processor_based & primary::USE_MSR_BITMAPS == 0 {
            // KVM refuses "deny by default" with no ranges; an all-ones bitmap (every access
            // exits) inside the ranges plus DENY outside them says the same.
            return self.set_msr_bitmap(&MsrBitmap::all_exiting());
        }
        self.set_msr_bitmap(&vmcs.execution.msr_bitmap)
    }

    fn enable_user_space_msr(&self) -> Result<(), Error> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            ..Default::default()
        };
        cap.args[0] = KVM_MSR_EXIT_REASON_FILTER as u64;
        self.fd()
            .enable_cap(&cap)
            .map_err(Error::kvm("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)"))
    }

    /// Install an MSR bitmap as KVM's MSR filter (bits inverted: VMX 1 = exit, KVM 1 = allow).
    fn set_msr_bitmap(&self, bitmap: &MsrBitmap) -> Result<(), Error> {
        let mut inverted: Vec<(u32, MsrFilterRangeFlags, Vec<u8>)> = Vec::with_capacity(4);
        for (base, read, write) in bitmap.ranges() {
            inverted.push((
                base,
                MsrFilterRangeFlags::READ,
                read.iter().map(|b| !b).collect(),
            ));
            inverted.push((
                base,
                MsrFilterRangeFlags::WRITE,
                write.iter().map(|b| !b).collect(),
            ));
        }
        let ranges: Vec<MsrFilterRange<'_>> = inverted
            .iter()
            .map(|(base, flags, bits)| MsrFilterRange {
                flags: *flags,
                base: *base,
                msr_count: bits.len() as u32 * 8,
                bitmap: bits,
            })
            .collect();
        self.fd()
            .set_msr_filter(MsrFilterDefaultAction::DENY, &ranges)
            .map_err(Error::kvm("KVM_X86_SET_MSR_FILTER"))
    }

    /// Forward `vmcall` hypercalls whose number is set in `mask` to userspace
    /// (KVM_CAP_EXIT_HYPERCALL). KVM accepts only bit [`KVM_HC_MAP_GPA_RANGE`].
    pub fn enable_exit_hypercall(&self, mask: u64) -> Result<(), Error> {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_EXIT_HYPERCALL,
            ..Default::default()
        };
        cap.args[0] = mask;
        self.fd()
            .enable_cap(&cap)
            .map_err(Error::kvm("KVM_ENABLE_CAP(EXIT_HYPERCALL)"))
    }
}
