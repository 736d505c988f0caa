//! Guest memory accesses of a device's request path (moved here from vmkit-block, next to
//! [`CachedMemory`](crate::memory::CachedMemory), for every device).
//!
//! Everything goes through the memory's own `GuestMemory` accessors. Hand in a
//! [`CachedMemory`](crate::memory::CachedMemory) view whenever the memory is plain (no IOMMU):
//! it serves single-region accesses without vm-memory's generic lookup and slice iterator;
//! IOMMU memory keeps its translation and permission checks. Every function answers a
//! guest-controlled address with `false` / `None` when it is not (all) accessible, never a
//! panic.

use vm_memory::bitmap::Bitmap;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, Permissions, VolatileMemory};

/// Whether `addr..addr+len` is accessible with `perm`.
pub fn check<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    perm: Permissions,
) -> bool {
    mem.check_range(addr, len, perm)
}

/// Read a `T` at `addr`: one volatile load when the object lies in one memory slice (the usual
/// case), vm-memory's copy otherwise. `None` when it is not all in guest memory.
pub fn read_obj<M: GuestMemory + ?Sized, T: ByteValued>(mem: &M, addr: GuestAddress) -> Option<T> {
    let mut slices = mem
        .get_slices(addr, size_of::<T>(), Permissions::Read)
        .ok()?;
    match slices.next() {
        Some(Ok(s)) if s.len() == size_of::<T>() => s.get_ref::<T>(0).ok().map(|r| r.load()),
        Some(Ok(_)) => mem.read_obj(addr).ok(),
        _ => None,
    }
}

/// Store one byte at `addr` (marking it dirty); `false` when it is outside guest memory.
pub fn write_u8<M: GuestMemory + ?Sized>(mem: &M, val: u8, addr: GuestAddress) -> bool {
    match mem
        .get_slices(addr, 1, Permissions::Write)
        .map(|mut s| s.next())
    {
        Ok(Some(Ok(s))) => s.get_ref::<u8>(0).map(|r| r.store(val)).is_ok(),
        _ => false,
    }
}

/// Store `buf` in guest memory at `addr`.
pub fn write<M: GuestMemory + ?Sized>(mem: &M, buf: &[u8], addr: GuestAddress) -> bool {
    mem.write_slice(buf, addr).is_ok()
}

/// Append host iovecs covering `addr..addr+len` (marking them dirty when `device_writes`).
pub fn iovecs<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    device_writes: bool,
    out: &mut Vec<libc::iovec>,
) -> bool {
    let perm = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let Ok(slices) = mem.get_slices(addr, len, perm) else {
        return false;
    };
    for slice in slices {
        let Ok(slice) = slice else {
            return false;
        };
        if device_writes {
            slice.bitmap().mark_dirty(0, slice.len());
        }
        out.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::CachedMemory;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

    /// Two adjacent 4 KiB regions, then a hole.
    fn mem() -> GuestMemoryMmap<AtomicBitmap> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)])
            .unwrap()
    }

    #[test]
    fn read_obj_in_one_slice_across_regions_and_outside() {
        let m = mem();
        let bytes: Vec<u8> = (0..32).collect();
        m.write_slice(&bytes, GuestAddress(0xff0)).unwrap();
        for (name, addr, want) in [
            (
                "inside one region",
                0xff0,
                Some(0x0f0e_0d0c_0b0a_0908_0706_0504_0302_0100u128),
            ),
            (
                "unaligned",
                0xff1,
                Some(0x100f_0e0d_0c0b_0a09_0807_0605_0403_0201),
            ),
            (
                "straddles the regions",
                0xff8,
                Some(0x1716_1514_1312_1110_0f0e_0d0c_0b0a_0908),
            ),
            ("runs into the hole", 0x1ff8, None),
            ("outside memory", 0x4000, None),
            ("address overflows", u64::MAX - 4, None),
        ] {
            for cached in [false, true] {
                let got = if cached {
                    read_obj::<_, [u8; 16]>(&CachedMemory::new(&m), GuestAddress(addr))
                } else {
                    read_obj::<_, [u8; 16]>(&m, GuestAddress(addr))
                };
                assert_eq!(
                    got.map(u128::from_le_bytes),
                    want,
                    "{name}, cached {cached}"
                );
            }
        }
    }

    #[test]
    fn write_u8_stores_marks_dirty_and_refuses_outside() {
        let m = mem();
        assert!(write_u8(&CachedMemory::new(&m), 0xab, GuestAddress(0x1234)));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x1234)).unwrap(), 0xab);
        // The bitmap is page-granular: the second region's page is dirty, the first's is not.
        assert!(
            m.find_region(GuestAddress(0x1000))
                .unwrap()
                .bitmap()
                .dirty_at(0x234)
        );
        assert!(!m.find_region(GuestAddress(0)).unwrap().bitmap().dirty_at(0));
        assert!(write_u8(&m, 0xcd, GuestAddress(0xfff)));
        assert_eq!(m.read_obj::<u8>(GuestAddress(0xfff)).unwrap(), 0xcd);
        assert!(!write_u8(&m, 1, GuestAddress(0x2000)));
        assert!(!write_u8(&CachedMemory::new(&m), 1, GuestAddress(u64::MAX)));
    }
}
