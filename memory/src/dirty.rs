//! Dirty tracking: "which guest pages were written since the last sync", merged from several
//! sources — KVM's dirty log (KVM_GET_DIRTY_LOG on slots registered with
//! `KVM_MEM_LOG_DIRTY_PAGES`), KVM's per-vCPU dirty ring (KVM_CAP_DIRTY_LOG_RING), and
//! vm-memory's [`AtomicBitmap`] for writes the VMM and its devices make.
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, bitmap::AtomicBitmap};
//! use vmkit_memory::dirty::{BitmapSource, DirtyTracker};
//!
//! let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! mem.write_obj(1u64, GuestAddress(0x3008)).unwrap(); // a device writes guest memory
//! mem.write_obj(2u64, GuestAddress(0x5000)).unwrap();
//! let mut tracker = DirtyTracker::new();
//! tracker.add(BitmapSource::new(&mem));
//! assert_eq!(tracker.sync().unwrap().collect::<Vec<_>>(), vec![0x3000, 0x5000]);
//! assert_eq!(tracker.sync().unwrap().count(), 0); // nothing since the last sync
//! ```

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_DIRTY_LOG_PAGE_OFFSET, kvm_dirty_gfn, kvm_enable_cap,
};
use kvm_ioctls::{VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MmapRegion};

/// Page size dirty tracking works in.
pub const PAGE_SIZE: u64 = 4096;

/// `KVM_DIRTY_GFN_F_DIRTY`: the ring entry holds a dirty page.
pub const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: the entry was harvested and may be reset.
pub const KVM_DIRTY_GFN_F_RESET: u32 = 2;
/// `KVM_RESET_DIRTY_RINGS` = `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xAEC7;

/// Errors from dirty tracking.
#[derive(Debug, Error)]
pub enum DirtyError {
    /// A KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The dirty ring capability is missing or too small.
    #[error("KVM dirty ring unsupported")]
    RingUnsupported,
    /// Mapping a vCPU's dirty ring failed.
    #[error("mapping the dirty ring failed")]
    Mmap(#[source] std::io::Error),
}

/// A KVM memory slot as registered: slot id, guest-physical base, size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmSlot {
    /// Slot id (as passed to KVM_SET_USER_MEMORY_REGION).
    pub slot: u32,
    /// Guest-physical base.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A source of dirty pages. `harvest` reports each guest-physical page written since its last
/// harvest (in any order, possibly repeated) and resets the source.
pub trait DirtySource {
    /// Report dirty page addresses to `out` and reset.
    fn harvest(&mut self, out: &mut dyn FnMut(u64)) -> Result<(), DirtyError>;
}

fn bits(words: &[u64], base: u64, out: &mut dyn FnMut(u64)) {
    for (i, &w) in words.iter().enumerate() {
        let mut w = w;
        while w != 0 {
            let b = u64::from(w.trailing_zeros());
            out(base + (i as u64 * 64 + b) * PAGE_SIZE);
            w &= w - 1;
        }
    }
}

/// KVM's dirty log (KVM_GET_DIRTY_LOG) for slots registered with `KVM_MEM_LOG_DIRTY_PAGES`.
pub struct KvmDirtyLog<'a> {
    vm: &'a VmFd,
    slots: Vec<KvmSlot>,
}

impl<'a> KvmDirtyLog<'a> {
    /// Track `slots` of `vm`.
    pub fn new(vm: &'a VmFd, slots: Vec<KvmSlot>) -> Self {
        Self { vm, slots }
    }
}

impl DirtySource for KvmDirtyLog<'_> {
    fn harvest(&mut self, out: &mut dyn FnMut(u64)) -> Result<(), DirtyError> {
        for s in &self.slots {
            let words = self
                .vm
                .get_dirty_log(s.slot, s.size as usize)
                .map_err(|e| DirtyError::Kvm("KVM_GET_DIRTY_LOG", e))?;
            bits(&words, s.gpa, out);
        }
        Ok(())
    }
}

/// Enable KVM's dirty ring on `vm` with `bytes` per vCPU (a power of two; must happen before
/// any vCPU is created). Returns the number of entries per ring.
pub fn enable_dirty_ring(vm: &VmFd, bytes: u32) -> Result<u32, DirtyError> {
    let max = vm.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING));
    if max <= 0 || (max as u32) < bytes {
        return Err(DirtyError::RingUnsupported);
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_DIRTY_LOG_RING,
        ..Default::default()
    };
    cap.args[0] = u64::from(bytes);
    vm.enable_cap(&cap)
        .map_err(|e| DirtyError::Kvm("KVM_ENABLE_CAP(DIRTY_LOG_RING)", e))?;
    Ok(bytes / std::mem::size_of::<kvm_dirty_gfn>() as u32)
}

