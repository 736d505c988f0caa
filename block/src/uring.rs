//! io_uring submission of reads, writes and flushes on a raw image's file descriptor.
//!
//! Requests go in as `READV`/`WRITEV`/`FSYNC(DATASYNC)` entries whose iovecs point straight at
//! the guest's buffers; completions come back in any order and are turned into [`Done`]s
//! that the queue worker puts on the used ring. An eventfd registered with the ring becomes
//! readable when completions are waiting, for the VMM's event loop.

use std::os::fd::{AsRawFd, RawFd};

use io_uring::{IoUring, opcode, squeue, types};
use vm_memory::{GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::defs::SECTOR_SHIFT;
use crate::exec::{ExecError, guest_iovecs};
use crate::request::{Request, RequestKind};

/// Errors of the io_uring engine.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// Creating or driving the ring failed.
    #[error("io_uring operation failed")]
    Ring(#[source] std::io::Error),
}

/// What an in-flight operation was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `VIRTIO_BLK_T_IN`.
    Read,
    /// `VIRTIO_BLK_T_OUT`.
    Write,
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
}

struct InFlight {
    head_index: u16,
    status_addr: GuestAddress,
    kind: OpKind,
    expected: u64,
}

/// A completed operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// Chain head.
    pub head_index: u16,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
    /// What it was.
    pub kind: OpKind,
    /// Bytes transferred (reads/writes).
    pub bytes: u64,
    /// Whether it completed fully.
    pub ok: bool,
}

/// Whether the kernel can complete cached reads of `fd` inside `io_uring_enter`, without
/// handing them to an io-wq worker thread: the file supports `RWF_NOWAIT` (`FMODE_NOWAIT`).
///
/// Without it — tmpfs on many kernels is one such filesystem — io_uring queues every read to a
/// kernel worker thread, which costs more than the `pread` it replaces (the bench measures
/// the io_uring engine at a third of the `pread` rate on such a file). The probe reads one
/// byte at offset 0 with `RWF_NOWAIT`; it never writes.
///
/// ```
/// use std::os::fd::AsRawFd;
/// let f = tempfile::tempfile().unwrap();
/// let _ = vmkit_block::uring::completes_reads_inline(f.as_raw_fd());
/// ```
pub fn completes_reads_inline(fd: RawFd) -> bool {
    let mut byte = 0u8;
    let iov = libc::iovec {
        iov_base: (&raw mut byte).cast(),
        iov_len: 1,
    };
    // SAFETY: `iov` names one writable byte on this stack frame; preadv2 reads at most that
    // much into it and does not keep the pointer. A bad `fd` only makes it fail.
    let rc = unsafe { libc::preadv2(fd, &iov, 1, 0, libc::RWF_NOWAIT) };
    // EAGAIN means the data was not cached: the file supports non-blocking reads all the same.
    rc >= 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
}

/// An io_uring bound to one file.
pub struct UringEngine {
    ring: IoUring,
    fd: RawFd,
    /// `fd` is registered with the ring as file 0.
    fixed: bool,
    slots: Vec<Option<InFlight>>,
    /// Each slot's iovec array: kept, unmoved on the heap, while the kernel may read it, and
    /// reused by the slot's next operation.
    iovs: Vec<Vec<libc::iovec>>,
    free: Vec<usize>,
    unsubmitted: usize,
    eventfd: EventFd,
    /// A [`UringEngine::submit`] ran with the eventfd muted since the last reap: a completion
    /// posted concurrently may not have signalled it.
    muted: bool,
    /// Mute the next submission: the first reap after the last submission found nothing left
    /// in flight (this file's operations complete inline). When they do not (`O_DIRECT`,
    /// io-wq), the eventfd must wake the event loop anyway, and muting would only add a
    /// re-signal per pass.
    mute_next: bool,
    /// A submission happened since the last reap.
    submitted: bool,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("fd", &self.fd)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

// SAFETY: the raw iovec pointers in `slots` refer to guest memory that the owner keeps mapped
// while operations are in flight (the device drains the ring before releasing its memory);
// the ring itself is an owned kernel object usable from any thread.
unsafe impl Send for UringEngine {}

impl UringEngine {
    /// A ring of `depth` entries submitting on `fd`.
    pub fn new(fd: RawFd, depth: u32) -> Result<Self, UringError> {
        let depth = depth.clamp(1, 4096);
        let ring = IoUring::new(depth).map_err(UringError::Ring)?;
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(UringError::Ring)?;
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(UringError::Ring)?;
        // A registered file spares the kernel looking up and reference-counting the descriptor
        // on every operation (IOSQE_FIXED_FILE, io_uring_register(2)); a kernel or limit that
        // refuses it leaves the plain descriptor.
        let fixed = ring.submitter().register_files(&[fd]).is_ok();
        Ok(Self {
            ring,
            fd,
            fixed,
            slots: (0..depth).map(|_| None).collect(),
            iovs: (0..depth).map(|_| Vec::new()).collect(),
            free: (0..depth as usize).rev().collect(),
            unsubmitted: 0,
            eventfd,
            muted: false,
            mute_next: true,
            submitted: false,
        })
    }

