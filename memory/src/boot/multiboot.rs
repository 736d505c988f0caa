//! Multiboot v1 (Multiboot Specification 0.6.96): find the header in the first 8 KiB of the
//! image (§3.1.1), load the kernel — its ELF32 `PT_LOAD` segments at their physical addresses,
//! or, with the a.out kludge (header flag 16), the address fields of the header (§3.1.3) — and
//! write the information structure (§3.3) with the memory map (`mmap_*`, flag 6), `mem_lower`
//! / `mem_upper` (flag 0), the command line (flag 2) and the boot loader's name (flag 9).
//!
//! The image is treated as untrusted input: every offset and size is checked against the image
//! and guest memory, nothing is indexed unchecked, and bss is zeroed only inside guest memory.
//! Boot modules (flag 3), symbol tables, drive and video information are not provided; a kernel
//! that *requires* video information (header flag 2) or an unknown requirement (bits 3–15) is
//! refused, as §3.1.2 asks.
//!
//! Enter the kernel with vmkit-vcpu's `ProtectedModeState::multiboot(entry, info_addr)`.

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::layout::{E820Entry, E820Type};

/// The header's magic (§3.1.2).
pub const MULTIBOOT_HEADER_MAGIC: u32 = 0x1bad_b002;
/// How far into the image the header may start (§3.1.1).
pub const MULTIBOOT_SEARCH: usize = 8192;
/// Header flag 0: align modules on 4 KiB (no modules are loaded: always honoured).
pub const MULTIBOOT_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag 1: the kernel needs `mem_*` (always provided).
pub const MULTIBOOT_MEMORY_INFO: u32 = 1 << 1;
/// Header flag 2: the kernel needs the video mode table (not provided: refused).
pub const MULTIBOOT_VIDEO_MODE: u32 = 1 << 2;
/// Header flag 16: the header's address fields say where to load (the "a.out kludge").
pub const MULTIBOOT_AOUT_KLUDGE: u32 = 1 << 16;

/// Information flag 0: `mem_lower` and `mem_upper` are valid.
pub const MULTIBOOT_INFO_MEMORY: u32 = 1 << 0;
/// Information flag 2: `cmdline` is valid.
pub const MULTIBOOT_INFO_CMDLINE: u32 = 1 << 2;
/// Information flag 6: `mmap_length` and `mmap_addr` are valid.
pub const MULTIBOOT_INFO_MEM_MAP: u32 = 1 << 6;
/// Information flag 9: `boot_loader_name` is valid.
pub const MULTIBOOT_INFO_BOOT_LOADER_NAME: u32 = 1 << 9;

/// Offsets in the information structure (§3.3).
pub mod info {
    /// `flags`.
    pub const FLAGS: u64 = 0;
    /// `mem_lower` (KiB from 0).
    pub const MEM_LOWER: u64 = 4;
    /// `mem_upper` (KiB from 1 MiB).
    pub const MEM_UPPER: u64 = 8;
    /// `cmdline` (physical address of a NUL-terminated string).
    pub const CMDLINE: u64 = 16;
    /// `mmap_length` (bytes).
    pub const MMAP_LENGTH: u64 = 44;
    /// `mmap_addr`.
    pub const MMAP_ADDR: u64 = 48;
    /// `boot_loader_name`.
    pub const BOOT_LOADER_NAME: u64 = 64;
    /// Bytes reserved for the structure (through the framebuffer fields, rounded up).
    pub const SIZE: u64 = 128;
    /// One memory-map entry: `size` (20, excluding itself), `base_addr`, `length`, `type`.
    pub const MMAP_ENTRY_SIZE: u64 = 24;
}

/// Bits of the header flags this loader honours.
const SUPPORTED_REQUIREMENTS: u32 = MULTIBOOT_PAGE_ALIGN | MULTIBOOT_MEMORY_INFO;

/// ELF constants (System V ABI, Intel386 supplement).
const ELFCLASS32: u8 = 1;
const ELFDATA2LSB: u8 = 1;
const EM_386: u16 = 3;
const PT_LOAD: u32 = 1;
const EHDR32_SIZE: usize = 52;
const PHDR32_SIZE: usize = 32;

