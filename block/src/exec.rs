//! Synchronous execution of a parsed [`Request`] against a [`DiskImage`].
//!
//! Reads and writes of raw images go straight between the file and guest memory
//! (`preadv`/`pwritev` on the guest's buffers); other formats go through a bounce buffer, one
//! data segment at a time (so it never exceeds `size_max`).

use std::os::fd::RawFd;

use vm_memory::GuestMemory;

use crate::defs::*;
use crate::image::{DiskImage, ImageError};
use crate::metrics::{BlockMetrics, add, inc};
use crate::request::{DataSegment, DiscardSegment, Request, RequestKind};

/// Errors while executing a request.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The image operation failed.
    #[error("image operation failed")]
    Image(#[source] ImageError),
    /// A guest buffer could not be accessed (it was checked at parse time, so the memory map
    /// changed meanwhile).
    #[error("guest memory access failed")]
    Memory,
    /// A vectored file operation transferred fewer bytes than asked.
    #[error("short transfer")]
    Short,
}

/// The outcome of a request: status byte and used length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// `VIRTIO_BLK_S_*`.
    pub status: u8,
    /// Bytes written into the chain's device-writable buffers, including the status byte.
    pub used_len: u32,
}

/// Collect host iovecs for guest segments, marking them dirty when the device writes them.
pub(crate) fn guest_iovecs<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[DataSegment],
    device_writes: bool,
    out: &mut Vec<libc::iovec>,
) -> Result<(), ExecError> {
    for s in segs {
        if !crate::guest::iovecs(mem, s.addr, s.len as usize, device_writes, out) {
            return Err(ExecError::Memory);
        }
    }
    Ok(())
}

