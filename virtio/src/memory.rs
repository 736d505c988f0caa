//! Guest memory for devices: [`VirtioMemory`], what a transport and its device can be built
//! over (`GuestMemoryMmap`, `IommuMemory` with feature `iommu`, and `GuestMemoryAtomic` for
//! memory hot-plug), and [`CachedMemory`], a `GuestMemory` view for the hot path of queue
//! processing.
//!
//! ## `VirtioMemory`
//!
//! A device works on a *snapshot* of guest memory for the length of one queue pass
//! ([`VirtioMemory::memory`]): for plain and IOMMU memory that is a borrow of the memory
//! itself (no cost); for vm-memory's `GuestMemoryAtomic` — how a VMM that hot-plugs memory
//! (Cloud Hypervisor) shares it — it is the current `GuestMemoryLoadGuard`, so a region added
//! between two passes is seen by the next one, and a pass never sees memory change under it.
//!
//! ## `CachedMemory`
//!
//! vm-memory 0.18 reaches every guest access through `GuestMemory::get_slices`: a region
//! lookup (binary search), a slice iterator, a peekable adapter and a fold, even for the 2-byte
//! ring index and the 16-byte descriptor that virtio-queue reads a handful of times per request.
//! On a 4 KiB block request that is most of the device's own CPU time.
//!
//! `CachedMemory` wraps a plain `GuestMemoryBackend` (what `GuestMemory::physical_memory`
//! returns when no IOMMU translates addresses) and remembers the region of the last access.
//! An access that lies inside that region becomes one bounds check and one
//! `GuestMemoryRegion::get_slice`; anything else (another region, a range crossing regions, an
//! address outside memory) takes vm-memory's own path, so results and errors are identical.
//! Slices carry the region's dirty bitmap as usual.
//!
//! Build one per batch of work (it borrows the memory) and hand `&CachedMemory` to
//! virtio-queue wherever it takes a memory reference:
//!
//! ```
//! use virtio_queue::{QueueT, mock::MockSplitQueue};
//! use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};
//! use vmkit_virtio::memory::CachedMemory;
//!
//! let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
//! let mock = MockSplitQueue::new(&mem, 16);
//! let mut queue = mock.create_queue::<virtio_queue::Queue>().unwrap();
//! let fast = CachedMemory::new(mem.physical_memory().unwrap());
//! assert!(queue.pop_descriptor_chain(&fast).is_none()); // nothing published yet
//! ```

use std::cell::Cell;
use std::iter::FusedIterator;
use std::ops::Deref;

use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{GuestMemoryBackendSliceIterator, GuestMemorySliceIterator};
use vm_memory::{
    Address, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
    Permissions, VolatileSlice,
};

/// Guest memory a transport and its device can be built over (see the
/// [module docs](self#virtiomemory)).
pub trait VirtioMemory: Clone + Send + Sync + 'static {
    /// The memory a pass works on.
    type Memory: GuestMemory;
    /// A snapshot of it, held for one pass.
    type Guard<'a>: Deref<Target = Self::Memory>
    where
        Self: 'a;
    /// The memory as it is now.
    fn memory(&self) -> Self::Guard<'_>;
}

impl<B> VirtioMemory for vm_memory::GuestMemoryMmap<B>
where
    B: vm_memory::bitmap::Bitmap + 'static,
    Self: Clone + Send + Sync,
{
    type Memory = Self;
    type Guard<'a> = &'a Self;
    fn memory(&self) -> &Self {
        self
    }
}

#[cfg(feature = "iommu")]
impl<M, I> VirtioMemory for vm_memory::IommuMemory<M, I>
where
    M: GuestMemoryBackend + Clone + Send + Sync + 'static,
    I: vm_memory::Iommu + 'static,
    Self: Clone + Send + Sync,
{
    type Memory = Self;
    type Guard<'a> = &'a Self;
    fn memory(&self) -> &Self {
        self
    }
}

impl<M> VirtioMemory for vm_memory::GuestMemoryAtomic<M>
where
    M: GuestMemory + Send + Sync + 'static,
    Self: Clone + Send + Sync,
{
    type Memory = M;
    type Guard<'a> = vm_memory::GuestMemoryLoadGuard<M>;
    fn memory(&self) -> vm_memory::GuestMemoryLoadGuard<M> {
        vm_memory::GuestAddressSpace::memory(self)
    }
}

/// A `GuestMemory` over a plain `GuestMemoryBackend` that serves accesses inside the last
/// region it used without a lookup. Not `Sync`: one per worker thread.
#[derive(Debug)]
pub struct CachedMemory<'a, P: GuestMemoryBackend + ?Sized> {
    mem: &'a P,
    last: Cell<Option<&'a P::R>>,
}

impl<P: GuestMemoryBackend + ?Sized> Clone for CachedMemory<'_, P> {
    fn clone(&self) -> Self {
        Self {
            mem: self.mem,
            last: self.last.clone(),
        }
    }
}

impl<'a, P: GuestMemoryBackend + ?Sized> CachedMemory<'a, P> {
    /// A view of `mem`; no region is cached yet.
    pub fn new(mem: &'a P) -> Self {
        Self {
            mem,
            last: Cell::new(None),
        }
    }

