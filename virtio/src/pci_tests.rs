//! virtio-pci transport tests: capabilities, common configuration, MSI-X vectors, ISR, doorbells.

use std::sync::Arc;

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::DescriptorTable;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_devices::msi::RecordingMsiSink;
use vmkit_devices::pci::{PciFunction, cap_id};

use crate::pci::*;
use crate::rng::{EntropySource, Rng};
use crate::spec::*;
use crate::test_utils::ring_layout;

pub(super) struct Ones;
impl EntropySource for Ones {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(1);
        Ok(())
    }
}

pub(super) struct Pci {
    pub(super) f: VirtioPciTransport<Rng<GuestMemoryMmap, Ones>>,
    pub(super) sink: Arc<RecordingMsiSink>,
    pub(super) mem: GuestMemoryMmap,
}

impl Pci {
    pub(super) fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let sink = Arc::new(RecordingMsiSink::default());
        let dev = Rng::new(Ones);
        let msix = VirtioPciTransport::msix_for(&dev, sink.clone()).unwrap();
        let f = VirtioPciTransport::new(dev, mem.clone(), msix).unwrap();
        Self { f, sink, mem }
    }
    pub(super) fn cfg32(&mut self, off: u16) -> u32 {
        let mut b = [0u8; 4];
        self.f.config_read(off, &mut b);
        u32::from_le_bytes(b)
    }
    pub(super) fn rd(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.f.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    pub(super) fn wr(&mut self, off: u64, len: usize, v: u64) {
        self.f.bar_write(0, off, &v.to_le_bytes()[..len]);
    }
    pub(super) fn status(&mut self) -> u8 {
        self.rd(0x14, 1) as u8
    }
    /// Negotiate VERSION_1, set up queue 0 (size 16) with MSI-X vector `qvec`, DRIVER_OK.
    pub(super) fn bring_up(&mut self, qvec: u16) {
        use crate::spec::common_cfg::*;
        let (a, d, f, ok) = (
            STATUS_ACKNOWLEDGE as u64,
            STATUS_DRIVER as u64,
            STATUS_FEATURES_OK as u64,
            STATUS_DRIVER_OK as u64,
        );
        self.wr(VIRTIO_PCI_COMMON_STATUS, 1, a);
        self.wr(VIRTIO_PCI_COMMON_STATUS, 1, a | d);
        self.wr(VIRTIO_PCI_COMMON_GFSELECT, 4, 1);
        self.wr(VIRTIO_PCI_COMMON_GF, 4, 1); // VERSION_1 (bit 32)
        self.wr(VIRTIO_PCI_COMMON_STATUS, 1, a | d | f);
        assert_eq!(self.status(), 0xb);
        self.wr(VIRTIO_PCI_COMMON_Q_SELECT, 2, 0);
        self.wr(VIRTIO_PCI_COMMON_Q_SIZE, 2, 16);
        let l = ring_layout(0, 16);
        self.wr(VIRTIO_PCI_COMMON_Q_DESCLO, 8, l.desc.0); // 64-bit access
        self.wr(VIRTIO_PCI_COMMON_Q_AVAILLO, 4, l.avail.0); // two 32-bit halves
        self.wr(VIRTIO_PCI_COMMON_Q_AVAILHI, 4, 0);
        self.wr(VIRTIO_PCI_COMMON_Q_USEDLO, 4, l.used.0);
        self.wr(VIRTIO_PCI_COMMON_Q_USEDHI, 4, 0);
        self.wr(VIRTIO_PCI_COMMON_Q_MSIX, 2, qvec as u64);
        self.wr(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1);
        self.wr(VIRTIO_PCI_COMMON_STATUS, 1, a | d | f | ok);
        assert_eq!(self.status(), 0xf);
    }
    /// Post one writable buffer of `len` bytes at 0x200_0000 as chain 0 of queue 0.
    pub(super) fn post(&mut self, len: u32) {
        let l = ring_layout(0, 16);
        let t = DescriptorTable::new(&self.mem, l.desc, 16);
        let d = SplitDescriptor::new(0x200_0000, len, VRING_DESC_F_WRITE as u16, 0);
        t.store(0, RawDescriptor::from(d)).unwrap();
        let idx: u16 = self.mem.read_obj(GuestAddress(l.avail.0 + 2)).unwrap();
        self.mem
            .write_obj(0u16, GuestAddress(l.avail.0 + 4 + 2 * (idx % 16) as u64))
            .unwrap();
        self.mem
            .write_obj(idx + 1, GuestAddress(l.avail.0 + 2))
            .unwrap();
    }
    pub(super) fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(ring_layout(0, 16).used.0 + 2))
            .unwrap()
    }
    /// Enable MSI-X and program+unmask `vector` with data `data`.
    pub(super) fn msix_program(&mut self, vector: u16, data: u32) {
        let cap = self.f.msix_cap();
        self.f.config_write(cap + 2, &0x8000u16.to_le_bytes());
        let e = MSIX_TABLE_OFFSET as u64 + 16 * vector as u64;
        self.wr(e, 4, 0xfee0_0000);
        self.wr(e + 4, 4, 0);
        self.wr(e + 8, 4, data as u64);
        self.wr(e + 12, 4, 0);
    }
}