/// Why a multiboot kernel could not be loaded.
#[derive(Debug, Error)]
pub enum MultibootError {
    /// No 4-byte aligned header with a valid checksum in the first 8 KiB.
    #[error("no multiboot header in the first 8 KiB")]
    NoHeader,
    /// The header requires something this loader does not provide (bits of flags 2–15).
    #[error("multiboot header requires unsupported features {0:#x}")]
    UnsupportedRequirements(u32),
    /// Not a little-endian ELF32 i386 executable (and no a.out kludge).
    #[error("not an ELF32 i386 image: {0}")]
    BadElf(&'static str),
    /// Program header `index` points outside the image or has filesz > memsz.
    #[error("ELF program header {index} is invalid")]
    BadSegment {
        /// The program header's index.
        index: usize,
    },
    /// The a.out kludge address fields are inconsistent (§3.1.3).
    #[error("multiboot header address fields are inconsistent")]
    BadAddressFields,
    /// Nothing to load.
    #[error("the image has no loadable segment")]
    NothingToLoad,
    /// The information structure would overlap the kernel.
    #[error("multiboot information at {0:#x} overlaps the kernel")]
    InfoOverlapsKernel(u64),
    /// An address does not fit the 32-bit fields of the protocol.
    #[error("address {0:#x} is above 4 GiB")]
    Above4G(u64),
    /// Writing guest memory failed (the range is not RAM).
    #[error("guest memory write at {addr:#x} failed")]
    Memory {
        /// Where.
        addr: u64,
        /// The vm-memory error.
        #[source]
        source: GuestMemoryError,
    },
}

/// What the boot loader hands the kernel beyond its image.
#[derive(Clone, Debug, Default)]
pub struct MultibootInfo<'a> {
    /// The kernel command line (without NUL; one is appended).
    pub cmdline: &'a str,
    /// The memory map (e.g. `GuestLayout::e820`), also the source of `mem_lower`/`mem_upper`.
    pub memory_map: &'a [E820Entry],
    /// The boot loader's name, if any.
    pub boot_loader_name: Option<&'a str>,
    /// Where to write the information structure, memory map and strings.
    pub info_addr: u64,
}

/// A loaded multiboot kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootKernel {
    /// Entry point (physical): EIP for `ProtectedModeState::multiboot`.
    pub entry: u32,
    /// The information structure's address: EBX.
    pub info_addr: u32,
    /// Lowest loaded address.
    pub kernel_start: u64,
    /// End (exclusive) of the loaded image including bss.
    pub kernel_end: u64,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// The multiboot header: its offset in the image and its fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MultibootHeader {
    /// Offset in the image.
    pub offset: usize,
    /// `flags`.
    pub flags: u32,
    /// `header_addr`, `load_addr`, `load_end_addr`, `bss_end_addr`, `entry_addr` (valid with
    /// [`MULTIBOOT_AOUT_KLUDGE`]).
    pub addresses: Option<[u32; 5]>,
}

/// Find the header (§3.1.1: 4-byte aligned, within the first 8 KiB, magic + flags + checksum
/// = 0 mod 2³²).
///
/// # Errors
/// [`MultibootError::NoHeader`].
pub fn find_header(image: &[u8]) -> Result<MultibootHeader, MultibootError> {
    let end = image.len().min(MULTIBOOT_SEARCH);
    for offset in (0..end).step_by(4) {
        let (Some(magic), Some(flags), Some(sum)) = (
            u32_at(image, offset),
            u32_at(image, offset + 4),
            u32_at(image, offset + 8),
        ) else {
            break;
        };
        if magic != MULTIBOOT_HEADER_MAGIC || magic.wrapping_add(flags).wrapping_add(sum) != 0 {
            continue;
        }
        let addresses = if flags & MULTIBOOT_AOUT_KLUDGE != 0 {
            let mut a = [0u32; 5];
            for (i, v) in a.iter_mut().enumerate() {
                *v = u32_at(image, offset + 12 + 4 * i).ok_or(MultibootError::NoHeader)?;
            }
            Some(a)
        } else {
            None
        };
        return Ok(MultibootHeader {
            offset,
            flags,
            addresses,
        });
    }
    Err(MultibootError::NoHeader)
}

fn write<M: GuestMemoryBackend>(mem: &M, addr: u64, data: &[u8]) -> Result<(), MultibootError> {
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|source| MultibootError::Memory { addr, source })
}

/// Zero `len` bytes at `addr` (bss), in bounded chunks; fails at the first byte outside RAM.
fn zero<M: GuestMemoryBackend>(mem: &M, addr: u64, len: u64) -> Result<(), MultibootError> {
    const CHUNK: u64 = 64 << 10;
    let zeros = [0u8; CHUNK as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        write(mem, addr + done, &zeros[..n as usize])?;
        done += n;
    }
    Ok(())
}

/// A piece of the image to load: file bytes `file`, placed at `addr`, followed by zeros up to
/// `addr + mem_size`.
struct Piece<'a> {
    addr: u64,
    file: &'a [u8],
    mem_size: u64,
}

