//! Kernel loaders: ELF (with its PVH entry note), bzImage and the PVH start info through
//! rust-vmm's linux-loader, and multiboot v1 ([`multiboot`]), which linux-loader does not
//! cover (its ELF loader reads ELF64 only; multiboot kernels are ELF32 or a.out-kludge images).
//!
//! **Why here, in vmkit-memory.** A loader is a function from an image file to bytes in guest
//! memory plus a few addresses: it needs vm-memory and linux-loader, which this crate already
//! depends on (its layouts produce the e820 table the loaders pass on), and nothing of a vCPU
//! or a device. vmkit-vcpu sits above this crate, so its entry states
//! (`ProtectedModeState::multiboot(entry, info_addr)`, `::pvh`, `LongModeState::linux_64`)
//! take what these loaders return; putting the loaders into vmkit-vcpu would make every vCPU
//! user build linux-loader's formats, and a separate boot crate would be a crate of ~500 lines
//! sharing all of its dependencies with this one. Policy — where the kernel, command line and
//! start info go — stays with the caller: every address is a parameter.
//!
//! ```
//! use vm_memory::{Bytes, GuestAddress};
//! use vmkit_memory::GuestLayout;
//! use vmkit_memory::boot::multiboot::{MultibootInfo, info, load_multiboot};
//! # use vmkit_memory::boot::test_images::{Elf32Segment, elf32_image, multiboot_header};
//!
//! let layout = GuestLayout::builder().ram_size(16 << 20).build()?;
//! let mem = layout.create_memory()?;
//! // An ELF32 kernel at 1 MiB whose first bytes are a multiboot header.
//! # let code = multiboot_header(0);
//! # let image = elf32_image(0x10_0000, &[Elf32Segment { paddr: 0x10_0000, data: &code, mem_size: 0x1000 }]);
//! let e820 = layout.e820();
//! let mi = MultibootInfo { cmdline: "console=ttyS0", memory_map: &e820, info_addr: 0x9000, ..Default::default() };
//! let kernel = load_multiboot(&mem, &image, &mi)?;
//! assert_eq!(kernel.entry, 0x10_0000);
//! let cmdline: u32 = mem.read_obj(GuestAddress(0x9000 + info::CMDLINE))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod multiboot;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_images;

use std::io::{Read, Seek};

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryBackend, ReadVolatile};

use crate::layout::E820Entry;

/// `hvm_start_info.magic` (Xen `arch-x86/hvm/start_info.h`).
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Errors of the linux-loader based loaders.
#[derive(Debug, Error)]
pub enum BootError {
    /// linux-loader refused or failed to load the image.
    #[error("loading the kernel failed")]
    Load(#[source] linux_loader::loader::Error),
    /// linux-loader failed to write the PVH start info.
    #[error("writing the PVH start info failed")]
    StartInfo(#[source] linux_loader::configurator::Error),
}

/// A kernel loaded by [`load_elf`] or [`load_bzimage`].
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// linux-loader's `kernel_load`: for a bzImage where its protected-mode code starts, for
    /// an ELF its entry point (linux-loader reports no lowest segment address).
    pub load_addr: u64,
    /// End (exclusive) of the image in guest memory.
    pub end: u64,
    /// The ELF entry point (64-bit protocol) or, for a bzImage, the 64-bit entry (load
    /// address + 0x200, boot protocol §"64-bit boot protocol").
    pub entry: u64,
    /// The PVH entry from the ELF note `XEN_ELFNOTE_PHYS32_ENTRY`, if the kernel has one.
    pub pvh_entry: Option<u64>,
    /// A bzImage's setup header (to copy into `boot_params`).
    pub setup_header: Option<setup_header>,
}

/// Load an ELF64 kernel (vmlinux) at its physical addresses through linux-loader; reports the
/// PVH entry note if present. linux-loader copies `p_filesz` bytes per segment and does not
/// zero the rest of `p_memsz` (Linux clears its own bss).
///
/// # Errors
/// [`BootError::Load`]: not an ELF64 image, segments outside the image or guest memory.
pub fn load_elf<M, F>(mem: &M, image: &mut F) -> Result<LoadedKernel, BootError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let r = Elf::load(mem, None, image, None).map_err(BootError::Load)?;
    let pvh_entry = match r.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(a) => Some(a.0),
        _ => None,
    };
    Ok(LoadedKernel {
        load_addr: r.kernel_load.0,
        end: r.kernel_end,
        // linux-loader reports the ELF entry as kernel_load.
        entry: r.kernel_load.0,
        pvh_entry,
        setup_header: None,
    })
}

/// Load a bzImage's protected-mode kernel at `at` (e.g. 1 MiB) through linux-loader.
///
/// # Errors
/// [`BootError::Load`]: not a bzImage (or an unsupported boot protocol version), or it does not
/// fit in guest memory.
pub fn load_bzimage<M, F>(mem: &M, at: u64, image: &mut F) -> Result<LoadedKernel, BootError>
where
    M: GuestMemoryBackend,
    F: Read + ReadVolatile + Seek,
{
    let r = BzImage::load(mem, Some(GuestAddress(at)), image, None).map_err(BootError::Load)?;
    Ok(LoadedKernel {
        load_addr: r.kernel_load.0,
        end: r.kernel_end,
        entry: r.kernel_load.0 + 0x200,
        pvh_entry: None,
        setup_header: r.setup_header,
    })
}

/// Where [`write_pvh_start_info`] puts things.
#[derive(Clone, Copy, Debug)]
pub struct PvhPlacement {
    /// The `hvm_start_info` (EBX at entry).
    pub start_info: u64,
    /// The memory map table.
    pub memmap: u64,
    /// The NUL-terminated command line the caller has written (0: none).
    pub cmdline: u64,
    /// The ACPI RSDP (0: none).
    pub rsdp: u64,
}

/// Write the PVH `hvm_start_info` (version 1) and its memory map from `memory_map` through
/// linux-loader's PVH configurator.
///
/// # Errors
/// [`BootError::StartInfo`]: the structures do not fit in guest memory.
pub fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    at: PvhPlacement,
    memory_map: &[E820Entry],
) -> Result<(), BootError> {
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: at.cmdline,
        rsdp_paddr: at.rsdp,
        memmap_paddr: at.memmap,
        memmap_entries: memory_map.len() as u32,
        ..Default::default()
    };
    let entries: Vec<hvm_memmap_table_entry> = memory_map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let mut params = BootParams::new(&start_info, GuestAddress(at.start_info));
    params.set_sections(&entries, GuestAddress(at.memmap));
    PvhBootConfigurator::write_bootparams::<M>(&params, mem).map_err(BootError::StartInfo)
}

#[cfg(test)]
mod tests;
