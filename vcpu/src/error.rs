use thiserror::Error;

/// Errors from vCPU and VM operations.
#[derive(Debug, Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("KVM {op} failed")]
    Kvm {
        /// The operation (`"KVM_RUN"`, `"KVM_SET_SREGS"` …).
        op: &'static str,
        /// The errno KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Opening `/dev/kvm` failed.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A guest memory access done on behalf of the vCPU failed.
    #[error("guest memory access at {gpa:#x} failed")]
    Memory {
        /// Guest physical address of the access.
        gpa: u64,
        /// The vm-memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The VMCS cannot be handed to KVM (failed guest-state check or unrepresentable field).
    #[error("VMCS rejected")]
    Vmcs(#[from] crate::kvm_map::MapError),
    /// KVM accepted only part of an MSR list; `index` is the first MSR it rejected.
    #[error("KVM rejected MSR {index:#x}")]
    MsrRejected {
        /// The rejected MSR.
        index: u32,
    },
    /// More MSRs than one KVM_GET/SET_MSRS call takes.
    #[error("{0} MSRs exceed the limit of {max}", max = kvm_bindings::KVM_MAX_MSR_ENTRIES)]
    TooManyMsrs(usize),
    /// The exception bitmap asks for exits KVM cannot produce (only #DB and #BP can be
    /// intercepted through KVM_SET_GUEST_DEBUG).
    #[error("exception bitmap {0:#x} has vectors KVM cannot intercept")]
    UnsupportedExceptionBitmap(u32),
    /// The last exit was not the kind this call completes (e.g. an MSR answer after an I/O exit).
    #[error("last exit was not {0}")]
    NotInExit(&'static str),
    /// A CPUID template could not be built.
    #[error("CPUID template")]
    Cpuid(#[source] crate::cpuid::CpuidError),
    /// A saved vCPU state with a version this crate cannot read.
    #[error("vCPU state version {0} unsupported")]
    StateVersion(u32),
    /// A signal-handler or thread operation failed.
    #[error("{op} failed")]
    Os {
        /// The operation.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A machine-check bank count KVM does not support (0, or more than it offers).
    #[error("{banks} machine-check banks requested, KVM supports 1..={supported}")]
    MceBanks {
        /// Requested.
        banks: u8,
        /// KVM's maximum (KVM_X86_GET_MCE_CAP_SUPPORTED bits 7:0).
        supported: u8,
    },
    /// Too many memory regions for the VM's slots.
    #[error("no free KVM memory slot (limit {0})")]
    NoMemorySlot(usize),
}

impl Error {
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}
