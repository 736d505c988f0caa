//! Kernel images built in memory for loader tests, fuzz seeds and tiny KVM guests (feature
//! `test-utils`): ELF32 executables ([`elf32_image`]) and multiboot headers
//! ([`multiboot_header`]).

use super::multiboot::MULTIBOOT_HEADER_MAGIC;

/// One `PT_LOAD` segment of [`elf32_image`].
#[derive(Clone, Copy, Debug)]
pub struct Elf32Segment<'a> {
    /// Physical (= virtual) load address.
    pub paddr: u32,
    /// File contents.
    pub data: &'a [u8],
    /// Size in memory (≥ `data.len()`; the rest is bss).
    pub mem_size: u32,
}

/// A little-endian ELF32 i386 executable with entry `entry` and one `PT_LOAD` program header
/// per segment; segment data follows the headers in order (System V ABI, ch. 4–5).
pub fn elf32_image(entry: u32, segments: &[Elf32Segment<'_>]) -> Vec<u8> {
    const EHDR: usize = 52;
    const PHDR: usize = 32;
    let mut out = vec![0u8; EHDR + PHDR * segments.len()];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 1; // ELFCLASS32
    out[5] = 1; // ELFDATA2LSB
    out[6] = 1; // EV_CURRENT
    let put16 =
        |b: &mut Vec<u8>, at: usize, v: u16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 =
        |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put16(&mut out, 16, 2); // ET_EXEC
    put16(&mut out, 18, 3); // EM_386
    put32(&mut out, 20, 1);
    put32(&mut out, 24, entry);
    put32(&mut out, 28, EHDR as u32); // e_phoff
    put16(&mut out, 40, EHDR as u16);
    put16(&mut out, 42, PHDR as u16);
    put16(&mut out, 44, segments.len() as u16);
    for (i, s) in segments.iter().enumerate() {
        let ph = EHDR + i * PHDR;
        let offset = out.len() as u32;
        put32(&mut out, ph, 1); // PT_LOAD
        put32(&mut out, ph + 4, offset);
        put32(&mut out, ph + 8, s.paddr);
        put32(&mut out, ph + 12, s.paddr);
        put32(&mut out, ph + 16, s.data.len() as u32);
        put32(&mut out, ph + 20, s.mem_size);
        put32(&mut out, ph + 24, 7); // RWX
        put32(&mut out, ph + 28, 4);
        out.extend_from_slice(s.data);
    }
    out
}

/// A 12-byte multiboot header (magic, `flags`, checksum) for the start of a kernel's first
/// segment.
pub fn multiboot_header(flags: u32) -> Vec<u8> {
    let sum = 0u32
        .wrapping_sub(MULTIBOOT_HEADER_MAGIC)
        .wrapping_sub(flags);
    [MULTIBOOT_HEADER_MAGIC, flags, sum]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// A little-endian ELF64 x86-64 executable (vmlinux-like) with entry `entry`, one `PT_LOAD`
/// per segment and, with `pvh_entry`, a `PT_NOTE` holding the Xen `XEN_ELFNOTE_PHYS32_ENTRY`
/// note (type 18, name "Xen") that announces a PVH entry point.
pub fn elf64_image(entry: u64, segments: &[Elf32Segment<'_>], pvh_entry: Option<u32>) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let phnum = segments.len() + usize::from(pvh_entry.is_some());
    let mut out = vec![0u8; EHDR + PHDR * phnum];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2; // ELFCLASS64
    out[5] = 1; // ELFDATA2LSB
    out[6] = 1;
    let put = |b: &mut Vec<u8>, at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
    put(&mut out, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut out, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut out, 20, &1u32.to_le_bytes());
    put(&mut out, 24, &entry.to_le_bytes());
    put(&mut out, 32, &(EHDR as u64).to_le_bytes());
    put(&mut out, 52, &(EHDR as u16).to_le_bytes());
    put(&mut out, 54, &(PHDR as u16).to_le_bytes());
    put(&mut out, 56, &(phnum as u16).to_le_bytes());
    let phdr = |out: &mut Vec<u8>, i: usize, kind: u32, paddr: u64, data: &[u8], mem: u64| {
        let ph = EHDR + i * PHDR;
        let offset = out.len() as u64;
        put(out, ph, &kind.to_le_bytes());
        put(out, ph + 4, &7u32.to_le_bytes());
        put(out, ph + 8, &offset.to_le_bytes());
        put(out, ph + 16, &paddr.to_le_bytes());
        put(out, ph + 24, &paddr.to_le_bytes());
        put(out, ph + 32, &(data.len() as u64).to_le_bytes());
        put(out, ph + 40, &mem.to_le_bytes());
        put(out, ph + 48, &4u64.to_le_bytes());
        out.extend_from_slice(data);
    };
    for (i, s) in segments.iter().enumerate() {
        phdr(
            &mut out,
            i,
            1,
            u64::from(s.paddr),
            s.data,
            u64::from(s.mem_size),
        );
    }
    if let Some(pvh) = pvh_entry {
        let mut note = Vec::new();
        for v in [4u32, 4, 18] {
            note.extend_from_slice(&v.to_le_bytes()); // namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY
        }
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&pvh.to_le_bytes());
        phdr(&mut out, segments.len(), 4, 0, &note, 0); // PT_NOTE
    }
    out
}
