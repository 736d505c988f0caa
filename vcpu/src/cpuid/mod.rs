//! CPUID templates: what a guest sees when it executes CPUID, built per vCPU from KVM's
//! supported CPUID (KVM_GET_SUPPORTED_CPUID).
//!
//! A [`CpuidTemplate`] names a base (`host` = everything KVM supports, `minimal` = host with the
//! [`MINIMAL_HIDDEN`](features::MINIMAL_HIDDEN) features hidden), features to hide by name,
//! leaves to remove, register overrides and the hypervisor vendor signature of leaf
//! 0x4000_0000. [`CpuidTemplate::build`] normalizes the result for one vCPU of a VM:
//!
//! * leaf 1: initial APIC ID (EBX 31:24) = vCPU id, logical-processor count (EBX 23:16), HTT,
//!   the hypervisor bit (ECX 31);
//! * leaves 0xB and 0x1F (x2APIC topology): SMT level of 1 thread, core level of `nr_vcpus`
//!   cores, x2APIC ID (EDX) = vCPU id; leaf 4 EAX 31:26 = cores per package − 1;
//! * leaf 0x4000_0000: the vendor signature in EBX, ECX, EDX.
//!
//! Templates are serde data, so users can write them in JSON:
//!
//! ```
//! use vmkit_vcpu::cpuid::{CpuidTemplate, Topology};
//! use kvm_bindings::{CpuId, kvm_cpuid_entry2};
//!
//! let t: CpuidTemplate = serde_json::from_str(r#"{
//!     "name": "no-avx2",
//!     "base": "host",
//!     "hide": ["avx2", "bmi2"],
//!     "hypervisor_signature": "VmkitVmkitVm"
//! }"#)?;
//! // A host that supports leaves 0, 1, 7 and 0x4000_0000 (normally from KVM_GET_SUPPORTED_CPUID).
//! let e = |function, ebx, ecx| kvm_cpuid_entry2 { function, ebx, ecx, ..Default::default() };
//! let host = CpuId::from_entries(&[
//!     kvm_cpuid_entry2 { eax: 7, ..e(0, 0, 0) },
//!     e(1, 0, 1 << 28),
//!     e(7, 0x129, 0),
//!     kvm_cpuid_entry2 { eax: 0x4000_0001, ..e(0x4000_0000, 0, 0) },
//! ]).unwrap();
//! let cpuid = t.build(&host, Topology { vcpu_id: 3, nr_vcpus: 4 })?;
//! let leaf = |f| cpuid.as_slice().iter().find(|x| x.function == f).copied().unwrap();
//! assert_eq!(leaf(1).ebx >> 24, 3); // APIC ID
//! assert_ne!(leaf(1).ecx & (1 << 31), 0); // hypervisor bit
//! assert_eq!(leaf(7).ebx & (1 << 5 | 1 << 8), 0); // avx2, bmi2 hidden
//! assert_eq!(&leaf(0x4000_0000).ebx.to_le_bytes(), b"Vmki");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod features;

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use features::{FEATURES, Feature, Register};

use crate::{Error as VcpuError, KvmVcpu, KvmVm};

/// KVM's own hypervisor signature ("KVMKVMKVM\0\0\0"); Linux enables its KVM paravirtual
/// features only when it sees it.
pub const KVM_SIGNATURE: &str = "KVMKVMKVM\0\0\0";
/// First hypervisor leaf.
pub const HYPERVISOR_LEAF: u32 = 0x4000_0000;

/// Errors building a CPUID table.
#[derive(Debug, Error)]
pub enum CpuidError {
    /// A feature name not in [`FEATURES`].
    #[error("unknown CPUID feature {0:?}")]
    UnknownFeature(String),
    /// The feature's leaf is not in the base table.
    #[error("feature {feature:?}: leaf {leaf:#x}.{subleaf} not present")]
    LeafMissing {
        /// Feature name.
        feature: String,
        /// Its leaf.
        leaf: u32,
        /// Its subleaf.
        subleaf: u32,
    },
    /// `remove_leaves` or an override names a leaf the base table lacks.
    #[error("CPUID leaf {0:#x} not present")]
    NoSuchLeaf(u32),
    /// Template names other than `host` and `minimal`.
    #[error("unknown CPUID template {0:?}")]
    UnknownTemplate(String),
    /// The hypervisor signature must be exactly 12 bytes.
    #[error("hypervisor signature is {0} bytes, expected 12")]
    Signature(usize),
    /// More entries than KVM accepts.
    #[error("too many CPUID entries")]
    TooManyEntries,
    /// A template that is not valid JSON for [`CpuidTemplate`].
    #[error("bad CPUID template JSON")]
    Json(#[from] serde_json::Error),
}

/// Which table a template starts from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuidBase {
    /// KVM's supported CPUID.
    #[default]
    Host,
    /// Host minus [`features::MINIMAL_HIDDEN`].
    Minimal,
}

