use std::io::Cursor;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::multiboot::*;
use super::test_images::{Elf32Segment, elf32_image, elf64_image, multiboot_header};
use super::*;
use crate::{E820Type, GuestLayout};

fn memory() -> (GuestMemoryMmap, Vec<E820Entry>) {
    let layout = GuestLayout::builder().ram_size(4 << 20).build().unwrap();
    (layout.create_memory().unwrap(), layout.e820())
}

fn info<'a>(map: &'a [E820Entry], cmdline: &'a str) -> MultibootInfo<'a> {
    MultibootInfo {
        cmdline,
        memory_map: map,
        boot_loader_name: Some("vmkit"),
        info_addr: 0x9000,
    }
}

/// A kernel: header + code at 1 MiB, an 8 KiB bss behind it, a second segment at 2 MiB.
fn kernel() -> Vec<u8> {
    let mut text = multiboot_header(MULTIBOOT_MEMORY_INFO | MULTIBOOT_PAGE_ALIGN);
    text.extend_from_slice(&[0xf4; 4]); // hlt
    elf32_image(
        0x10_000c,
        &[
            Elf32Segment {
                paddr: 0x10_0000,
                data: &text,
                mem_size: 0x2000,
            },
            Elf32Segment {
                paddr: 0x20_0000,
                data: b"data",
                mem_size: 4,
            },
        ],
    )
}

#[test]
fn multiboot_elf32_segments_and_information() {
    let (mem, map) = memory();
    mem.write_slice(&[0xaa; 16], GuestAddress(0x10_0010))
        .unwrap(); // bss must be zeroed
    let k = load_multiboot(&mem, &kernel(), &info(&map, "console=ttyS0 quiet")).unwrap();
    assert_eq!(
        k,
        MultibootKernel {
            entry: 0x10_000c,
            info_addr: 0x9000,
            kernel_start: 0x10_0000,
            kernel_end: 0x20_0004,
        }
    );
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x10_000c)).unwrap(),
        0xf4f4_f4f4
    );
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x10_0010)).unwrap(), 0);
    let mut d = [0u8; 4];
    mem.read_slice(&mut d, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(&d, b"data");

    let r = |off| mem.read_obj::<u32>(GuestAddress(0x9000 + off)).unwrap();
    let flags = r(info::FLAGS);
    assert_eq!(
        flags,
        MULTIBOOT_INFO_MEMORY
            | MULTIBOOT_INFO_CMDLINE
            | MULTIBOOT_INFO_MEM_MAP
            | MULTIBOOT_INFO_BOOT_LOADER_NAME
    );
    // 4 MiB of RAM from 0: 640 KiB lower, 3 MiB upper.
    assert_eq!((r(info::MEM_LOWER), r(info::MEM_UPPER)), (640, 3072));
    let mut cmdline = vec![0u8; 20];
    mem.read_slice(&mut cmdline, GuestAddress(u64::from(r(info::CMDLINE))))
        .unwrap();
    assert_eq!(&cmdline, b"console=ttyS0 quiet\0");
    assert_eq!(r(info::MMAP_LENGTH) as usize, map.len() * 24);
    let e = u64::from(r(info::MMAP_ADDR));
    assert_eq!(mem.read_obj::<u32>(GuestAddress(e)).unwrap(), 20);
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(e + 4)).unwrap(),
        map[0].addr
    );
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(e + 12)).unwrap(),
        map[0].size
    );
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(e + 20)).unwrap(),
        E820Type::Ram as u32
    );
    let mut name = [0u8; 6];
    mem.read_slice(
        &mut name,
        GuestAddress(u64::from(r(info::BOOT_LOADER_NAME))),
    )
    .unwrap();
    assert_eq!(&name, b"vmkit\0");
}

#[test]
fn multiboot_aout_kludge_loads_by_the_header_addresses() {
    let (mem, map) = memory();
    // Image: 16 bytes of padding, the header at offset 16 with address fields, code after it.
    let flags = MULTIBOOT_AOUT_KLUDGE;
    let mut image = vec![0x90u8; 16];
    let mut h = multiboot_header(flags);
    let load = 0x10_0000u32;
    let header_addr = load + 16;
    for v in [header_addr, load, 0, load + 0x4000, header_addr + 32] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    image.extend_from_slice(&h);
    image.extend_from_slice(&[0xf4; 8]);
    let k = load_multiboot(&mem, &image, &info(&map, "")).unwrap();
    assert_eq!(
        (k.entry, k.kernel_start, k.kernel_end),
        (header_addr + 32, 0x10_0000, 0x10_4000)
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(u64::from(header_addr) + 32))
            .unwrap(),
        0xf4
    );
}