    /// Readable when completions are waiting.
    pub fn completion_fd(&self) -> &EventFd {
        &self.eventfd
    }

    /// Ring entries (most operations in flight).
    pub fn depth(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Operations submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether another operation fits.
    pub fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    /// Whether `req` is one this engine submits (reads, writes, flushes); others run
    /// synchronously.
    pub fn handles(req: &Request) -> bool {
        matches!(
            req.kind,
            RequestKind::In { .. } | RequestKind::Out { .. } | RequestKind::Flush
        )
    }

    /// Queue `req` (one of [`UringEngine::handles`]); needs [`UringEngine::has_room`].
    ///
    /// The guest memory behind `mem` must stay mapped until the operation is reaped.
    pub fn push<M: GuestMemory + ?Sized>(
        &mut self,
        req: &Request,
        mem: &M,
    ) -> Result<(), ExecError> {
        let Some(slot) = self.free.pop() else {
            return Err(ExecError::Short);
        };
        let Some(iov) = self.iovs.get_mut(slot) else {
            self.free.push(slot);
            return Err(ExecError::Short);
        };
        iov.clear();
        let (kind, entry, expected) = match &req.kind {
            RequestKind::In { sector, data } | RequestKind::Out { sector, data } => {
                let read = matches!(req.kind, RequestKind::In { .. });
                if let Err(e) = guest_iovecs(mem, data, read, iov) {
                    self.free.push(slot);
                    return Err(e);
                }
                let offset = sector << SECTOR_SHIFT;
                let kind = if read { OpKind::Read } else { OpKind::Write };
                // The same entry for a registered file (index 0) or a plain descriptor: the
                // opcode builders take either target type, so the match is written once.
                macro_rules! rw {
                    ($fd:expr) => {
                        match (iov.as_slice(), read) {
                            // One buffer (the common case): plain READ/WRITE, no iovec import.
                            ([one], true) => {
                                let len = u32::try_from(one.iov_len).unwrap_or(u32::MAX);
                                opcode::Read::new($fd, one.iov_base.cast(), len)
                                    .offset(offset)
                                    .build()
                            }
                            ([one], false) => {
                                let len = u32::try_from(one.iov_len).unwrap_or(u32::MAX);
                                opcode::Write::new($fd, one.iov_base.cast(), len)
                                    .offset(offset)
                                    .build()
                            }
                            (many, true) => {
                                let n = u32::try_from(many.len()).unwrap_or(u32::MAX);
                                opcode::Readv::new($fd, many.as_ptr(), n)
                                    .offset(offset)
                                    .build()
                            }
                            (many, false) => {
                                let n = u32::try_from(many.len()).unwrap_or(u32::MAX);
                                opcode::Writev::new($fd, many.as_ptr(), n)
                                    .offset(offset)
                                    .build()
                            }
                        }
                    };
                }
                let e = if self.fixed {
                    rw!(types::Fixed(0))
                } else {
                    rw!(types::Fd(self.fd))
                };
                (kind, e, req.data_len())
            }
            RequestKind::Flush => {
                let fsync = if self.fixed {
                    opcode::Fsync::new(types::Fixed(0))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                } else {
                    opcode::Fsync::new(types::Fd(self.fd))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build()
                };
                // Ordered after every earlier submission, so it covers their writes.
                let e = fsync.flags(squeue::Flags::IO_DRAIN);
                (OpKind::Flush, e, 0)
            }
            _ => {
                self.free.push(slot);
                return Err(ExecError::Short);
            }
        };
        let entry = entry.user_data(slot as u64);
        // SAFETY: the entry's iovec array (the slot's own `iovs` vector) and the guest buffers it
        // points to stay valid until completion: the slot's vector is only cleared when the slot
        // is reused, which needs its completion reaped first (and the engine drains on drop).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            self.free.push(slot);
            return Err(ExecError::Short);
        }
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Some(InFlight {
                head_index: req.head_index,
                status_addr: req.status_addr,
                kind,
                expected,
            });
        }
        self.unsubmitted += 1;
        Ok(())
    }

