//! Guest linear memory as an emulated instruction sees it: addresses translated through the
//! guest's own page tables with vmkit-memory's walker (CR3, paging mode, CPL, SMAP/SMEP/WP
//! and NX honoured), a fault reported as the architectural #PF (error code, CR2), and guest
//! physical memory read and written through vm-memory.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use vmkit_memory::walk::{self, Access, AccessKind, PagingMode, WalkError};

use super::{CpuState, EmulateError, Exception};

/// 4 KiB: the unit a linear access is split at (a larger page only means fewer walks).
const PAGE: u64 = 4096;

/// Why a linear access did not happen: an exception to deliver, or an emulator error.
pub(crate) enum Fail {
    /// Deliver this exception.
    Exception(Exception),
    /// Stop with this error.
    Error(EmulateError),
}

impl From<EmulateError> for Fail {
    fn from(e: EmulateError) -> Self {
        Fail::Error(e)
    }
}

/// The linear address space of the vCPU `cpu` over guest memory `mem`.
pub(crate) struct Linear<'a, M: ?Sized> {
    mem: &'a M,
    paging: Option<(PagingMode, u64)>,
    user: bool,
    ac: bool,
}

impl<'a, M: GuestMemory + ?Sized> Linear<'a, M> {
    pub(crate) fn new(cpu: &CpuState, mem: &'a M) -> Self {
        let paging = cpu.paging_enabled().then(|| {
            (
                PagingMode::from_registers(cpu.cr0, cpu.cr4, cpu.efer, cpu.maxphyaddr),
                cpu.cr3,
            )
        });
        Self {
            mem,
            paging,
            user: cpu.cpl == 3,
            ac: cpu.rflags & super::alu::AC != 0,
        }
    }

    /// The guest-physical address of `va` for an access of `kind`.
    pub(crate) fn translate(&self, va: u64, kind: AccessKind) -> Result<u64, Fail> {
        let Some((mode, cr3)) = &self.paging else {
            return Ok(va);
        };
        let mut access = Access::new(kind);
        access.user = self.user;
        access.ac = self.ac;
        match walk::walk_guest(self.mem, mode, *cr3, va, access) {
            Ok(w) => Ok(w.gpa),
            Err(WalkError::PageFault(pf)) => Err(Fail::Exception(Exception::page_fault(
                pf.error_code,
                pf.cr2,
            ))),
            Err(WalkError::NonCanonical(_)) => Err(Fail::Exception(Exception::gp(0))),
            Err(WalkError::BadCr3(cr3)) => Err(Fail::Error(EmulateError::BadState {
                what: "CR3 is not a valid table address",
                value: cr3,
            })),
            Err(WalkError::Table(_)) => Err(Fail::Error(EmulateError::NotRam { gpa: *cr3 })),
        }
    }

    /// Each page-bounded piece of `va..va+len`, translated: `(gpa, offset into the access,
    /// length)`. All pieces are translated before any is used, so an access that faults on
    /// its second page has no effect on its first.
    fn pieces(
        &self,
        va: u64,
        len: usize,
        kind: AccessKind,
    ) -> Result<Vec<(u64, usize, usize)>, Fail> {
        let mut out = Vec::with_capacity(2);
        let mut done = 0usize;
        while done < len {
            let at = va.wrapping_add(done as u64);
            let n = ((PAGE - (at % PAGE)) as usize).min(len - done);
            out.push((self.translate(at, kind)?, done, n));
            done += n;
        }
        Ok(out)
    }

    /// Read `buf.len()` bytes at linear `va`.
    pub(crate) fn read(&self, va: u64, buf: &mut [u8], kind: AccessKind) -> Result<(), Fail> {
        for (gpa, off, n) in self.pieces(va, buf.len(), kind)? {
            self.mem
                .read_slice(&mut buf[off..off + n], GuestAddress(gpa))
                .map_err(|_| EmulateError::NotRam { gpa })?;
        }
        Ok(())
    }

    /// Write `buf` at linear `va` (every page checked for write access first).
    pub(crate) fn write(&self, va: u64, buf: &[u8]) -> Result<(), Fail> {
        let pieces = self.pieces(va, buf.len(), AccessKind::Write)?;
        for &(gpa, _, n) in &pieces {
            if !self
                .mem
                .check_range(GuestAddress(gpa), n, Permissions::ReadWrite)
            {
                return Err(EmulateError::NotRam { gpa }.into());
            }
        }
        for (gpa, off, n) in pieces {
            self.mem
                .write_slice(&buf[off..off + n], GuestAddress(gpa))
                .map_err(|_| EmulateError::NotRam { gpa })?;
        }
        Ok(())
    }