/// Replace registers of one leaf.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidOverride {
    /// Leaf.
    pub leaf: u32,
    /// Subleaf.
    #[serde(default)]
    pub subleaf: u32,
    /// New EAX.
    #[serde(default)]
    pub eax: Option<u32>,
    /// New EBX.
    #[serde(default)]
    pub ebx: Option<u32>,
    /// New ECX.
    #[serde(default)]
    pub ecx: Option<u32>,
    /// New EDX.
    #[serde(default)]
    pub edx: Option<u32>,
}

fn default_signature() -> String {
    KVM_SIGNATURE.to_string()
}

/// A named CPUID template (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidTemplate {
    /// Name, for logs.
    pub name: String,
    /// Starting table.
    #[serde(default)]
    pub base: CpuidBase,
    /// Feature names to clear.
    #[serde(default)]
    pub hide: Vec<String>,
    /// Leaves (all subleaves) to remove.
    #[serde(default)]
    pub remove_leaves: Vec<u32>,
    /// Register overrides, applied last.
    #[serde(default)]
    pub overrides: Vec<CpuidOverride>,
    /// Leaf 0x4000_0000 vendor signature (12 bytes).
    #[serde(default = "default_signature")]
    pub hypervisor_signature: String,
}

/// The vCPU a table is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// vCPU id = initial APIC ID = x2APIC ID.
    pub vcpu_id: u32,
    /// vCPUs in the VM (one package, one thread per core).
    pub nr_vcpus: u32,
}

fn find(
    entries: &mut [kvm_cpuid_entry2],
    leaf: u32,
    subleaf: u32,
) -> Option<&mut kvm_cpuid_entry2> {
    entries.iter_mut().find(|e| {
        e.function == leaf && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == subleaf)
    })
}

fn reg(e: &mut kvm_cpuid_entry2, r: Register) -> &mut u32 {
    match r {
        Register::Eax => &mut e.eax,
        Register::Ebx => &mut e.ebx,
        Register::Ecx => &mut e.ecx,
        Register::Edx => &mut e.edx,
    }
}

impl CpuidTemplate {
    /// The built-in templates: `host` and `minimal`.
    ///
    /// # Errors
    /// [`CpuidError::UnknownTemplate`] for any other name.
    pub fn named(name: &str) -> Result<Self, CpuidError> {
        match name {
            "host" => Ok(Self::host()),
            "minimal" => Ok(Self {
                name: name.to_string(),
                base: CpuidBase::Minimal,
                ..Self::host()
            }),
            other => Err(CpuidError::UnknownTemplate(other.to_string())),
        }
    }

    /// The `host` template: everything KVM supports, normalized per vCPU.
    pub fn host() -> Self {
        Self {
            name: "host".to_string(),
            base: CpuidBase::Host,
            hide: Vec::new(),
            remove_leaves: Vec::new(),
            overrides: Vec::new(),
            hypervisor_signature: default_signature(),
        }
    }

    /// Parse a user template from JSON.
    pub fn from_json(json: &str) -> Result<Self, CpuidError> {
        Ok(serde_json::from_str(json)?)
    }

