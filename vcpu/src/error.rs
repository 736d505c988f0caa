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
    /// Too many memory regions for the VM's slots.
    #[error("no free KVM memory slot (limit {0})")]
    NoMemorySlot(usize),
}

impl Error {
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}