    /// Read up to 15 instruction bytes at linear `va`, stopping at the first page that cannot
    /// be fetched (the decoder then asks only for what it needs).
    pub(crate) fn fetch(&self, va: u64, buf: &mut [u8; 15]) -> (usize, Option<Fail>) {
        let mut got = 0;
        while got < buf.len() {
            let at = va.wrapping_add(got as u64);
            let n = ((PAGE - (at % PAGE)) as usize).min(buf.len() - got);
            match self.read(at, &mut buf[got..got + n], AccessKind::Fetch) {
                Ok(()) => got += n,
                Err(f) => return (got, Some(f)),
            }
        }
        (got, None)
    }

    /// A host pointer to `len` bytes of guest RAM at linear `va` for an atomic
    /// read-modify-write, when they lie in one page (checked for write access).
    pub(crate) fn host_ptr(&self, va: u64, len: usize) -> Result<Option<*mut u8>, Fail> {
        if (va % PAGE) as usize + len > PAGE as usize {
            // Translate every page, so a fault is reported the same way.
            self.pieces(va, len, AccessKind::Write)?;
            return Ok(None);
        }
        let gpa = self.translate(va, AccessKind::Write)?;
        let slice = self
            .mem
            .get_slices(GuestAddress(gpa), len, Permissions::ReadWrite)
            .ok()
            .and_then(|mut it| it.next())
            .and_then(Result::ok)
            .filter(|s| s.len() == len)
            .ok_or(EmulateError::NotRam { gpa })?;
        Ok(Some(slice.ptr_guard_mut().as_ptr()))
    }
}

/// Serialises the read-compare-write of a CMPXCHG8B whose operand is not naturally aligned
/// (a split lock: no host atomic covers it; other vCPUs' plain accesses can still interleave,
/// as on hardware that does not lock splits).
static SPLIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Compare-and-exchange 8 bytes at `ptr` (guest RAM): `Ok(())` stored `new`, `Err(current)`
/// left memory as it was.
///
/// # Safety
/// `ptr` points at 8 bytes of mapped guest RAM that stay mapped for the call.
pub(crate) unsafe fn cmpxchg8(ptr: *mut u8, old: u64, new: u64) -> Result<(), u64> {
    if (ptr as usize).is_multiple_of(8) {
        // SAFETY: aligned, mapped (the caller's contract); guest memory is shared with other
        // vCPUs, which is what an atomic is for.
        let a = unsafe { AtomicU64::from_ptr(ptr.cast::<u64>()) };
        return a
            .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
            .map(|_| ());
    }
    let _g = SPLIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: mapped (the caller's contract); unaligned accesses through read/write_unaligned.
    unsafe {
        let cur = ptr.cast::<u64>().read_unaligned();
        if cur == old {
            ptr.cast::<u64>().write_unaligned(new);
            Ok(())
        } else {
            Err(cur)
        }
    }
}

/// Compare-and-exchange 16 bytes at `ptr` (guest RAM, 16-byte aligned), atomically on the
/// host (`lock cmpxchg16b`).
///
/// # Safety
/// `ptr` is 16-byte aligned and points at 16 bytes of mapped guest RAM that stay mapped for
/// the call; the host CPU has CMPXCHG16B (every x86-64 CPU KVM runs on).
pub(crate) unsafe fn cmpxchg16(ptr: *mut u8, old: u128, new: u128) -> Result<(), u128> {
    let (lo, hi): (u64, u64);
    let ok: u8;
    // SAFETY: the caller's contract. RBX is reserved by the compiler, so the new low half
    // is swapped into it around the instruction and RBX restored after.
    unsafe {
        std::arch::asm!(
            "xchg {nlo}, rbx",
            "lock cmpxchg16b [{p}]",
            "sete {ok}",
            "mov rbx, {nlo}",
            p = in(reg) ptr,
            nlo = inout(reg) new as u64 => _,
            ok = out(reg_byte) ok,
            in("rcx") (new >> 64) as u64,
            inout("rax") old as u64 => lo,
            inout("rdx") (old >> 64) as u64 => hi,
            options(nostack),
        );
    }
    if ok != 0 {
        Ok(())
    } else {
        Err(u128::from(lo) | u128::from(hi) << 64)
    }
}
