//! Fuzz the userspace instruction emulator (`vmkit_vcpu::emulate`): arbitrary instruction
//! bytes and vCPU state, over guest memory with a small page-table tree (code, data, a
//! read-only page, a user page, an unmapped hole).
//!
//! Invariants: nothing panics; the emulator emulates, raises an exception or refuses; an
//! emulated instruction advances RIP by its length (1–15 bytes); a fault or a refusal leaves
//! the general registers, RIP and RFLAGS exactly as they were (no partial effects).
//!
//! Input: 15 instruction bytes (how many KVM "reported" is `byte 15 % 16`), then
//! little-endian `u64`s for RAX…R15, RFLAGS, XCR0; flags byte (bit 0 CPL 3, bit 1 SMAP, bit
//! 2 OSXSAVE, bit 3 paging off, bit 4 AC).

use std::sync::{Mutex, OnceLock};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_memory::paging::{PageSize, PageTableBuilder, flags};
use vmkit_vcpu::emulate::{CR0_PG, CR4_OSXSAVE, CR4_SMAP, CpuState, EFER_LMA, Emulator, Outcome};

const CODE: u64 = 0x40_0000;
const CODE_GPA: u64 = 0x20_0000;

fn machine() -> &'static Mutex<(GuestMemoryMmap, u64)> {
    static M: OnceLock<Mutex<(GuestMemoryMmap, u64)>> = OnceLock::new();
    M.get_or_init(|| {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("mem");
        let mut pt = PageTableBuilder::new(&mem, 0x1000, 0x8000).expect("pt");
        for i in 0..2 {
            pt.map(CODE + i * 4096, CODE_GPA + i * 4096, PageSize::Size4K, flags::USER)
                .expect("map");
        }
        // Data pages, writable, at the addresses the registers most often hold in seeds.
        for i in 0..16 {
            pt.map(i * 4096, 0x30_0000 + i * 4096, PageSize::Size4K, flags::WRITABLE)
                .expect("map");
        }
        pt.map(0x50_0000, 0x31_0000, PageSize::Size4K, 0).expect("map");
        pt.map(0x51_0000, 0x32_0000, PageSize::Size4K, flags::USER | flags::WRITABLE)
            .expect("map");
        let cr3 = pt.cr3();
        Mutex::new((mem, cr3))
    })
}

/// One fuzz iteration.
pub fn run(data: &[u8]) {
    if data.len() < 16 {
        return;
    }
    let (code, rest) = data.split_at(16);
    let reported = usize::from(code[15] % 16);
    let mut words = rest
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .chain(std::iter::repeat(0));
    let guard = machine().lock().unwrap_or_else(|e| e.into_inner());
    let (mem, cr3) = &*guard;
    if mem.write_slice(&code[..15], GuestAddress(CODE_GPA)).is_err() {
        return;
    }
    let mut cpu = CpuState {
        rip: CODE,
        cr0: CR0_PG | 1 | (1 << 16),
        cr3: *cr3,
        cr4: 1 << 5,
        efer: (1 << 8) | EFER_LMA | (1 << 11),
        long_mode: true,
        maxphyaddr: 46,
        xcr0_supported: 7,
        xsave: vec![0u8; 4096],
        ..CpuState::default()
    };
    for r in cpu.gpr.iter_mut() {
        *r = words.next().unwrap_or(0);
    }
    cpu.rflags = (words.next().unwrap_or(0) & 0x8d5) | 2;
    cpu.xcr0 = words.next().unwrap_or(1) & 7 | 1;
    let f = rest.last().copied().unwrap_or(0);
    cpu.cpl = if f & 1 != 0 { 3 } else { 0 };
    if f & 2 != 0 {
        cpu.cr4 |= CR4_SMAP;
    }
    if f & 4 != 0 {
        cpu.cr4 |= CR4_OSXSAVE;
    }
    if f & 8 != 0 {
        cpu.cr0 &= !CR0_PG;
    }
    if f & 16 != 0 {
        cpu.rflags |= 1 << 18;
    }
    let before = (cpu.gpr, cpu.rip, cpu.rflags);
    let r = Emulator::new().step(&mut cpu, mem, &code[..reported.min(15)]);
    match r {
        Ok(Outcome::Emulated { .. }) => {
            let len = cpu.rip.wrapping_sub(CODE);
            assert!((1..=15).contains(&len), "RIP moved by {len}");
        }
        Ok(Outcome::Exception(_)) | Err(_) => {
            assert_eq!(
                (cpu.gpr, cpu.rip, cpu.rflags),
                before,
                "a fault or refusal changed the vCPU"
            );
        }
    }
}

/// Generated seeds: one instruction of each emulated family.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let seed = |name: &str, bytes: &[u8], flags: u8| {
        let mut code = [0x90u8; 16];
        code[..bytes.len()].copy_from_slice(bytes);
        code[15] = bytes.len() as u8;
        let mut v = code.to_vec();
        // RAX…R15: small values, RSI/RDI/RBX pointing at data pages.
        for i in 0..16u64 {
            v.extend_from_slice(&(0x1000 * i + 0x40).to_le_bytes());
        }
        v.extend_from_slice(&0u64.to_le_bytes()); // RFLAGS
        v.extend_from_slice(&3u64.to_le_bytes()); // XCR0
        v.push(flags);
        (format!("seed_{name}"), v)
    };
    vec![
        seed("shlx", &[0xc4, 0xe2, 0xf1, 0xf7, 0xc3], 0),
        seed("popcnt_mem", &[0xf3, 0x48, 0x0f, 0xb8, 0x03], 0),
        seed("cmpxchg16b", &[0xf0, 0x48, 0x0f, 0xc7, 0x0e], 0),
        seed("cmpxchg8b", &[0x0f, 0xc7, 0x0f], 0),
        seed("clac", &[0x0f, 0x01, 0xca], 2),
        seed("int3", &[0xcc], 0),
        seed("xrstor", &[0x48, 0x0f, 0xae, 0x2e], 4),
        seed("xsave", &[0x48, 0x0f, 0xae, 0x26], 4),
        seed("xsetbv", &[0x0f, 0x01, 0xd1], 4),
        seed("rdtscp", &[0x0f, 0x01, 0xf9], 0),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn replay_corpus_emulate() {
        crate::check_seed_files("emulate", super::seeds());
        let seeds = crate::corpus("emulate");
        assert!(!seeds.is_empty());
        for s in seeds {
            super::run(&s);
        }
    }
}