fn elf32_pieces(image: &[u8]) -> Result<(Vec<Piece<'_>>, u32), MultibootError> {
    use MultibootError::BadElf;
    let ident = image.get(..16).ok_or(BadElf("truncated header"))?;
    if ident[..4] != *b"\x7fELF" {
        return Err(BadElf("no ELF magic"));
    }
    if ident[4] != ELFCLASS32 || ident[5] != ELFDATA2LSB {
        return Err(BadElf("not ELFCLASS32 little-endian"));
    }
    if image.len() < EHDR32_SIZE {
        return Err(BadElf("truncated header"));
    }
    let field16 = |off| u16_at(image, off).ok_or(BadElf("truncated header"));
    let field32 = |off| u32_at(image, off).ok_or(BadElf("truncated header"));
    if field16(18)? != EM_386 {
        return Err(BadElf("e_machine is not EM_386"));
    }
    let entry = field32(24)?;
    let phoff = field32(28)? as usize;
    let phentsize = field16(42)? as usize;
    let phnum = field16(44)? as usize;
    if phentsize < PHDR32_SIZE {
        return Err(BadElf("e_phentsize too small"));
    }
    let mut pieces = Vec::new();
    let mut entry_phys = entry;
    for index in 0..phnum {
        let bad = MultibootError::BadSegment { index };
        let at = index
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or(BadElf("program headers outside the image"))?;
        let ph = image
            .get(at..at.checked_add(PHDR32_SIZE).ok_or(BadElf("overflow"))?)
            .ok_or(BadElf("program headers outside the image"))?;
        let f = |off| u32_at(ph, off).unwrap_or(0);
        if f(0) != PT_LOAD {
            continue;
        }
        let (offset, vaddr, paddr, filesz, memsz) = (f(4), f(8), f(12), f(16), f(20));
        if filesz > memsz {
            return Err(bad);
        }
        let file = image
            .get(offset as usize..(offset as usize).checked_add(filesz as usize).ok_or(bad)?)
            .ok_or(MultibootError::BadSegment { index })?;
        // The entry is a virtual address; the kernel runs unpaged, so translate it through
        // the segment that holds it (as GRUB does).
        if (u64::from(vaddr)..u64::from(vaddr) + u64::from(memsz)).contains(&u64::from(entry)) {
            entry_phys = entry.wrapping_sub(vaddr).wrapping_add(paddr);
        }
        pieces.push(Piece {
            addr: u64::from(paddr),
            file,
            mem_size: u64::from(memsz),
        });
    }
    Ok((pieces, entry_phys))
}

fn aout_pieces<'a>(
    image: &'a [u8],
    header: &MultibootHeader,
    [header_addr, load_addr, load_end_addr, bss_end_addr, entry]: [u32; 5],
) -> Result<(Vec<Piece<'a>>, u32), MultibootError> {
    use MultibootError::BadAddressFields;
    // §3.1.3: the image from (header offset − (header_addr − load_addr)) is loaded at
    // load_addr, up to load_end_addr (0: the whole rest of the file), then bss to bss_end_addr.
    let before = header_addr.checked_sub(load_addr).ok_or(BadAddressFields)? as usize;
    let start = header.offset.checked_sub(before).ok_or(BadAddressFields)?;
    let len = if load_end_addr == 0 {
        image.len() - start
    } else {
        load_end_addr
            .checked_sub(load_addr)
            .ok_or(BadAddressFields)? as usize
    };
    let file = image
        .get(start..start.checked_add(len).ok_or(BadAddressFields)?)
        .ok_or(BadAddressFields)?;
    let end = u64::from(load_addr) + len as u64;
    let mem_end = if bss_end_addr == 0 {
        end
    } else if u64::from(bss_end_addr) >= end {
        u64::from(bss_end_addr)
    } else {
        return Err(BadAddressFields);
    };
    let piece = Piece {
        addr: u64::from(load_addr),
        file,
        mem_size: mem_end - u64::from(load_addr),
    };
    Ok((vec![piece], entry))
}