    /// Build the table for one vCPU from `host` (KVM's supported CPUID).
    pub fn build(&self, host: &CpuId, topo: Topology) -> Result<CpuId, CpuidError> {
        let sig = self.hypervisor_signature.as_bytes();
        if sig.len() != 12 {
            return Err(CpuidError::Signature(sig.len()));
        }
        let mut entries = host.as_slice().to_vec();
        normalize(&mut entries, topo, sig);
        let minimal = features::MINIMAL_HIDDEN.iter().map(|s| s.to_string());
        let base_hidden: Vec<String> = match self.base {
            CpuidBase::Host => Vec::new(),
            CpuidBase::Minimal => minimal.collect(),
        };
        // Built-in hides skip features the host lacks; user hides must name present leaves.
        for name in &base_hidden {
            if let Some(f) = features::feature(name)
                && let Some(e) = find(&mut entries, f.leaf, f.subleaf)
            {
                *reg(e, f.register) &= !(1 << f.bit);
            }
        }
        for name in &self.hide {
            let f =
                features::feature(name).ok_or_else(|| CpuidError::UnknownFeature(name.clone()))?;
            let e =
                find(&mut entries, f.leaf, f.subleaf).ok_or_else(|| CpuidError::LeafMissing {
                    feature: name.clone(),
                    leaf: f.leaf,
                    subleaf: f.subleaf,
                })?;
            *reg(e, f.register) &= !(1 << f.bit);
        }
        for &leaf in &self.remove_leaves {
            let before = entries.len();
            entries.retain(|e| e.function != leaf);
            if entries.len() == before {
                return Err(CpuidError::NoSuchLeaf(leaf));
            }
        }
        for o in &self.overrides {
            let e = find(&mut entries, o.leaf, o.subleaf).ok_or(CpuidError::NoSuchLeaf(o.leaf))?;
            for (r, v) in [
                (Register::Eax, o.eax),
                (Register::Ebx, o.ebx),
                (Register::Ecx, o.ecx),
                (Register::Edx, o.edx),
            ] {
                if let Some(v) = v {
                    *reg(e, r) = v;
                }
            }
        }
        CpuId::from_entries(&entries).map_err(|_| CpuidError::TooManyEntries)
    }

    /// Build for vCPU `vcpu` of `vm` (with `nr_vcpus` vCPUs) and set it (KVM_SET_CPUID2).
    pub fn apply(&self, vm: &KvmVm, vcpu: &KvmVcpu, nr_vcpus: u32) -> Result<CpuId, VcpuError> {
        let topo = Topology {
            vcpu_id: vcpu.id() as u32,
            nr_vcpus,
        };
        let cpuid = self
            .build(&vm.supported_cpuid()?, topo)
            .map_err(VcpuError::Cpuid)?;
        vcpu.set_cpuid(&cpuid)?;
        Ok(cpuid)
    }
}

/// Bits needed to number `n` items (x2APIC ID shift).
fn shift_for(n: u32) -> u32 {
    n.max(1).next_power_of_two().trailing_zeros()
}

fn normalize(entries: &mut Vec<kvm_cpuid_entry2>, topo: Topology, sig: &[u8]) {
    let id = topo.vcpu_id;
    let n = topo.nr_vcpus.max(1);
    if let Some(e) = find(entries, 1, 0) {
        e.ebx = (e.ebx & 0x0000_ffff) | (id.min(255) << 24) | (n.min(255) << 16);
        if n > 1 {
            e.edx |= 1 << 28;
        } else {
            e.edx &= !(1 << 28);
        }
        e.ecx |= 1 << 31;
    }
    for e in entries.iter_mut().filter(|e| e.function == 4) {
        e.eax = (e.eax & 0x03ff_ffff) | ((n - 1).min(63) << 26);
    }
    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    for leaf in [0xb, 0x1f] {
        let present = entries.iter().any(|e| e.function == leaf);
        if !(present || (leaf == 0xb && max_basic >= 0xb)) {
            continue;
        }
        entries.retain(|e| e.function != leaf);
        let level = |index: u32, eax: u32, ebx: u32, ecx: u32| kvm_cpuid_entry2 {
            function: leaf,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx,
            edx: id,
            ..Default::default()
        };
        // SMT level: 1 thread; core level: n cores; then the invalid level that ends the list.
        entries.push(level(0, 0, 1, 1 << 8));
        entries.push(level(1, shift_for(n), n, 1 | (2 << 8)));
        entries.push(level(2, 0, 0, 2));
    }
    let word = |i: usize| u32::from_le_bytes([sig[i], sig[i + 1], sig[i + 2], sig[i + 3]]);
    match find(entries, HYPERVISOR_LEAF, 0) {
        Some(e) => {
            e.ebx = word(0);
            e.ecx = word(4);
            e.edx = word(8);
        }
        None => entries.push(kvm_cpuid_entry2 {
            function: HYPERVISOR_LEAF,
            eax: HYPERVISOR_LEAF,
            ebx: word(0),
            ecx: word(4),
            edx: word(8),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests;
