//! The KVM backend: [`KvmVm`] and [`KvmVcpu`] over kvm-ioctls.

use std::any::Any;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use kvm_bindings::{
    CpuId, KVM_EXIT_INTERNAL_ERROR, KVM_MAX_CPUID_ENTRIES, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{
    GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress, bitmap::Bitmap,
};

use crate::handle::{Entry, Gate, VcpuHandle, install_kick_handler};
use crate::{Error, Exit, VcpuExit, VcpuRegisters, VcpuRun, VcpuSpecialRegisters};

/// Address KVM uses for the real-mode TSS (three pages just below the BIOS area at 4 GiB − 16 MiB
/// … it must not overlap guest RAM or MMIO the VMM uses).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// A KVM virtual machine: the `/dev/kvm` handle, the VM fd and the memory it maps.
pub struct KvmVm {
    kvm: Kvm,
    fd: VmFd,
    next_slot: u32,
    // Keeps every registered memory's mappings alive as long as KVM may touch them.
    memory: Vec<Box<dyn Any + Send + Sync>>,
}

impl KvmVm {
    /// Open `/dev/kvm` and create a VM (no in-kernel irqchip: `hlt` exits to userspace).
    pub fn new() -> Result<Self, Error> {
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let fd = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        Ok(Self {
            kvm,
            fd,
            next_slot: 0,
            memory: Vec::new(),
        })
    }

    /// The `/dev/kvm` system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The raw VM fd, for capabilities this crate does not wrap.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Map every region of `mem` into the guest at its guest address, one KVM slot per region.
    /// The VM keeps a clone of `mem` (regions are reference counted) so the host mappings stay
    /// valid for as long as the VM exists.
    pub fn register_memory<B>(&mut self, mem: &GuestMemoryMmap<B>) -> Result<(), Error>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let max = self.kvm.get_nr_memslots();
        for region in mem.iter() {
            if self.next_slot as usize >= max {
                return Err(Error::NoMemorySlot(max));
            }
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|source| Error::Memory {
                    gpa: region.start_addr().0,
                    source,
                })?;
            let slot = kvm_userspace_memory_region {
                slot: self.next_slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host..host + len` is a live mmap owned by `region`; a clone of `mem`
            // (holding an `Arc` to every region) is stored in `self.memory` below, so the mapping
            // outlives the VM fd that references it.
            unsafe { self.fd.set_user_memory_region(slot) }
                .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
            self.next_slot += 1;
        }
        self.memory.push(Box::new(Arc::new(mem.clone())));
        Ok(())
    }

    /// CPUID entries KVM supports on this host (KVM_GET_SUPPORTED_CPUID).
    pub fn supported_cpuid(&self) -> Result<CpuId, Error> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))
    }

    /// Create vCPU `id` and give it KVM's supported CPUID as it stands (no per-vCPU
    /// normalization, KVM's default of 32 machine-check banks). For a chosen CPUID template and
    /// QEMU's machine-check setup use [`create_vcpu_with`](Self::create_vcpu_with).
    ///
    /// # Errors
    /// KVM_CREATE_VCPU or KVM_SET_CPUID2 fail.
    pub fn create_vcpu(&self, id: u64) -> Result<KvmVcpu, Error> {
        let vcpu = self.create_vcpu_bare(id)?;
        vcpu.set_cpuid(&self.supported_cpuid()?)?;
        Ok(vcpu)
    }

    /// KVM_CREATE_VCPU and the vCPU's handle gate; no CPUID set.
    pub(crate) fn create_vcpu_bare(&self, id: u64) -> Result<KvmVcpu, Error> {
        let mut fd = self
            .fd
            .create_vcpu(id)
            .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
        // SAFETY: the raw fd belongs to `fd`, open for this whole borrow.
        let dup = unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(|source| Error::Os {
                op: "duplicating the vCPU fd",
                source,
            })?;
        let immediate_exit: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
        let vcpu = KvmVcpu {
            fd,
            id,
            gate: Arc::new(Gate::new(immediate_exit, Some(dup))),
        };
        Ok(vcpu)
    }
}

/// A KVM vCPU.
pub struct KvmVcpu {
    fd: VcpuFd,
    id: u64,
    gate: Arc<Gate>,
}

impl KvmVcpu {
    /// The handle other threads kick, pause and read registers through ([`crate::handle`]),
    /// whatever run loop this vCPU runs under. Installs the kick signal's no-op handler.
    ///
    /// # Errors
    /// [`Error::Os`] when the signal handler cannot be installed.
    pub fn handle(&self) -> Result<VcpuHandle, Error> {
        install_kick_handler()?;
        Ok(VcpuHandle(self.gate.clone()))
    }

    /// The vCPU id it was created with.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The raw vCPU fd, for ioctls this crate does not wrap.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Mutable raw vCPU fd (e.g. for `set_kvm_immediate_exit`).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Set the CPUID the guest sees (KVM_SET_CPUID2).
    pub fn set_cpuid(&self, cpuid: &CpuId) -> Result<(), Error> {
        self.fd
            .set_cpuid2(cpuid)
            .map_err(Error::kvm("KVM_SET_CPUID2"))
    }

    /// Decode KVM_EXIT_INTERNAL_ERROR from the shared `kvm_run` page.
    ///
    /// # Safety
    /// `run` must point at this vCPU's `kvm_run` and the last exit must be an internal error.
    unsafe fn internal_error(run: *const kvm_bindings::kvm_run) -> Exit {
        // SAFETY: per the contract, `run` is the live kvm_run mapping and `internal` is the union
        // member KVM filled in for this exit reason; it is plain old data, copied out here.
        let internal = unsafe { (*run).__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        Exit::InternalError {
            suberror: internal.suberror,
            data: internal.data[..n].to_vec(),
        }
    }
}

impl VcpuRun for KvmVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>, Error> {
        use kvm_ioctls::VcpuExit as K;
        // Raw view of the kvm_run page for the exits kvm-ioctls does not decode. It is read only in
        // match arms where no borrow handed out by `run()` is used again.
        let run_page: *const kvm_bindings::kvm_run = self.fd.get_kvm_run();
        // Pauses park here, and a kick that came while the vCPU was outside KVM_RUN is
        // reported now, under any run loop.
        if let Entry::Kicked = self.gate.enter() {
            return Ok(VcpuExit::Other(Exit::Interrupted));
        }
        let result = self.fd.run();
        self.gate.leave();
        let exit = match result {
            Ok(e) => e,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.gate.interrupted();
                return Ok(VcpuExit::Other(Exit::Interrupted));
            }
            Err(source) => {
                return Err(Error::Kvm {
                    op: "KVM_RUN",
                    source,
                });
            }
        };
        let other = match exit {
            K::IoIn(port, data) => {
                // SAFETY: the exit is KVM_EXIT_IO, so `io` is the active union member; `size` is a
                // plain byte in the kvm_run header, disjoint from `data` (at io.data_offset).
                let size = unsafe { (*run_page).__bindgen_anon_1.io.size };
                return Ok(VcpuExit::PioRead { port, size, data });
            }
            K::IoOut(port, data) => {
                // SAFETY: as for IoIn above.
                let size = unsafe { (*run_page).__bindgen_anon_1.io.size };
                return Ok(VcpuExit::PioWrite { port, size, data });
            }
            K::MmioRead(addr, data) => return Ok(VcpuExit::MmioRead { addr, data }),
            K::MmioWrite(addr, data) => return Ok(VcpuExit::MmioWrite { addr, data }),
            K::Hlt => Exit::Hlt,
            K::Shutdown => Exit::Shutdown,
            K::Debug(d) => Exit::Debug {
                exception: d.exception,
                pc: d.pc,
                dr6: d.dr6,
                dr7: d.dr7,
            },
            K::Hypercall(h) => Exit::Hypercall {
                nr: h.nr,
                args: h.args,
            },
            K::FailEntry(reason, cpu) => Exit::FailEntry { reason, cpu },
            K::X86Rdmsr(m) => Exit::MsrRead {
                index: m.index,
                reason: m.reason.bits(),
            },
            K::X86Wrmsr(m) => Exit::MsrWrite {
                index: m.index,
                data: m.data,
                reason: m.reason.bits(),
            },
            K::SystemEvent(kind, data) => Exit::SystemEvent {
                kind,
                data: data.to_vec(),
            },
            K::IoapicEoi(vector) => Exit::IoapicEoi { vector },
            K::IrqWindowOpen => Exit::IrqWindowOpen,
            K::Intr => {
                self.gate.interrupted();
                Exit::Interrupted
            }
            // SAFETY: `run_page` is this vCPU's kvm_run and the exit is an internal error.
            K::InternalError => unsafe { Self::internal_error(run_page) },
            // SAFETY: `run_page` stays mapped while `self.fd` lives; `exit_reason` is a plain u32
            // and nothing borrowed from the page is used after this read.
            _ => Exit::Unsupported(unsafe { (*run_page).exit_reason }),
        };
        debug_assert_ne!(other, Exit::Unsupported(KVM_EXIT_INTERNAL_ERROR));
        Ok(VcpuExit::Other(other))
    }
}

impl VcpuRegisters for KvmVcpu {
    fn regs(&self) -> Result<kvm_regs, Error> {
        self.fd.get_regs().map_err(Error::kvm("KVM_GET_REGS"))
    }
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), Error> {
        self.fd.set_regs(regs).map_err(Error::kvm("KVM_SET_REGS"))
    }
}

impl VcpuSpecialRegisters for KvmVcpu {
    fn sregs(&self) -> Result<kvm_sregs, Error> {
        self.fd.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))
    }
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), Error> {
        self.fd
            .set_sregs(sregs)
            .map_err(Error::kvm("KVM_SET_SREGS"))
    }
}
