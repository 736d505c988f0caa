//! Synchronous execution of a parsed [`Request`] against a [`DiskImage`].
//!
//! Reads and writes hand the guest's own buffers to the image as one vectored operation
//! ([`DiskImage::read_vectored`] / [`DiskImage::write_vectored`]): a raw image does one
//! `pread`/`preadv` on them, a qcow2 image one imago `readv`/`writev`; no bounce buffer.

use std::io::{IoSlice, IoSliceMut};

use vm_memory::GuestMemory;

use crate::defs::*;
use crate::image::{DiskImage, ImageError};
use crate::metrics::{BlockMetrics, BlockMetricsSnapshot};
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

/// Runs requests synchronously; keeps its iovec list between calls.
#[derive(Debug, Default)]
pub struct SyncExecutor {
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
        let mut tally = BlockMetricsSnapshot::default();
        let out = self.execute_tallied(req, mem, disk, &mut tally);
        metrics.add(&tally);
        out
    }

    /// [`SyncExecutor::execute`] counting into a plain `tally`, for callers that add many
    /// requests' counts to the shared [`BlockMetrics`] at once.
    pub fn execute_tallied<M: GuestMemory + ?Sized>(
        &mut self,
        req: &Request,
        mem: &M,
        disk: &mut dyn DiskImage,
        tally: &mut BlockMetricsSnapshot,
    ) -> Outcome {
        let result = self.run(req, mem, disk, tally);
        let (status, used_len) = match result {
            Ok(data_written) => (VIRTIO_BLK_S_OK as u8, data_written.saturating_add(1)),
            Err(ExecError::Memory) => {
                tally.memory_errors += 1;
                (VIRTIO_BLK_S_IOERR as u8, 1)
            }
            Err(_) => {
                tally.io_errors += 1;
                (VIRTIO_BLK_S_IOERR as u8, 1)
            }
        };
        finish(mem, req.status_addr, status, used_len, tally)
    }

    /// Move the data of a read (`to_disk == false`) or write between the guest segments
    /// `data` and the disk at `offset`, as one vectored image operation straight on guest
    /// memory.
    fn transfer<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        disk: &mut dyn DiskImage,
        data: &[DataSegment],
        offset: u64,
        to_disk: bool,
    ) -> Result<(), ExecError> {
        self.iov.clear();
        // For IN the device writes guest buffers; for OUT it reads them.
        guest_iovecs(mem, data, !to_disk, &mut self.iov)?;
        let r = if to_disk {
            // SAFETY: `IoSlice` is ABI-compatible with `iovec` (std guarantees it on Unix);
            // each iovec names guest memory that `guest_iovecs` got from `get_slices` for
            // exactly that length, and the memory stays mapped while `mem` is borrowed.
            let bufs = unsafe {
                std::slice::from_raw_parts(self.iov.as_ptr().cast::<IoSlice<'_>>(), self.iov.len())
            };
            disk.write_vectored(bufs, offset)
        } else {
            // SAFETY: as above, with `IoSliceMut`; the device owns these device-writable
            // buffers until it puts the chain on the used ring.
            let bufs = unsafe {
                std::slice::from_raw_parts_mut(
                    self.iov.as_mut_ptr().cast::<IoSliceMut<'_>>(),
                    self.iov.len(),
                )
            };
            disk.read_vectored(bufs, offset)
        };
        self.iov.clear();
        r.map_err(ExecError::Image)
    }

    /// Do the I/O; returns bytes written into guest buffers.
    fn run<M: GuestMemory + ?Sized>(
        &mut self,
        req: &Request,
        mem: &M,
        disk: &mut dyn DiskImage,
        metrics: &mut BlockMetricsSnapshot,
    ) -> Result<u32, ExecError> {
        match &req.kind {
            RequestKind::In { sector, data } => {
                let len = req.data_len();
                self.transfer(mem, disk, data, sector << SECTOR_SHIFT, false)?;
                metrics.count_read(len);
                Ok(len as u32)
            }
            RequestKind::Out { sector, data } => {
                let len = req.data_len();
                self.transfer(mem, disk, data, sector << SECTOR_SHIFT, true)?;
                metrics.count_write(len);
                Ok(0)
            }
            RequestKind::Flush => {
                disk.flush().map_err(ExecError::Image)?;
                metrics.flushes += 1;
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
                metrics.get_ids += 1;
                Ok(written as u32)
            }
            RequestKind::Discard(segs) => {
                run_segments(disk, segs, |d, off, len, _| d.discard(off, len))?;
                metrics.discards += 1;
                Ok(0)
            }
            RequestKind::WriteZeroes(segs) => {
                run_segments(disk, segs, |d, off, len, unmap| {
                    d.write_zeroes(off, len, unmap)
                })?;
                metrics.write_zeroes += 1;
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
    tally: &mut BlockMetricsSnapshot,
) -> Outcome {
    if !crate::guest::write_u8(mem, status, status_addr) {
        tally.memory_errors += 1;
        return Outcome {
            status,
            used_len: 0,
        };
    }
    Outcome { status, used_len }
}