/// One vCPU's KVM dirty ring, mapped from the vCPU fd.
pub struct KvmDirtyRing {
    ring: NonNull<kvm_dirty_gfn>,
    entries: u32,
    fetch: u32,
    vm_fd: RawFd,
    slots: Vec<KvmSlot>,
}

impl KvmDirtyRing {
    /// Map the ring of `vcpu` (`entries` as returned by [`enable_dirty_ring`]); `vm` must
    /// outlive the ring (it is used for KVM_RESET_DIRTY_RINGS); `slots` map slot ids to GPAs.
    pub fn new(
        vm: &VmFd,
        vcpu: &VcpuFd,
        entries: u32,
        slots: Vec<KvmSlot>,
    ) -> Result<Self, DirtyError> {
        if entries == 0 || !entries.is_power_of_two() {
            return Err(DirtyError::RingUnsupported);
        }
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: `sysconf` has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let offset = i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page;
        // SAFETY: a fresh shared mapping of the vCPU fd at KVM's documented dirty-ring offset;
        // no existing memory is affected and the result is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DirtyError::Mmap(std::io::Error::last_os_error()));
        }
        let ring = NonNull::new(p.cast::<kvm_dirty_gfn>()).ok_or(DirtyError::RingUnsupported)?;
        Ok(Self {
            ring,
            entries,
            fetch: 0,
            vm_fd: vm.as_raw_fd(),
            slots,
        })
    }
}

impl DirtySource for KvmDirtyRing {
    fn harvest(&mut self, out: &mut dyn FnMut(u64)) -> Result<(), DirtyError> {
        let mut any = false;
        for _ in 0..self.entries {
            let idx = (self.fetch & (self.entries - 1)) as usize;
            // SAFETY: `idx < entries`, the mapping holds `entries` records and lives as long as
            // `self`; KVM and we hand entries over through the `flags` word only.
            let e = unsafe { self.ring.as_ptr().add(idx) };
            // SAFETY: `flags` is the first field (u32, aligned) of a mapped record; KVM
            // publishes records with a release store on it, so read it atomically.
            let flags = unsafe { &*(std::ptr::addr_of!((*e).flags).cast::<AtomicU32>()) };
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: the record is ours until we set RESET (acquire above).
            let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
            if let Some(s) = self.slots.iter().find(|s| s.slot == (slot & 0xffff)) {
                out(s.gpa + offset * PAGE_SIZE);
            }
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            any = true;
        }
        if any {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only touches the VM's rings.
            let r = unsafe { libc::ioctl(self.vm_fd, KVM_RESET_DIRTY_RINGS as _, 0) };
            if r < 0 {
                return Err(DirtyError::Kvm(
                    "KVM_RESET_DIRTY_RINGS",
                    kvm_ioctls::Error::last(),
                ));
            }
        }
        Ok(())
    }
}

impl Drop for KvmDirtyRing {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmapping exactly the mapping created in `new`, which nothing else references.
        unsafe { libc::munmap(self.ring.as_ptr().cast(), len) };
    }
}

/// vm-memory's dirty bitmap ([`AtomicBitmap`]): pages the VMM and devices wrote through
/// [`Bytes`](vm_memory::Bytes).
pub struct BitmapSource<'a> {
    mem: &'a GuestMemoryMmap<AtomicBitmap>,
}

impl<'a> BitmapSource<'a> {
    /// Track `mem`'s bitmaps.
    pub fn new(mem: &'a GuestMemoryMmap<AtomicBitmap>) -> Self {
        Self { mem }
    }
}

impl DirtySource for BitmapSource<'_> {
    fn harvest(&mut self, out: &mut dyn FnMut(u64)) -> Result<(), DirtyError> {
        for region in self.mem.iter() {
            let mm: &MmapRegion<AtomicBitmap> = region;
            bits(&mm.bitmap().get_and_reset(), region.start_addr().0, out);
        }
        Ok(())
    }
}

/// Merges dirty sources into one sorted, de-duplicated "pages written since last sync" iterator.
#[derive(Default)]
pub struct DirtyTracker<'a> {
    sources: Vec<Box<dyn DirtySource + 'a>>,
}

impl<'a> DirtyTracker<'a> {
    /// A tracker with no sources.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a source.
    pub fn add(&mut self, source: impl DirtySource + 'a) {
        self.sources.push(Box::new(source));
    }

    /// Harvest every source: the guest-physical page addresses written since the last sync, in
    /// ascending order, each once.
    pub fn sync(&mut self) -> Result<impl Iterator<Item = u64> + use<>, DirtyError> {
        let mut set = BTreeSet::new();
        for s in &mut self.sources {
            s.harvest(&mut |gpa| {
                set.insert(gpa & !(PAGE_SIZE - 1));
            })?;
        }
        Ok(set.into_iter())
    }
}
