//! The synchronous engine's fast path for the request nearly every driver sends: a read or
//! write of one buffer.
//!
//! [`try_read_write`] accepts exactly one chain shape — a device-readable header of at least 16
//! bytes, one data descriptor of the request's direction, a device-writable status descriptor,
//! all in one memory region each — and does it in one pass: it checks what the parser would
//! check, calls `pread`/`pwrite` on a raw image's file descriptor (as the io_uring engine does;
//! one `read_vectored`/`write_vectored` for other images) straight on the guest buffer, stores
//! the status byte and counts the request. Anything
//! else — another request type, more or fewer descriptors, any field the parser would reject,
//! a buffer across memory regions — returns `None` *before any effect*, and the chain goes
//! through the general path ([`crate::request::parse_reusing`] and [`crate::exec`]), which
//! gives the exact status and counter. The two paths agree on every chain; the tests compare
//! them on random chains.
//!
//! Why a second path for one shape: on a 4 KiB raw read the general path runs ~1,480
//! instructions on ~104 distinct 64-byte code lines, this one ~1,080 on ~63 (callgrind, virtio-
//! queue's part included), and the code run between two system calls is cold in the
//! instruction cache — each KiB of it costs 25–35 ns after a `pread` on these machines
//! (block/README.md, Bench). That brings the device level with one that makes no checks.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::RawFd;

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestMemory, Permissions};

use crate::defs::*;
use crate::image::DiskImage;
use crate::metrics::BlockMetricsSnapshot;
use crate::request::ParseConfig;

/// Run `chain` if it is a single-buffer read or write the fast path takes, returning its used
/// length; `None` (nothing done, nothing counted) sends it to the general path. The I/O is a
/// `pread`/`pwrite` on `fd` when the image has a raw file descriptor (`DiskImage::raw_fd`),
/// else one `read_vectored`/`write_vectored` of `disk`.
#[inline]
pub(crate) fn try_read_write<M: GuestMemory>(
    chain: &DescriptorChain<&M>,
    mem: &M,
    cfg: &ParseConfig,
    disk: &mut dyn DiskImage,
    fd: Option<RawFd>,
    tally: &mut BlockMetricsSnapshot,
) -> Option<u32> {
    let mut descs = chain.clone();
    let (hdr, data, status) = (descs.next()?, descs.next()?, descs.next()?);
    if status.has_next()
        || status.len() == 0
        || hdr.is_write_only()
        || hdr.len() < VIRTIO_BLK_REQ_HDR_SIZE
        || !status.is_write_only()
    {
        return None;
    }
    // `Bytes::read_obj`/`write_obj` rather than `crate::guest`'s single loads and stores: they
    // run the code virtio-queue just ran for the descriptors and the used ring, which is warm.
    let raw: [u8; VIRTIO_BLK_REQ_HDR_SIZE as usize] = mem.read_obj(hdr.addr()).ok()?;
    let [t0, t1, t2, t3, _, _, _, _, s @ ..] = raw;
    let write = match u32::from_le_bytes([t0, t1, t2, t3]) {
        VIRTIO_BLK_T_IN => false,
        VIRTIO_BLK_T_OUT if !cfg.read_only => true,
        _ => return None,
    };
    let sector = u64::from_le_bytes(s);
    let len = data.len();
    if data.is_write_only() == write
        || len == 0
        || !len.is_multiple_of(SECTOR_SIZE as u32)
        || len > cfg.size_max
        || cfg.seg_max == 0
        || sector
            .checked_add(u64::from(len) >> SECTOR_SHIFT)
            .is_none_or(|end| end > cfg.capacity)
        || !crate::guest::check(mem, status.addr(), 1, Permissions::Write)
    {
        return None;
    }
    let perm = if write {
        Permissions::Read
    } else {
        Permissions::Write
    };
    let slice = match mem.get_slices(data.addr(), len as usize, perm).ok()?.next() {
        Some(Ok(s)) if s.len() == len as usize => s,
        _ => return None,
    };
    if !write {
        slice.bitmap().mark_dirty(0, slice.len());
    }
    let guard = slice.ptr_guard_mut();
    let (buf, offset) = (guard.as_ptr(), sector << SECTOR_SHIFT);
    let ok = match fd {
        Some(fd) => transfer(fd, buf, len as usize, offset, write),
        None => image_transfer(disk, buf, len as usize, offset, write),
    };
    let (code, used) = match (ok, write) {
        (true, true) => {
            tally.count_write(u64::from(len));
            (VIRTIO_BLK_S_OK, 1)
        }
        (true, false) => {
            tally.count_read(u64::from(len));
            (VIRTIO_BLK_S_OK, len + 1)
        }
        (false, _) => {
            tally.io_errors += 1;
            (VIRTIO_BLK_S_IOERR, 1)
        }
    };
    if mem.write_obj(code as u8, status.addr()).is_err() {
        tally.memory_errors += 1;
        return Some(0);
    }
    Some(used)
}

/// Move the `len` bytes at `buf` to (`write`) or from `disk` at `offset` with one vectored call
/// of the image.
fn image_transfer(
    disk: &mut dyn DiskImage,
    buf: *mut u8,
    len: usize,
    offset: u64,
    write: bool,
) -> bool {
    if write {
        // SAFETY: `buf` maps `len` bytes of guest memory that the chain lends the device for
        // this request; the mapping outlives the call.
        let data = unsafe { std::slice::from_raw_parts(buf, len) };
        disk.write_vectored(&[IoSlice::new(data)], offset).is_ok()
    } else {
        // SAFETY: as above, and the buffer is device-writable.
        let data = unsafe { std::slice::from_raw_parts_mut(buf, len) };
        disk.read_vectored(&mut [IoSliceMut::new(data)], offset)
            .is_ok()
    }
}

/// Move all `len` bytes at `buf` to (`write`) or from the file `fd` at `offset`. One system
/// call and one comparison in the usual case; the rest is out of line.
#[inline]
fn transfer(fd: RawFd, buf: *mut u8, len: usize, offset: u64, write: bool) -> bool {
    // SAFETY: `buf` names `len` bytes of guest memory that the chain lends the device for
    // this request (device-writable for reads); the mapping outlives the call. The offset
    // fits `off_t`: it lies inside the image, whose size does.
    let n = unsafe {
        if write {
            libc::pwrite(fd, buf.cast(), len, offset as libc::off_t)
        } else {
            libc::pread(fd, buf.cast(), len, offset as libc::off_t)
        }
    };
    n as usize == len || transfer_rest(fd, buf, len, offset, write, n)
}

/// The rest of [`transfer`] after its first system call moved `n` bytes (or failed): retry
/// after an interruption, go on after a short transfer, fail on an error or end of file.
#[cold]
#[inline(never)]
fn transfer_rest(fd: RawFd, buf: *mut u8, len: usize, offset: u64, write: bool, n: isize) -> bool {
    let mut done = 0usize;
    let mut n = n;
    loop {
        match usize::try_from(n) {
            Ok(0) => return false,
            Ok(moved) => done += moved,
            Err(_) if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {
            }
            Err(_) => return false,
        }
        if done >= len {
            return true;
        }
        // SAFETY: as in `transfer`; `done < len`, so the rest lies inside the same buffer.
        n = unsafe {
            let (p, left, off) = (
                buf.add(done),
                len - done,
                (offset + done as u64) as libc::off_t,
            );
            if write {
                libc::pwrite(fd, p.cast(), left, off)
            } else {
                libc::pread(fd, p.cast(), left, off)
            }
        };
    }
}