/// Load the multiboot kernel `image` into `mem` and write the information structure `info`.
///
/// # Errors
/// See [`MultibootError`]; nothing is written before the image has been checked, but a failing
/// memory write can leave earlier segments loaded.
pub fn load_multiboot<M: GuestMemoryBackend>(
    mem: &M,
    image: &[u8],
    info: &MultibootInfo<'_>,
) -> Result<MultibootKernel, MultibootError> {
    let header = find_header(image)?;
    let unsupported = header.flags & 0xffff & !SUPPORTED_REQUIREMENTS;
    if unsupported != 0 {
        return Err(MultibootError::UnsupportedRequirements(unsupported));
    }
    let (pieces, entry) = match header.addresses {
        Some(a) => aout_pieces(image, &header, a)?,
        None => elf32_pieces(image)?,
    };
    let kernel_start = pieces.iter().map(|p| p.addr).min();
    let kernel_end = pieces.iter().map(|p| p.addr + p.mem_size).max();
    let (Some(kernel_start), Some(kernel_end)) = (kernel_start, kernel_end) else {
        return Err(MultibootError::NothingToLoad);
    };
    if kernel_end > 1 << 32 {
        return Err(MultibootError::Above4G(kernel_end));
    }
    let info_len = info_size(info);
    let info_end = info.info_addr.saturating_add(info_len);
    if info_end > 1 << 32 {
        return Err(MultibootError::Above4G(info_end));
    }
    if info.info_addr < kernel_end && kernel_start < info_end {
        return Err(MultibootError::InfoOverlapsKernel(info.info_addr));
    }
    for p in &pieces {
        write(mem, p.addr, p.file)?;
        let file_len = p.file.len() as u64;
        zero(mem, p.addr + file_len, p.mem_size - file_len)?;
    }
    write_info(mem, info)?;
    Ok(MultibootKernel {
        entry,
        info_addr: info.info_addr as u32,
        kernel_start,
        kernel_end,
    })
}

fn info_size(info: &MultibootInfo<'_>) -> u64 {
    info::SIZE
        + info.memory_map.len() as u64 * info::MMAP_ENTRY_SIZE
        + info.cmdline.len() as u64
        + 1
        + info.boot_loader_name.map_or(0, |n| n.len() as u64 + 1)
}

/// `mem_lower` / `mem_upper` in KiB: RAM from 0 (at most 640 KiB) and RAM from 1 MiB up to
/// the first hole, from the memory map.
fn lower_upper(map: &[E820Entry]) -> (u32, u32) {
    let ram_at = |a: u64| {
        map.iter()
            .find(|e| e.kind == E820Type::Ram && e.addr <= a && a < e.addr.saturating_add(e.size))
    };
    let lower = ram_at(0).map_or(0, |e| e.addr.saturating_add(e.size).min(640 << 10) >> 10);
    let upper = ram_at(1 << 20).map_or(0, |e| (e.addr.saturating_add(e.size) - (1 << 20)) >> 10);
    (lower as u32, upper.min(u64::from(u32::MAX)) as u32)
}

/// Write the information structure at `info.info_addr`, followed by the memory map, the
/// command line and the boot loader's name.
fn write_info<M: GuestMemoryBackend>(
    mem: &M,
    info: &MultibootInfo<'_>,
) -> Result<(), MultibootError> {
    let base = info.info_addr;
    let mut s = [0u8; info::SIZE as usize];
    let mut put = |off: u64, v: u32| {
        let o = off as usize;
        s[o..o + 4].copy_from_slice(&v.to_le_bytes());
    };
    let mmap_addr = base + info::SIZE;
    let mmap_len = info.memory_map.len() as u64 * info::MMAP_ENTRY_SIZE;
    let cmdline_addr = mmap_addr + mmap_len;
    let name_addr = cmdline_addr + info.cmdline.len() as u64 + 1;
    let mut flags = MULTIBOOT_INFO_MEMORY | MULTIBOOT_INFO_CMDLINE | MULTIBOOT_INFO_MEM_MAP;
    let (lower, upper) = lower_upper(info.memory_map);
    put(info::MEM_LOWER, lower);
    put(info::MEM_UPPER, upper);
    put(info::CMDLINE, cmdline_addr as u32);
    put(info::MMAP_LENGTH, mmap_len as u32);
    put(info::MMAP_ADDR, mmap_addr as u32);
    if info.boot_loader_name.is_some() {
        flags |= MULTIBOOT_INFO_BOOT_LOADER_NAME;
        put(info::BOOT_LOADER_NAME, name_addr as u32);
    }
    put(info::FLAGS, flags);
    write(mem, base, &s)?;
    let mut mmap = Vec::with_capacity(mmap_len as usize);
    for e in info.memory_map {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&e.addr.to_le_bytes());
        mmap.extend_from_slice(&e.size.to_le_bytes());
        mmap.extend_from_slice(&(e.kind as u32).to_le_bytes());
    }
    write(mem, mmap_addr, &mmap)?;
    write(mem, cmdline_addr, info.cmdline.as_bytes())?;
    write(mem, cmdline_addr + info.cmdline.len() as u64, &[0])?;
    if let Some(name) = info.boot_loader_name {
        write(mem, name_addr, name.as_bytes())?;
        write(mem, name_addr + name.len() as u64, &[0])?;
    }
    Ok(())
}
