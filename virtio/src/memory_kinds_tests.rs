//! A device activated over each kind of guest memory a VMM hands it: `GuestMemoryMmap`,
//! `GuestMemoryAtomic` (memory hot-plug) and `IommuMemory` (behind a virtual IOMMU).

use std::sync::{Arc, RwLock, RwLockReadGuard};

use vm_memory::iommu::{Error as IommuError, IotlbIterator, IovaRange};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap, IommuMemory, Iotlb,
    Permissions,
};

use crate::rng::Rng;
use crate::spec::*;
use crate::test_utils::{Desc, DriverHarness, HARNESS_MEM_SIZE};

fn plain() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), HARNESS_MEM_SIZE as usize)]).unwrap()
}

/// Bring the device up, fill one 32-byte buffer; returns the used entry.
fn one_request<M: crate::memory::VirtioMemory>(
    h: &mut DriverHarness<Rng<M>, M>,
) -> Vec<(u16, u32)> {
    h.activate(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX)
        .unwrap();
    let c = h.add_chain(0, &[Desc::Writable(32)]).unwrap();
    h.kick(0);
    let used = h.used(0);
    assert_eq!(used, [(c.head, 32)]);
    assert_eq!(h.interrupts(), 1);
    used
}

#[test]
fn activation_over_guest_memory_mmap() {
    let mut h = DriverHarness::new(Rng::default());
    one_request(&mut h);
}

/// Over `GuestMemoryAtomic`, each pass takes the memory as it is then: a region the VMM
/// hot-plugs after activation is usable by the very next request.
#[test]
fn activation_over_guest_memory_atomic_sees_hot_plugged_memory() {
    let mem = plain();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let mut h = DriverHarness::with_device_memory(Rng::default(), mem.clone(), atomic.clone());
    one_request(&mut h);
    // Hot-plug 1 MiB at 4 GiB, then a request whose buffer lives there.
    const HOTPLUG: u64 = 1 << 32;
    let region = GuestRegionMmap::from_range(GuestAddress(HOTPLUG), 1 << 20, None).unwrap();
    let grown = mem.insert_region(Arc::new(region)).unwrap();
    atomic.lock().unwrap().replace(grown.clone());
    let c = h
        .add_chain(
            0,
            &[Desc::Raw {
                addr: HOTPLUG,
                len: 64,
                writable: true,
            }],
        )
        .unwrap();
    h.kick(0);
    assert_eq!(h.used(0), [(c.head, 64)]);
    let mut buf = [0u8; 64];
    grown.read_slice(&mut buf, GuestAddress(HOTPLUG)).unwrap();
    assert_ne!(
        buf, [0; 64],
        "written in the new region (with overwhelming probability)"
    );
    assert_eq!(h.device().metrics().bad_descriptors, 0);
}

/// An IOMMU that maps guest memory 1:1 read-write.
#[derive(Debug)]
struct IdentityIommu(RwLock<Iotlb>);

impl vm_memory::Iommu for IdentityIommu {
    type IotlbGuard<'a> = RwLockReadGuard<'a, Iotlb>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<Self::IotlbGuard<'_>>, IommuError> {
        let tlb = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Iotlb::lookup(tlb, iova, length, access).map_err(|_| IommuError::CannotResolve {
            iova_range: IovaRange { base: iova, length },
            reason: "not mapped".into(),
        })
    }
}

#[test]
fn activation_over_iommu_memory() {
    let mem = plain();
    let mut tlb = Iotlb::new();
    tlb.set_mapping(
        GuestAddress(0),
        GuestAddress(0),
        HARNESS_MEM_SIZE as usize,
        Permissions::ReadWrite,
    )
    .unwrap();
    let iommu_mem = IommuMemory::new(mem.clone(), IdentityIommu(RwLock::new(tlb)), true, ());
    let mut h = DriverHarness::with_device_memory(Rng::default(), mem, iommu_mem);
    one_request(&mut h);
}