pub(super) trait MsixCap {
    fn msix_cap(&mut self) -> u16;
}
impl<T: PciFunction> MsixCap for T {
    fn msix_cap(&mut self) -> u16 {
        let mut p = [0u8; 1];
        self.config_read(0x34, &mut p);
        let mut at = p[0] as u16;
        while at != 0 {
            let mut h = [0u8; 2];
            self.config_read(at, &mut h);
            if h[0] == cap_id::MSIX {
                return at;
            }
            at = h[1] as u16;
        }
        0
    }
}

#[test]
fn header_and_virtio_capabilities() {
    let mut p = Pci::new();
    assert_eq!(p.cfg32(0), 0x1044_1af4);
    assert_eq!(p.cfg32(0x2c) >> 16, 0x40); // subsystem id
    assert_eq!(p.cfg32(0x8) & 0xff, 1); // revision 1: modern only
    // Walk the capability list as a driver does.
    let mut caps = Vec::new();
    let mut at = (p.cfg32(0x34) & 0xff) as u16;
    while at != 0 {
        let h = p.cfg32(at);
        let id = h as u8;
        if id == cap_id::VENDOR_SPECIFIC {
            let cfg_type = (h >> 24) as u8;
            let bar = p.cfg32(at + 4) as u8;
            let offset = p.cfg32(at + 8);
            let length = p.cfg32(at + 12);
            let extra = matches!(cfg_type, VIRTIO_PCI_CAP_NOTIFY_CFG | VIRTIO_PCI_CAP_PCI_CFG)
                .then(|| p.cfg32(at + 16));
            assert_eq!((h >> 16) as u8, if extra.is_some() { 20 } else { 16 });
            caps.push((cfg_type, bar, offset, length, extra));
        } else {
            assert_eq!(id, cap_id::MSIX);
        }
        at = ((h >> 8) & 0xff) as u16;
    }
    assert_eq!(
        caps,
        [
            (VIRTIO_PCI_CAP_COMMON_CFG, 0, 0, 0x3c, None),
            (VIRTIO_PCI_CAP_ISR_CFG, 0, 0x1000, 4, None),
            (VIRTIO_PCI_CAP_DEVICE_CFG, 0, 0x2000, 0x1000, None),
            (VIRTIO_PCI_CAP_NOTIFY_CFG, 0, 0x3000, 4, Some(4)),
            // virtio 1.2 §4.1.4.9: bar, offset, length and pci_cfg_data all zero until the
            // driver sets them.
            (VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, Some(0)),
        ]
    );
    // BAR0 sizing: 64-bit memory BAR of 32 KiB.
    p.f.config_write(0x10, &u32::MAX.to_le_bytes());
    assert_eq!(p.cfg32(0x10), !(VIRTIO_PCI_BAR_SIZE as u32 - 1) | 0x4);
}

#[test]
fn common_cfg_decode_table() {
    use CommonCfgField::*;
    let ok: &[(u64, usize, CommonCfgField)] = &[
        (0x00, 4, DeviceFeatureSelect),
        (0x12, 2, NumQueues),
        (0x14, 1, DeviceStatus),
        (0x15, 1, ConfigGeneration),
        (0x1e, 2, QueueNotifyOff),
        (
            0x20,
            8,
            QueueAddress {
                ring: crate::Ring::Descriptors,
                high: false,
                whole: true,
            },
        ),
        (
            0x2c,
            4,
            QueueAddress {
                ring: crate::Ring::Driver,
                high: true,
                whole: false,
            },
        ),
        (0x3a, 2, QueueReset),
    ];
    for &(off, len, f) in ok {
        assert_eq!(CommonCfgField::decode(off, len), Ok(f), "{off:#x}/{len}");
    }
    for (off, len) in [
        (0x00, 2),
        (0x01, 1),
        (0x14, 2),
        (0x12, 4),
        (0x22, 4),
        (0x24, 8),
        (0x3c, 2),
        (u64::MAX, 1),
    ] {
        assert_eq!(
            CommonCfgField::decode(off, len),
            Err(CommonCfgError { offset: off, len })
        );
    }
}