/// `preadv`/`pwritev` the whole of `iov` at `offset`, continuing after partial transfers.
fn rw_vectored(
    fd: RawFd,
    iov: &mut [libc::iovec],
    mut offset: u64,
    write: bool,
) -> Result<u64, ExecError> {
    let mut done = 0u64;
    let mut start = 0usize;
    while start < iov.len() {
        let rest = iov.get(start..).unwrap_or(&[]);
        let cnt = rest.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        let off = libc::off_t::try_from(offset).map_err(|_| ExecError::Short)?;
        // SAFETY: every iovec points into guest memory that `guest_iovecs` obtained from
        // `get_slices` for exactly that length; the memory stays mapped for this call.
        let n = unsafe {
            if write {
                libc::pwritev(fd, rest.as_ptr(), cnt, off)
            } else {
                libc::preadv(fd, rest.as_ptr(), cnt, off)
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ExecError::Image(ImageError::Io(e)));
        }
        if n == 0 {
            return Err(ExecError::Short);
        }
        let mut n = n as usize;
        done += n as u64;
        offset += n as u64;
        while n > 0 {
            let Some(v) = iov.get_mut(start) else { break };
            if n >= v.iov_len {
                n -= v.iov_len;
                start += 1;
            } else {
                // SAFETY: advancing inside the same iovec's buffer (n < iov_len).
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
        while iov.get(start).is_some_and(|v| v.iov_len == 0) {
            start += 1;
        }
    }
    Ok(done)
}

/// Runs requests synchronously; keeps a bounce buffer between calls.
#[derive(Debug, Default)]
pub struct SyncExecutor {
    bounce: Vec<u8>,
    iov: Vec<libc::iovec>,
    /// The 20-byte `VIRTIO_BLK_T_GET_ID` answer.
    pub id: [u8; VIRTIO_BLK_ID_BYTES],
}

// SAFETY: the iovec scratch holds raw pointers only between `guest_iovecs` and the end of the
// same call; it is cleared before use, so moving the executor across threads is sound.
unsafe impl Send for SyncExecutor {}

impl SyncExecutor {
    /// An executor answering GET_ID with `id`.
    pub fn new(id: [u8; VIRTIO_BLK_ID_BYTES]) -> Self {
        Self {
            id,
            ..Default::default()
        }
    }

    /// Execute `req`, write its status byte, count it, and return the outcome.
    pub fn execute<M: GuestMemory + ?Sized>(
        &mut self,
        req: &Request,
        mem: &M,
        disk: &mut dyn DiskImage,
        metrics: &BlockMetrics,
    ) -> Outcome {
        let result = self.run(req, mem, disk, metrics);
        let (status, used_len) = match result {
            Ok(data_written) => (VIRTIO_BLK_S_OK as u8, data_written.saturating_add(1)),
            Err(ExecError::Memory) => {
                inc(&metrics.memory_errors);
                (VIRTIO_BLK_S_IOERR as u8, 1)
            }
            Err(_) => {
                inc(&metrics.io_errors);
                (VIRTIO_BLK_S_IOERR as u8, 1)
            }
        };
        finish(mem, req.status_addr, status, used_len, metrics)
    }

    /// Move `len` bytes between the guest segments `data` and a raw file at `offset` with one
    /// preadv/pwritev: `to_disk` for OUT (the device reads guest memory), else IN.
    fn transfer_vectored<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        fd: RawFd,
        data: &[DataSegment],
        offset: u64,
        len: u64,
        to_disk: bool,
    ) -> Result<(), ExecError> {
        self.iov.clear();
        // For IN the device writes guest buffers; for OUT it reads them.
        guest_iovecs(mem, data, !to_disk, &mut self.iov)?;
        let n = rw_vectored(fd, &mut self.iov, offset, to_disk);
        self.iov.clear();
        if n? != len {
            return Err(ExecError::Short);
        }
        Ok(())
    }

    /// Do the I/O; returns bytes written into guest buffers.
    fn run<M: GuestMemory + ?Sized>(
        &mut self,
        req: &Request,
        mem: &M,
        disk: &mut dyn DiskImage,
        metrics: &BlockMetrics,
    ) -> Result<u32, ExecError> {
        match &req.kind {
            RequestKind::In { sector, data } => {
                let offset = sector << SECTOR_SHIFT;
                let len = req.data_len();
                if let Some(fd) = disk.raw_fd() {
                    self.transfer_vectored(mem, fd, data, offset, len, false)?;
                } else {
                    // Segment by segment: the bounce buffer never exceeds `size_max`.
                    let mut off = offset;
                    for s in data {
                        self.bounce.resize(s.len as usize, 0);
                        disk.read_at(&mut self.bounce, off)
                            .map_err(ExecError::Image)?;
                        if !crate::guest::write(mem, &self.bounce, s.addr) {
                            return Err(ExecError::Memory);
                        }
                        off += u64::from(s.len);
                    }
                }
                inc(&metrics.reads);
                add(&metrics.read_bytes, len);
                Ok(len as u32)
            }
            RequestKind::Out { sector, data } => {
                let offset = sector << SECTOR_SHIFT;
                let len = req.data_len();
                if let Some(fd) = disk.raw_fd() {
                    self.transfer_vectored(mem, fd, data, offset, len, true)?;
                } else {
                    let mut off = offset;
                    for s in data {
                        self.bounce.resize(s.len as usize, 0);
                        if !crate::guest::read(mem, &mut self.bounce, s.addr) {
                            return Err(ExecError::Memory);
                        }
                        disk.write_at(&self.bounce, off).map_err(ExecError::Image)?;
                        off += u64::from(s.len);
                    }
                }
                inc(&metrics.writes);
                add(&metrics.write_bytes, len);
                Ok(0)
            }
            RequestKind::Flush => {
                disk.flush().map_err(ExecError::Image)?;
                inc(&metrics.flushes);
                Ok(0)
            }
            RequestKind::GetId { data } => {
                let mut written = 0usize;
                for s in data {
                    let Some(src) = self.id.get(written..) else {
                        break;
                    };
                    let n = src.len().min(s.len as usize);
                    if !crate::guest::write(mem, src.get(..n).unwrap_or(&[]), s.addr) {
                        return Err(ExecError::Memory);
                    }
                    written += n;
                }
                inc(&metrics.get_ids);
                Ok(written as u32)
            }
            RequestKind::Discard(segs) => {
                run_segments(disk, segs, |d, off, len, _| d.discard(off, len))?;
                inc(&metrics.discards);
                Ok(0)
            }
            RequestKind::WriteZeroes(segs) => {
                run_segments(disk, segs, |d, off, len, unmap| {
                    d.write_zeroes(off, len, unmap)
                })?;
                inc(&metrics.write_zeroes);
                Ok(0)
            }
        }
    }
}

fn run_segments(
    disk: &mut dyn DiskImage,
    segs: &[DiscardSegment],
    mut op: impl FnMut(&mut dyn DiskImage, u64, u64, bool) -> Result<(), ImageError>,
) -> Result<(), ExecError> {
    for s in segs {
        op(
            disk,
            s.sector << SECTOR_SHIFT,
            u64::from(s.num_sectors) << SECTOR_SHIFT,
            s.unmap,
        )
        .map_err(ExecError::Image)?;
    }
    Ok(())
}

/// Write the status byte; a failed write is counted and yields used length 0.
pub(crate) fn finish<M: GuestMemory + ?Sized>(
    mem: &M,
    status_addr: vm_memory::GuestAddress,
    status: u8,
    used_len: u32,
    metrics: &BlockMetrics,
) -> Outcome {
    if !crate::guest::write(mem, &[status], status_addr) {
        inc(&metrics.memory_errors);
        return Outcome {
            status,
            used_len: 0,
        };
    }
    Outcome { status, used_len }
}
