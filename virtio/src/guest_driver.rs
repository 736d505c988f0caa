//! Tiny-guest driver code (feature `guest-driver`, part of `test-utils`): the PCI configuration, MSI-X and virtio
//! sequences that KVM tests and example guests assemble with iced-x86, written once, with
//! the register offsets of [`crate::spec::common_cfg`].
//!
//! Every helper emits plain stores and port writes (no calls, no stack), clobbers only the
//! registers it names, and takes addresses the guest identity-maps.
//!
//! ```
//! use iced_x86::code_asm::*;
//! use vmkit_virtio::guest_driver::{GuestQueue, publish, virtio_pci_bring_up, write_descriptor};
//!
//! let mut a = CodeAssembler::new(64).unwrap();
//! a.mov(rsi, 0xd000_0000u64).unwrap(); // BAR 0: common configuration at offset 0
//! let q = GuestQueue::new(0, 16, 0x30_0000);
//! virtio_pci_bring_up(&mut a, rsi, 1 << 32, &[q]).unwrap();
//! write_descriptor(&mut a, q.desc, 0, 0x30_1000, 16, 2, 0).unwrap();
//! publish(&mut a, q, 0, 0).unwrap();
//! assert!(a.assemble(0x1000).is_ok());
//! ```

use iced_x86::code_asm::*;

use crate::spec::common_cfg::*;
use crate::spec::{STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK};

/// A split virtqueue as the guest driver lays it out (virtio 1.2 §2.7): descriptors at
/// `desc`, the available ring 16 bytes per entry later, the used ring 4-aligned after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestQueue {
    /// Queue index.
    pub index: u16,
    /// Entries.
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// MSI-X vector for the queue (`None`: leave `VIRTIO_MSI_NO_VECTOR`).
    pub msix_vector: Option<u16>,
}

impl GuestQueue {
    /// Queue `index` of `size` entries laid out from `base` (descriptors, then the available
    /// ring at `base + 16 * size`, the used ring 4-aligned after it), no MSI-X vector.
    pub fn new(index: u16, size: u16, base: u64) -> Self {
        let n = u64::from(size);
        let avail = base + 16 * n;
        Self {
            index,
            size,
            desc: base,
            avail,
            used: (avail + 6 + 2 * n).next_multiple_of(4),
            msix_vector: None,
        }
    }

    /// The same queue on MSI-X vector `vector`.
    pub fn with_vector(self, vector: u16) -> Self {
        Self {
            msix_vector: Some(vector),
            ..self
        }
    }

    /// With explicit ring addresses (a driver's own layout).
    pub fn at(index: u16, size: u16, desc: u64, avail: u64, used: u64) -> Self {
        Self {
            index,
            size,
            desc,
            avail,
            used,
            msix_vector: None,
        }
    }
}

/// Width of a configuration-space access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// 16 bits.
    Word,
    /// 32 bits.
    Dword,
}

/// A configuration write through mechanism #1 (0xCF8/0xCFC, PCI Local Bus 3.0 §3.2.2.3.2) to
/// `bus`:`device`.`function` register `reg` (clobbers eax, dx).
///
/// # Errors
///
/// The assembler refused an instruction.
pub fn pci_cfg_write(
    a: &mut CodeAssembler,
    bus: u8,
    devfn: u8,
    reg: u16,
    value: u32,
    width: Width,
) -> Result<(), IcedError> {
    let reg = u32::from(reg);
    a.mov(dx, 0xcf8u32)?;
    a.mov(
        eax,
        0x8000_0000 | u32::from(bus) << 16 | u32::from(devfn) << 8 | (reg & 0xfc),
    )?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfc + (reg & 3))?;
    a.mov(eax, value)?;
    match width {
        Width::Word => a.out(dx, ax),
        Width::Dword => a.out(dx, eax),
    }
}

/// A 32-bit configuration read into eax (clobbers dx).
///
/// # Errors
///
/// The assembler refused an instruction.
pub fn pci_cfg_read(a: &mut CodeAssembler, bus: u8, devfn: u8, reg: u16) -> Result<(), IcedError> {
    a.mov(dx, 0xcf8u32)?;
    a.mov(
        eax,
        0x8000_0000 | u32::from(bus) << 16 | u32::from(devfn) << 8 | (u32::from(reg) & 0xfc),
    )?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)?;
    a.in_(eax, dx)
}