#[test]
fn rng_over_pci_with_msix_and_isr() {
    let mut p = Pci::new();
    assert_eq!(p.rd(0x12, 2), 1); // num_queues
    p.wr(0x00, 4, 1);
    assert_eq!((p.rd(0x00, 4), p.rd(0x04, 4)), (1, 1)); // select reads back; VERSION_1
    p.wr(0x00, 4, 0);
    assert_eq!(p.rd(0x04, 4), 1 << VIRTIO_RING_F_EVENT_IDX);
    p.wr(0x16, 2, 0);
    assert_eq!(p.rd(0x18, 2), 256); // max size before the driver sets it
    p.msix_program(1, 0x45);
    p.bring_up(1);
    assert_eq!(p.rd(0x1a, 2), 1);
    // An out-of-range vector reads back NO_VECTOR (refused).
    p.wr(0x10, 2, 7);
    assert_eq!(p.rd(0x10, 2), VIRTIO_MSI_NO_VECTOR as u64);
    p.wr(0x10, 2, 0);
    assert_eq!(p.rd(0x10, 2), 0);
    p.post(8);
    p.wr(NOTIFY_CFG_OFFSET, 2, 0); // doorbell for queue 0
    assert_eq!(p.used_idx(), 1);
    assert_eq!(p.sink.vectors(), [0x45]);
    let mut buf = [0u8; 8];
    p.mem
        .read_slice(&mut buf, GuestAddress(0x200_0000))
        .unwrap();
    assert_eq!(buf, [1; 8]);
    // ISR: read clears.
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), VIRTIO_PCI_ISR_QUEUE as u64);
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), 0);
    assert_eq!(p.f.metrics().notifies, 1);
    // A doorbell beyond the queues is counted, not delivered.
    p.wr(NOTIFY_CFG_OFFSET + 4, 2, 1);
    assert_eq!(p.f.metrics().notifies, 1);
    assert_eq!(p.f.metrics().bad_register_accesses, 1);
    // Masked vector: held pending in the PBA, delivered on unmask.
    p.wr(MSIX_TABLE_OFFSET as u64 + 16 + 12, 4, 1);
    p.post(4);
    p.wr(NOTIFY_CFG_OFFSET, 2, 0);
    assert_eq!(p.sink.vectors(), [0x45]);
    assert_eq!(p.rd(MSIX_PBA_OFFSET as u64, 8), 0b10);
    p.wr(MSIX_TABLE_OFFSET as u64 + 16 + 12, 4, 0);
    assert_eq!(p.sink.vectors(), [0x45, 0x45]);
    // Reset: vectors back to NO_VECTOR, status 0.
    p.wr(0x14, 1, 0);
    assert_eq!(
        (p.status(), p.rd(0x1a, 2)),
        (0, VIRTIO_MSI_NO_VECTOR as u64)
    );
}

#[test]
fn queue_without_vector_sets_only_the_isr() {
    let mut p = Pci::new();
    p.bring_up(VIRTIO_MSI_NO_VECTOR);
    p.post(4);
    p.wr(NOTIFY_CFG_OFFSET, 4, 0);
    assert_eq!(p.used_idx(), 1);
    assert!(p.sink.sent().is_empty());
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), 1);
}

#[test]
fn bad_bar_accesses_are_counted() {
    let mut p = Pci::new();
    let mut b = [0xffu8; 4];
    p.f.bar_read(2, 0, &mut b); // no such BAR
    assert_eq!(b, [0; 4]);
    p.f.bar_write(0, 0x14, &[1, 0]); // status is one byte
    p.f.bar_write(0, 0x04, &[1, 0, 0, 0]); // device_feature is read-only
    p.f.bar_read(0, ISR_CFG_OFFSET, &mut b); // ISR is one byte
    p.f.bar_write(0, 0x7ff8, &[0; 8]); // nothing there
    assert_eq!(p.f.metrics().bad_register_accesses, 5);
    assert_eq!(p.status(), 0);
    // Notify before DRIVER_OK: ignored, counted.
    p.wr(NOTIFY_CFG_OFFSET, 2, 0);
    assert_eq!(p.f.metrics().bad_notifies, 1);
    assert_eq!(p.f.notify_addresses(0xd000_0000), [(0xd000_3000, None, 0)]);
}

#[test]
fn config_change_uses_the_config_vector_and_bumps_the_generation() {
    let mut p = Pci::new();
    p.msix_program(0, 0x50);
    p.bring_up(VIRTIO_MSI_NO_VECTOR);
    p.wr(0x10, 2, 0); // config_msix_vector = 0
    let g0 = p.rd(0x15, 1);
    p.f.core_mut().config_changed();
    assert_eq!(p.rd(0x15, 1), (g0 + 1) & 0xff);
    assert_eq!(p.sink.vectors(), [0x50]);
    assert_eq!(p.rd(ISR_CFG_OFFSET, 1), VIRTIO_PCI_ISR_CONFIG as u64);
    // A device error: DEVICE_NEEDS_RESET plus a config interrupt.
    p.f.core_mut()
        .device_error(crate::DeviceError::Backend("test".into()));
    assert_eq!(p.status() & STATUS_NEEDS_RESET, STATUS_NEEDS_RESET);
    assert_eq!(p.sink.vectors(), [0x50, 0x50]);
}
