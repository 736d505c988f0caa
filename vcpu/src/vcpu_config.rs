//! What a vCPU is created with ([`KvmVm::create_vcpu_with`](crate::KvmVm::create_vcpu_with)):
//! a CPUID template and the machine-check banks (KVM_X86_SETUP_MCE).
//!
//! Without KVM_X86_SETUP_MCE a KVM vCPU reports `KVM_MAX_MCE_BANKS` (32) banks in
//! IA32_MCG_CAP; QEMU sets up 10 (`MCE_BANKS_DEF`) with MCG_CTL_P and MCG_SER_P where KVM
//! supports them, and so does [`VcpuConfig::default`].
//!
//! ```
//! use vmkit_vcpu::vcpu_config::{McgCap, SupportedMce, VcpuConfig};
//!
//! let c = VcpuConfig::default();
//! assert_eq!(c.cpuid.name, "host");
//! assert_eq!(c.mce_banks, Some(10));
//! // QEMU's IA32_MCG_CAP for a host that supports everything: 10 banks, MCG_CTL_P, MCG_SER_P.
//! let kvm = SupportedMce { cap: u64::MAX & !0xff, max_banks: 32 };
//! assert_eq!(McgCap::qemu_like(10, kvm).unwrap().0, 0x0100_010a);
//! ```

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

use crate::cpuid::CpuidTemplate;
use crate::{Error, KvmVcpu, KvmVm};

mod ioctls {
    use kvm_bindings::KVMIO;
    use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};
    ioctl_ior_nr!(KVM_X86_GET_MCE_CAP_SUPPORTED, KVMIO, 0x9d, u64);
    ioctl_iow_nr!(KVM_X86_SETUP_MCE, KVMIO, 0x9c, u64);
}
use ioctls::{KVM_X86_GET_MCE_CAP_SUPPORTED, KVM_X86_SETUP_MCE};

/// IA32_MCG_CAP bit 8: IA32_MCG_CTL present (SDM vol. 3B §16.3.1.1).
pub const MCG_CTL_P: u64 = 1 << 8;
/// IA32_MCG_CAP bit 24: software error recovery support present.
pub const MCG_SER_P: u64 = 1 << 24;
/// QEMU's default bank count (`MCE_BANKS_DEF`, target/i386/cpu.h).
pub const QEMU_MCE_BANKS: u8 = 10;

/// What KVM offers for machine checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SupportedMce {
    /// IA32_MCG_CAP bits KVM supports (KVM_X86_GET_MCE_CAP_SUPPORTED; its bank-count field
    /// is 0, the count is `max_banks`).
    pub cap: u64,
    /// The most banks KVM sets up (the value of KVM_CAP_MCE, `KVM_MAX_MCE_BANKS`).
    pub max_banks: u8,
}

/// An IA32_MCG_CAP value to set up with KVM_X86_SETUP_MCE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct McgCap(pub u64);

impl McgCap {
    /// QEMU's choice (`kvm_arch_init_vcpu`): `banks` banks and MCG_CTL_P | MCG_SER_P, kept
    /// to what `supported` offers. `None` when `banks` is 0 or more than supported.
    pub fn qemu_like(banks: u8, supported: SupportedMce) -> Option<Self> {
        if banks == 0 || banks > supported.max_banks {
            return None;
        }
        Some(Self(
            (MCG_CTL_P | MCG_SER_P) & supported.cap | u64::from(banks),
        ))
    }
}

/// How [`KvmVm::create_vcpu_with`] sets a vCPU up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuConfig {
    /// The CPUID template, built for this vCPU ([`CpuidTemplate::build`]).
    pub cpuid: CpuidTemplate,
    /// vCPUs in the VM (CPUID topology).
    pub nr_vcpus: u32,
    /// Machine-check banks to set up (`None`: leave KVM's default of 32).
    pub mce_banks: Option<u8>,
}