/// Program MSI-X table entry `entry` of a table at `table` + `base` (where `base` holds the
/// BAR address) with message `addr`/`data`, unmasked (PCI 3.0 §6.8.2.6–9).
///
/// # Errors
///
/// The assembler refused an instruction.
pub fn msix_entry(
    a: &mut CodeAssembler,
    base: AsmRegister64,
    table: u32,
    entry: u16,
    addr: u64,
    data: u32,
) -> Result<(), IcedError> {
    let e = table as i32 + 16 * i32::from(entry);
    a.mov(dword_ptr(base + e), addr as u32)?;
    a.mov(dword_ptr(base + e + 4), (addr >> 32) as u32)?;
    a.mov(dword_ptr(base + e + 8), data)?;
    a.mov(dword_ptr(base + e + 12), 0u32) // vector control: unmasked
}

/// The driver side of virtio 1.2 §3.1.1 over virtio-pci's common configuration at `common`
/// (a register holding its address): ACKNOWLEDGE, DRIVER, the 64 feature bits `features`,
/// FEATURES_OK, every queue of `queues` (size, ring addresses, MSI-X vector, enable), then
/// DRIVER_OK.
///
/// # Errors
///
/// The assembler refused an instruction.
pub fn virtio_pci_bring_up(
    a: &mut CodeAssembler,
    common: AsmRegister64,
    features: u64,
    queues: &[GuestQueue],
) -> Result<(), IcedError> {
    // Every field is below 0x40: a displacement off `common`.
    let at = |off: u64| common + off as i32;
    let drv = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
    let fok = drv | STATUS_FEATURES_OK;
    a.mov(
        byte_ptr(at(VIRTIO_PCI_COMMON_STATUS)),
        u32::from(STATUS_ACKNOWLEDGE),
    )?;
    a.mov(byte_ptr(at(VIRTIO_PCI_COMMON_STATUS)), u32::from(drv))?;
    for (select, bits) in [(0u32, features as u32), (1, (features >> 32) as u32)] {
        if bits != 0 {
            a.mov(dword_ptr(at(VIRTIO_PCI_COMMON_GFSELECT)), select)?;
            a.mov(dword_ptr(at(VIRTIO_PCI_COMMON_GF)), bits)?;
        }
    }
    a.mov(byte_ptr(at(VIRTIO_PCI_COMMON_STATUS)), u32::from(fok))?;
    for q in queues {
        a.mov(word_ptr(at(VIRTIO_PCI_COMMON_Q_SELECT)), u32::from(q.index))?;
        a.mov(word_ptr(at(VIRTIO_PCI_COMMON_Q_SIZE)), u32::from(q.size))?;
        for (off, addr) in [
            (VIRTIO_PCI_COMMON_Q_DESCLO, q.desc),
            (VIRTIO_PCI_COMMON_Q_AVAILLO, q.avail),
            (VIRTIO_PCI_COMMON_Q_USEDLO, q.used),
        ] {
            a.mov(dword_ptr(at(off)), addr as u32)?;
            a.mov(dword_ptr(at(off + 4)), (addr >> 32) as u32)?;
        }
        if let Some(v) = q.msix_vector {
            a.mov(word_ptr(at(VIRTIO_PCI_COMMON_Q_MSIX)), u32::from(v))?;
        }
        a.mov(word_ptr(at(VIRTIO_PCI_COMMON_Q_ENABLE)), 1u32)?;
    }
    a.mov(
        byte_ptr(at(VIRTIO_PCI_COMMON_STATUS)),
        u32::from(fok | STATUS_DRIVER_OK),
    )
}

/// Write descriptor `index` of the table at `table` (virtio 1.2 §2.7.5; clobbers rdi, rax).
///
/// # Errors
///
/// The assembler refused an instruction.
pub fn write_descriptor(
    a: &mut CodeAssembler,
    table: u64,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) -> Result<(), IcedError> {
    a.mov(rdi, table + 16 * u64::from(index))?;
    a.mov(rax, addr)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(dword_ptr(rdi + 8), len)?;
    a.mov(word_ptr(rdi + 12), u32::from(flags))?;
    a.mov(word_ptr(rdi + 14), u32::from(next))
}

/// Make `head` available as the driver's `slot`-th buffer of `queue`: `ring[slot % size] =
/// head`, then `idx = slot + 1` (virtio 1.2 §2.7.13; clobbers rdi).
///
/// # Errors
///
/// The assembler refused an instruction.
pub fn publish(
    a: &mut CodeAssembler,
    queue: GuestQueue,
    slot: u16,
    head: u16,
) -> Result<(), IcedError> {
    let entry = 4 + 2 * i32::from(slot % queue.size.max(1));
    a.mov(rdi, queue.avail)?;
    a.mov(word_ptr(rdi + entry), u32::from(head))?;
    a.mov(word_ptr(rdi + 2), u32::from(slot.wrapping_add(1)))
}