    /// Hand queued entries to the kernel, with the completion eventfd muted for the call while
    /// operations keep completing inline.
    ///
    /// Reads of page-cached data on files that support `RWF_NOWAIT` complete inside
    /// `io_uring_enter`, and the caller reaps them right after: signalling the eventfd
    /// for them would cost an `eventfd` read (a system call) to clear it, or a spurious wake-up
    /// of the VMM's event loop — at queue depth 1 that doubled the system calls per request.
    /// So the eventfd is muted (`IORING_CQ_EVENTFD_DISABLED`, io_uring_register(2)) around
    /// the submission. A completion from elsewhere (an io-wq worker, a device interrupt) that
    /// races with unmuting could go unsignalled, so the next [`UringEngine::reap`] signals the
    /// eventfd itself when operations are still in flight. When the first reap after a
    /// submission finds operations left (the file completes asynchronously: `O_DIRECT`,
    /// io-wq), the next submissions are not muted, until such a reap finds everything done
    /// again: there the eventfd has to wake the event loop anyway, and muting would add a
    /// re-signal (three system calls) to every pass.
    pub fn submit(&mut self) -> Result<(), UringError> {
        if self.unsubmitted == 0 {
            return Ok(());
        }
        self.submitted = true;
        if !self.mute_next {
            self.ring.submit().map_err(UringError::Ring)?;
            self.unsubmitted = 0;
            return Ok(());
        }
        self.ring.completion().disable_eventfd();
        self.muted = true;
        let r = self.ring.submit();
        self.ring.completion().enable_eventfd();
        r.map_err(UringError::Ring)?;
        self.unsubmitted = 0;
        Ok(())
    }

    /// Clear the completion eventfd: what a VMM's handler for it does first, before
    /// [`UringEngine::reap`] (completions posted after the read signal it again).
    pub fn acknowledge(&mut self) {
        let _ = self.eventfd.read();
    }

    /// Submit and block until at least `want` completions are ready.
    pub fn wait(&mut self, want: usize) -> Result<(), UringError> {
        let want = want.min(self.in_flight());
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(UringError::Ring(e)),
            }
        }
        self.unsubmitted = 0;
        Ok(())
    }

    /// Take every ready completion (the eventfd is left as it is: see
    /// [`UringEngine::acknowledge`]).
    pub fn reap(&mut self, mut f: impl FnMut(Done)) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let slot = cqe.user_data() as usize;
            let Some(op) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            let res = cqe.result();
            let bytes = u64::try_from(res).unwrap_or(0);
            let ok = res >= 0 && bytes == op.expected;
            f(Done {
                head_index: op.head_index,
                status_addr: op.status_addr,
                kind: op.kind,
                bytes,
                ok,
            });
        }
        drop(cq);
        let left = self.in_flight() > 0;
        if std::mem::take(&mut self.submitted) {
            self.mute_next = !left;
        }
        if std::mem::take(&mut self.muted) && left {
            // A completion racing with the unmuting in `submit` may have found the eventfd
            // muted and our tail load may not have seen it yet: wake the VMM once to look again.
            let _ = self.eventfd.write(1);
        }
    }

    /// Wait for and reap every in-flight operation.
    pub fn drain(&mut self, mut f: impl FnMut(Done)) {
        while self.in_flight() > 0 {
            if self.wait(self.in_flight()).is_err() {
                break;
            }
            self.reap(&mut f);
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel may still write into buffers: wait for everything before freeing.
        self.drain(|_| {});
    }
}