impl Default for VcpuConfig {
    /// The `host` template, one vCPU, QEMU's 10 banks.
    fn default() -> Self {
        Self {
            cpuid: CpuidTemplate::host(),
            nr_vcpus: 1,
            mce_banks: Some(QEMU_MCE_BANKS),
        }
    }
}

impl KvmVm {
    /// The IA32_MCG_CAP bits (KVM_X86_GET_MCE_CAP_SUPPORTED) and bank count (KVM_CAP_MCE)
    /// KVM supports.
    ///
    /// # Errors
    /// [`Error::Os`] when the ioctl fails.
    pub fn supported_mce(&self) -> Result<SupportedMce, Error> {
        let banks = self.kvm().check_extension_int(kvm_ioctls::Cap::Mce);
        let mut cap = 0u64;
        // SAFETY: a /dev/kvm system ioctl writing one u64 into `cap`.
        let ret =
            unsafe { ioctl_with_mut_ref(self.kvm(), KVM_X86_GET_MCE_CAP_SUPPORTED(), &mut cap) };
        if ret < 0 {
            return Err(Error::Os {
                op: "KVM_X86_GET_MCE_CAP_SUPPORTED",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(SupportedMce {
            cap,
            max_banks: banks.clamp(0, 255) as u8,
        })
    }

    /// Create vCPU `id` as `config` says: its CPUID template built for it and set, then its
    /// machine-check banks set up.
    ///
    /// # Errors
    /// Creating the vCPU, building or setting the CPUID table, or an unsupported bank count
    /// ([`Error::MceBanks`]) / a failing KVM_X86_SETUP_MCE.
    pub fn create_vcpu_with(&self, id: u64, config: &VcpuConfig) -> Result<KvmVcpu, Error> {
        let vcpu = self.create_vcpu_bare(id)?;
        config.cpuid.apply(self, &vcpu, config.nr_vcpus)?;
        if let Some(banks) = config.mce_banks {
            let supported = self.supported_mce()?;
            let cap = McgCap::qemu_like(banks, supported).ok_or(Error::MceBanks {
                banks,
                supported: supported.max_banks,
            })?;
            vcpu.setup_mce(cap)?;
        }
        Ok(vcpu)
    }
}

impl KvmVcpu {
    /// Set up machine-check banks (KVM_X86_SETUP_MCE): IA32_MCG_CAP becomes `cap`, every
    /// bank's control register all-ones.
    ///
    /// # Errors
    /// [`Error::Os`] when KVM refuses `cap` (more banks or bits than it supports).
    pub fn setup_mce(&self, cap: McgCap) -> Result<(), Error> {
        // SAFETY: a vCPU ioctl reading one u64 from `cap.0`.
        let ret = unsafe { ioctl_with_ref(self.fd(), KVM_X86_SETUP_MCE(), &cap.0) };
        if ret < 0 {
            return Err(Error::Os {
                op: "KVM_X86_SETUP_MCE",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_like_keeps_to_what_kvm_supports() {
        // KVM's usual answer: 32 banks, MCG_CTL_P, MCG_SER_P, MCG_LMCE_P, MCG_CMCI_P.
        let kvm = SupportedMce {
            cap: MCG_CTL_P | MCG_SER_P | 1 << 27 | 1 << 10,
            max_banks: 32,
        };
        assert_eq!(
            McgCap::qemu_like(10, kvm),
            Some(McgCap(10 | MCG_CTL_P | MCG_SER_P))
        );
        assert_eq!(McgCap::qemu_like(32, kvm).map(|c| c.0 & 0xff), Some(32));
        assert_eq!(McgCap::qemu_like(33, kvm), None);
        assert_eq!(McgCap::qemu_like(0, kvm), None);
        // A host without SER_P: not offered.
        let old = SupportedMce {
            cap: MCG_CTL_P,
            max_banks: 8,
        };
        assert_eq!(McgCap::qemu_like(4, old), Some(McgCap(4 | MCG_CTL_P)));
    }
}