/// Bad images: each is refused with its exact error and nothing panics.
#[test]
fn multiboot_bad_input_table() {
    let (mem, map) = memory();
    let good = kernel();
    let with = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = good.clone();
        f(&mut v);
        v
    };
    let header_at = 52 + 2 * 32; // after the ELF and program headers
    let phdr0 = 52;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "NoHeader"),
        ("bad checksum", with(&|v| v[header_at + 8] ^= 1), "NoHeader"),
        (
            "header beyond 8 KiB",
            {
                let mut v = vec![0u8; MULTIBOOT_SEARCH];
                v.extend_from_slice(&multiboot_header(0));
                v
            },
            "NoHeader",
        ),
        (
            "requires video",
            with(&|v| {
                let h = multiboot_header(MULTIBOOT_VIDEO_MODE);
                v[header_at..header_at + 12].copy_from_slice(&h);
            }),
            "UnsupportedRequirements(4)",
        ),
        ("ELF64", with(&|v| v[4] = 2), "BadElf"),
        ("x86-64 machine", with(&|v| v[18] = 62), "BadElf"),
        (
            "phdrs past the end",
            with(&|v| v[28..32].copy_from_slice(&0xffff_fff0u32.to_le_bytes())),
            "BadElf",
        ),
        (
            "segment past the end",
            with(&|v| v[phdr0 + 16..phdr0 + 20].copy_from_slice(&0x10_0000u32.to_le_bytes())),
            "BadSegment { index: 0 }",
        ),
        (
            "filesz > memsz",
            with(&|v| v[phdr0 + 20..phdr0 + 24].copy_from_slice(&1u32.to_le_bytes())),
            "BadSegment { index: 0 }",
        ),
        (
            "segment outside RAM",
            with(&|v| v[phdr0 + 12..phdr0 + 16].copy_from_slice(&0x8000_0000u32.to_le_bytes())),
            "Memory",
        ),
        (
            "huge bss",
            with(&|v| v[phdr0 + 20..phdr0 + 24].copy_from_slice(&0xffff_0000u32.to_le_bytes())),
            "Above4G",
        ),
        ("no segments", with(&|v| v[44] = 0), "NothingToLoad"),
    ];
    for (name, image, want) in cases {
        let got = load_multiboot(&mem, &image, &info(&map, "x"));
        let got = format!("{:?}", got.map(|_| ()).unwrap_err());
        assert!(got.starts_with(want), "{name}: {got}");
    }
    // The information structure must not overlap the kernel.
    let mut i = info(&map, "x");
    i.info_addr = 0x10_0100;
    assert!(matches!(
        load_multiboot(&mem, &good, &i),
        Err(MultibootError::InfoOverlapsKernel(0x10_0100))
    ));
}

#[test]
fn linux_loader_elf_and_pvh_start_info() {
    let (mem, map) = memory();
    // linux-loader reads ELF64 only: an ELF32 image is refused through BootError::Load.
    let err = load_elf(&mem, &mut Cursor::new(kernel())).unwrap_err();
    assert!(matches!(err, BootError::Load(_)), "{err:?}");
    let err = load_bzimage(&mem, 0x10_0000, &mut Cursor::new(kernel())).unwrap_err();
    assert!(matches!(err, BootError::Load(_)), "{err:?}");

    write_pvh_start_info(
        &mem,
        PvhPlacement {
            start_info: 0x6000,
            memmap: 0x7000,
            cmdline: 0x8000,
            rsdp: 0,
        },
        &map,
    )
    .unwrap();
    let si: hvm_start_info = mem.read_obj(GuestAddress(0x6000)).unwrap();
    assert_eq!((si.magic, si.version), (XEN_HVM_START_MAGIC_VALUE, 1));
    assert_eq!(
        (si.memmap_paddr, si.memmap_entries as usize),
        (0x7000, map.len())
    );
    assert_eq!(si.cmdline_paddr, 0x8000);
    let e: hvm_memmap_table_entry = mem.read_obj(GuestAddress(0x7000)).unwrap();
    assert_eq!((e.addr, e.size, e.type_), (map[0].addr, map[0].size, 1));
}

#[test]
fn linux_loader_loads_elf64_and_finds_the_pvh_note() {
    let (mem, _) = memory();
    let code = [0x90u8, 0x90, 0xf4];
    let seg = [Elf32Segment {
        paddr: 0x20_0000,
        data: &code,
        mem_size: 0x1000,
    }];
    let k = load_elf(
        &mem,
        &mut Cursor::new(elf64_image(0x20_0000, &seg, Some(0x20_0001))),
    )
    .unwrap();
    assert_eq!(
        (k.entry, k.end, k.pvh_entry),
        (0x20_0000, 0x20_1000, Some(0x20_0001))
    );
    let mut got = [0u8; 3];
    mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(got, code);
    let k = load_elf(&mem, &mut Cursor::new(elf64_image(0x20_0000, &seg, None))).unwrap();
    assert_eq!(k.pvh_entry, None);
    // A segment outside guest memory is refused.
    let far = [Elf32Segment {
        paddr: 0x8000_0000,
        data: &code,
        mem_size: 3,
    }];
    let err = load_elf(&mem, &mut Cursor::new(elf64_image(0x8000_0000, &far, None))).unwrap_err();
    assert!(matches!(err, BootError::Load(_)), "{err:?}");
}
