//! Guest memory accesses of the request path, with a fast path for plain (non-IOMMU) memory.
//!
//! vm-memory 0.18's generic `GuestMemory` accessors walk a slice iterator on every call. When
//! the memory is plain physical memory (`physical_memory()` is `Some`) and the range sits in one
//! region, one region lookup gives the `VolatileSlice` directly; anything else (IOMMU-translated
//! memory, ranges crossing regions, errors) takes the generic path, so results are identical.

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, Permissions};

/// Whether `addr..addr+len` is accessible with `perm`.
pub(crate) fn check<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    perm: Permissions,
) -> bool {
    if let Some(pm) = mem.physical_memory()
        && pm.get_slice(addr, len).is_ok()
    {
        return true;
    }
    mem.check_range(addr, len, perm)
}

/// Fill `buf` from guest memory at `addr`.
pub(crate) fn read<M: GuestMemory + ?Sized>(mem: &M, buf: &mut [u8], addr: GuestAddress) -> bool {
    if let Some(pm) = mem.physical_memory()
        && let Ok(s) = pm.get_slice(addr, buf.len())
    {
        return s.copy_to(buf) == buf.len();
    }
    mem.read_slice(buf, addr).is_ok()
}

/// Store `buf` in guest memory at `addr`.
pub(crate) fn write<M: GuestMemory + ?Sized>(mem: &M, buf: &[u8], addr: GuestAddress) -> bool {
    if let Some(pm) = mem.physical_memory()
        && let Ok(s) = pm.get_slice(addr, buf.len())
    {
        s.copy_from(buf);
        return true;
    }
    mem.write_slice(buf, addr).is_ok()
}

/// Append host iovecs covering `addr..addr+len` (marking them dirty when `device_writes`).
pub(crate) fn iovecs<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    device_writes: bool,
    out: &mut Vec<libc::iovec>,
) -> bool {
    if let Some(pm) = mem.physical_memory()
        && let Ok(slice) = pm.get_slice(addr, len)
    {
        if device_writes {
            slice.bitmap().mark_dirty(0, slice.len());
        }
        out.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
        return true;
    }
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
