//! Guest memory accesses of the request path.
//!
//! Everything goes through the memory's own `GuestMemory` accessors. The queue worker hands in
//! a [`vmkit_virtio::memory::CachedMemory`] view whenever the memory is plain (no IOMMU), which
//! serves single-region accesses without vm-memory's generic lookup and slice iterator; IOMMU
//! memory keeps its translation and permission checks.

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

/// Whether `addr..addr+len` is accessible with `perm`.
pub(crate) fn check<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    perm: Permissions,
) -> bool {
    mem.check_range(addr, len, perm)
}

/// Fill `buf` from guest memory at `addr`.
pub(crate) fn read<M: GuestMemory + ?Sized>(mem: &M, buf: &mut [u8], addr: GuestAddress) -> bool {
    mem.read_slice(buf, addr).is_ok()
}

/// Store `buf` in guest memory at `addr`.
pub(crate) fn write<M: GuestMemory + ?Sized>(mem: &M, buf: &[u8], addr: GuestAddress) -> bool {
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