    /// The wrapped memory.
    pub fn inner(&self) -> &'a P {
        self.mem
    }

    /// The region holding all of `addr..addr+count` and the offset of `addr` in it, if one
    /// region holds it (the cached one is tried first).
    fn region_for(&self, addr: GuestAddress, count: usize) -> Option<(&'a P::R, u64)> {
        let fits = |r: &P::R| {
            let off = addr.checked_offset_from(r.start_addr())?;
            let end = off.checked_add(count as u64)?;
            (end <= r.len()).then_some(off)
        };
        if let Some(r) = self.last.get()
            && let Some(off) = fits(r)
        {
            return Some((r, off));
        }
        let r = self.mem.find_region(addr)?;
        let off = fits(r)?;
        self.last.set(Some(r));
        Some((r, off))
    }
}

/// The slices of one access: a single slice from the cached path, or vm-memory's iterator.
#[derive(Debug)]
pub enum CachedSlices<'a, B, I> {
    /// The access lies in one region (`None` once taken).
    One(Option<VolatileSlice<'a, B>>),
    /// Anything else, through vm-memory.
    Generic(I),
}

impl<'a, B, I> Iterator for CachedSlices<'a, B, I>
where
    I: Iterator<Item = vm_memory::guest_memory::Result<VolatileSlice<'a, B>>>,
{
    type Item = vm_memory::guest_memory::Result<VolatileSlice<'a, B>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Self::One(s) => s.take().map(Ok),
            Self::Generic(it) => it.next(),
        }
    }
}

impl<'a, B, I> FusedIterator for CachedSlices<'a, B, I> where
    I: FusedIterator<Item = vm_memory::guest_memory::Result<VolatileSlice<'a, B>>>
{
}

impl<'a, B: vm_memory::bitmap::BitmapSlice, I> GuestMemorySliceIterator<'a, B>
    for CachedSlices<'a, B, I>
where
    I: FusedIterator<Item = vm_memory::guest_memory::Result<VolatileSlice<'a, B>>>,
{
}

impl<'m, P: GuestMemoryBackend + ?Sized> GuestMemory for CachedMemory<'m, P> {
    type PhysicalMemory = P;
    type Bitmap = <P::R as GuestMemoryRegion>::B;

    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        self.region_for(addr, count).is_some() || self.mem.check_range(addr, count)
    }

    #[inline]
    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> vm_memory::guest_memory::Result<impl GuestMemorySliceIterator<'a, BS<'a, Self::Bitmap>>>
    {
        if count > 0
            && let Some((r, off)) = self.region_for(addr, count)
            && let Ok(slice) = r.get_slice(MemoryRegionAddress(off), count)
        {
            return Ok(CachedSlices::<_, GuestMemoryBackendSliceIterator<'a, P>>::One(Some(slice)));
        }
        Ok(CachedSlices::Generic(self.mem.get_slices(addr, count)))
    }

    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        Some(self.mem)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;

    fn mem() -> GuestMemoryMmap {
        // Two regions with a hole between them.
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000), (GuestAddress(0x3000), 0x1000)])
            .unwrap()
    }

    #[test]
    fn same_results_as_vm_memory() {
        let m = mem();
        let fast = CachedMemory::new(&m);
        let pattern: Vec<u8> = (0..=255u8).cycle().take(0x4000).collect();
        m.write_slice(pattern.get(..0x2000).unwrap(), GuestAddress(0))
            .unwrap();
        // In one region, at both ends, across the hole, past the end, empty.
        for (addr, len) in [
            (0u64, 16usize),
            (0x1ff0, 16),
            (0x1ff8, 16),
            (0x2000, 1),
            (0x2ff0, 32),
            (0x3000, 0x1000),
            (0x3ff8, 16),
            (0x4000, 1),
            (0x10, 0),
            (u64::MAX, 2),
        ] {
            let a = GuestAddress(addr);
            let mut x = vec![0u8; len];
            let mut y = vec![0u8; len];
            let rx = m.read_slice(&mut x, a).map_err(|e| e.to_string());
            let ry = fast.read_slice(&mut y, a).map_err(|e| e.to_string());
            assert_eq!(rx, ry, "read {addr:#x}+{len:#x}");
            assert_eq!(x, y);
            assert_eq!(
                GuestMemory::check_range(&m, a, len, Permissions::Read),
                fast.check_range(a, len, Permissions::Read),
                "check {addr:#x}+{len:#x}"
            );
            let wx = m.write_slice(&x, a).map_err(|e| e.to_string());
            let wy = fast.write_slice(&y, a).map_err(|e| e.to_string());
            assert_eq!(wx, wy, "write {addr:#x}+{len:#x}");
        }
    }

    #[test]
    fn cache_follows_the_last_region() {
        let m = mem();
        let fast = CachedMemory::new(&m);
        fast.write_obj(7u32, GuestAddress(0x3004)).unwrap();
        assert_eq!(fast.read_obj::<u32>(GuestAddress(0x3004)).unwrap(), 7);
        fast.write_obj(9u32, GuestAddress(0x10)).unwrap();
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x10)).unwrap(), 9);
        assert_eq!(fast.read_obj::<u32>(GuestAddress(0x3004)).unwrap(), 7);
        // A read crossing into the hole fails exactly as vm-memory's does.
        assert!(fast.read_obj::<u64>(GuestAddress(0x1ffc)).is_err());
    }

    #[test]
    fn writes_mark_the_dirty_bitmap() {
        use vm_memory::bitmap::{AtomicBitmap, Bitmap};
        let m =
            vm_memory::GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 0x4000)])
                .unwrap();
        let fast = CachedMemory::new(&m);
        fast.write_obj(1u8, GuestAddress(0x2001)).unwrap();
        let r = m.find_region(GuestAddress(0)).unwrap();
        assert!(r.bitmap().dirty_at(0x2000));
        assert!(!r.bitmap().dirty_at(0x1000));
    }
}
