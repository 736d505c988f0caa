//! vmkit-block over virtio-pci (vmkit-virtio's modern transport with MSI-X), without KVM: a
//! driver written against the function's configuration space and BAR 0 — as a guest's would
//! be — brings up a two-queue device, reads the virtio-blk configuration through the device
//! configuration capability, writes and reads back a sector on each queue through its doorbell,
//! and each completion arrives as that queue's own MSI-X message.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmkit_block::config::offsets;
use vmkit_block::defs::*;
use vmkit_block::image::RawImage;
use vmkit_block::test_utils::TempImages;
use vmkit_block::{Block, BlockConfig};
use vmkit_devices::msi::{MsiEvent, RecordingMsiSink};
use vmkit_devices::pci::{PciFunction, cap_id};
use vmkit_virtio::pci::{
    DEVICE_CFG_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_CFG_OFFSET, NOTIFY_OFF_MULTIPLIER,
    VirtioPciTransport,
};
use vmkit_virtio::spec::common_cfg::*;
use vmkit_virtio::test_utils::ring_layout;

const QSIZE: u16 = 16;
const F_VERSION_1: u64 = 1 << 32;
const MSI_DATA_BASE: u32 = 0x40;

struct Driver {
    f: VirtioPciTransport<Block>,
    mem: GuestMemoryMmap,
    sink: Arc<RecordingMsiSink>,
}

impl Driver {
    fn rd(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.f.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn wr(&mut self, off: u64, len: usize, v: u64) {
        self.f.bar_write(0, off, &v.to_le_bytes()[..len]);
    }
    fn cap(&mut self, id: u8) -> u16 {
        let mut p = [0u8; 1];
        self.f.config_read(0x34, &mut p);
        let mut at = u16::from(p[0]);
        while at != 0 {
            let mut h = [0u8; 2];
            self.f.config_read(at, &mut h);
            if h[0] == id {
                return at;
            }
            at = u16::from(h[1]);
        }
        panic!("capability {id:#x} missing");
    }
    /// Place header/data/status descriptors at `first..first+3` of queue `q`, publish the
    /// chain in avail slot `slot`, and ring the queue's doorbell.
    fn submit(&mut self, q: u16, slot: u16, first: u16, req: u32, data: GuestAddress) {
        let l = ring_layout(q, QSIZE);
        let hdr = GuestAddress(0x100_0000 + u64::from(q) * 0x1000 + u64::from(first) * 0x20);
        let status = GuestAddress(hdr.0 + 0x10);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&req.to_le_bytes());
        h[8..].copy_from_slice(&(u64::from(q) * 8).to_le_bytes());
        self.mem.write_slice(&h, hdr).unwrap();
        self.mem.write_obj(0xffu8, status).unwrap();
        let data_flags = if req == VIRTIO_BLK_T_IN { 1 | 2 } else { 1 };
        let descs = [
            (hdr.0, 16u32, 1u16),
            (data.0, 512, data_flags),
            (status.0, 1, 2),
        ];
        for (i, (addr, len, flags)) in descs.into_iter().enumerate() {
            let at = GuestAddress(l.desc.0 + 16 * u64::from(first + i as u16));
            let next = if i < 2 { first + i as u16 + 1 } else { 0 };
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
        }
        self.mem
            .write_obj(first, GuestAddress(l.avail.0 + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.mem
            .write_obj(slot + 1, GuestAddress(l.avail.0 + 2))
            .unwrap();
        self.wr(VIRTIO_PCI_COMMON_Q_SELECT, 2, u64::from(q)); // queue_select
        let notify_off = self.rd(VIRTIO_PCI_COMMON_Q_NOFF, 2);
        let bell = NOTIFY_CFG_OFFSET + notify_off * u64::from(NOTIFY_OFF_MULTIPLIER);
        self.wr(bell, 2, u64::from(q));
        let status_byte: u8 = self.mem.read_obj(status).unwrap();
        assert_eq!(status_byte, VIRTIO_BLK_S_OK as u8, "queue {q} slot {slot}");
        let used: u16 = self.mem.read_obj(GuestAddress(l.used.0 + 2)).unwrap();
        assert_eq!(used, slot + 1, "queue {q}");
    }
    fn sent(&self) -> Vec<u32> {
        self.sink
            .events()
            .into_iter()
            .filter_map(|e| match e {
                MsiEvent::Sent(m) => Some(m.data),
                MsiEvent::Route(..) => None,
            })
            .collect()
    }
}

#[test]
fn block_over_virtio_pci_with_msix_and_two_queues() {
    let dir = TempImages::new(true).unwrap();
    let path = dir.path("pci.raw");
    RawImage::create(&path, 1 << 20).unwrap();
    let disk = RawImage::open(&path, false).unwrap();
    let cfg = BlockConfig {
        num_queues: 2,
        ..Default::default()
    };
    let dev = Block::new(Box::new(disk), cfg).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
    let sink = Arc::new(RecordingMsiSink::default());
    let msix = VirtioPciTransport::msix_for(&dev, sink.clone()).unwrap();
    let f = VirtioPciTransport::new(dev, mem.clone(), msix).unwrap();
    let mut d = Driver { f, mem, sink };

    // virtio-blk is PCI device 0x1042 (0x1040 + type 2).
    let mut id = [0u8; 4];
    d.f.config_read(0, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);

    // MSI-X on: vector 0 for configuration changes, vectors 1 and 2 for the queues.
    let cap = d.cap(cap_id::MSIX);
    d.f.config_write(cap + 2, &0x8000u16.to_le_bytes());
    for v in 0..3u64 {
        let e = u64::from(MSIX_TABLE_OFFSET) + 16 * v;
        d.wr(e, 4, 0xfee0_0000);
        d.wr(e + 4, 4, 0);
        d.wr(e + 8, 4, u64::from(MSI_DATA_BASE) + v);
        d.wr(e + 12, 4, 0); // unmasked
    }

    // Initialisation (virtio 1.2 §3.1.1) through the common configuration (§4.1.4.3).
    d.wr(VIRTIO_PCI_COMMON_STATUS, 1, 1); // ACKNOWLEDGE
    d.wr(VIRTIO_PCI_COMMON_STATUS, 1, 3); // DRIVER
    d.wr(VIRTIO_PCI_COMMON_DFSELECT, 4, 0);
    let lo = d.rd(VIRTIO_PCI_COMMON_DF, 4);
    d.wr(VIRTIO_PCI_COMMON_DFSELECT, 4, 1);
    let offered = (d.rd(VIRTIO_PCI_COMMON_DF, 4) << 32) | lo;
    let mq = 1u64 << VIRTIO_BLK_F_MQ;
    let flush = 1u64 << VIRTIO_BLK_F_FLUSH;
    assert_eq!(
        offered & (F_VERSION_1 | mq | flush),
        F_VERSION_1 | mq | flush
    );
    let wanted = F_VERSION_1 | mq | flush;
    d.wr(VIRTIO_PCI_COMMON_GFSELECT, 4, 0);
    d.wr(VIRTIO_PCI_COMMON_GF, 4, wanted & 0xffff_ffff);
    d.wr(VIRTIO_PCI_COMMON_GFSELECT, 4, 1);
    d.wr(VIRTIO_PCI_COMMON_GF, 4, wanted >> 32);
    d.wr(VIRTIO_PCI_COMMON_STATUS, 1, 0xb); // FEATURES_OK
    assert_eq!(d.rd(VIRTIO_PCI_COMMON_STATUS, 1), 0xb);
    assert_eq!(d.rd(VIRTIO_PCI_COMMON_NUMQ, 2), 2, "num_queues");
    d.wr(VIRTIO_PCI_COMMON_MSIX, 2, 0); // config_msix_vector
    assert_eq!(d.rd(VIRTIO_PCI_COMMON_MSIX, 2), 0);

    // The virtio-blk configuration through the device configuration capability.
    let capacity = d.rd(DEVICE_CFG_OFFSET + offsets::CAPACITY as u64, 8);
    assert_eq!(capacity, (1 << 20) / 512);
    let queues = d.rd(DEVICE_CFG_OFFSET + offsets::NUM_QUEUES as u64, 2);
    assert_eq!(queues, 2);

    for q in 0..2u16 {
        let l = ring_layout(q, QSIZE);
        d.wr(VIRTIO_PCI_COMMON_Q_SELECT, 2, u64::from(q));
        d.wr(VIRTIO_PCI_COMMON_Q_SIZE, 2, u64::from(QSIZE));
        d.wr(VIRTIO_PCI_COMMON_Q_DESCLO, 8, l.desc.0);
        d.wr(VIRTIO_PCI_COMMON_Q_AVAILLO, 8, l.avail.0);
        d.wr(VIRTIO_PCI_COMMON_Q_USEDLO, 8, l.used.0);
        d.wr(VIRTIO_PCI_COMMON_Q_MSIX, 2, u64::from(q) + 1); // queue_msix_vector
        assert_eq!(
            d.rd(VIRTIO_PCI_COMMON_Q_MSIX, 2),
            u64::from(q) + 1,
            "vector accepted"
        );
        d.wr(VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1);
    }
    d.wr(VIRTIO_PCI_COMMON_STATUS, 1, 0xf); // DRIVER_OK
    assert_eq!(d.rd(VIRTIO_PCI_COMMON_STATUS, 1), 0xf);

    // Each queue writes its own sector, then reads it back; each completion is one MSI on
    // that queue's vector.
    for q in 0..2u16 {
        let out = GuestAddress(0x200_0000 + u64::from(q) * 0x1000);
        let back = GuestAddress(0x300_0000 + u64::from(q) * 0x1000);
        let pattern: Vec<u8> = (0..512u32).map(|i| (i as u8) ^ (0x5a + q as u8)).collect();
        d.mem.write_slice(&pattern, out).unwrap();
        d.submit(q, 0, 0, VIRTIO_BLK_T_OUT, out);
        d.submit(q, 1, 3, VIRTIO_BLK_T_IN, back);
        let mut got = vec![0u8; 512];
        d.mem.read_slice(&mut got, back).unwrap();
        assert_eq!(got, pattern, "queue {q}");
        let vector_data = MSI_DATA_BASE + 1 + u32::from(q);
        let sent = d.sent();
        assert_eq!(
            sent.iter().filter(|&&x| x == vector_data).count(),
            2,
            "{sent:?}"
        );
    }
    assert_eq!(d.sent().len(), 4, "no other interrupts");
    let m = d.f.device().metrics();
    assert_eq!((m.writes, m.reads), (2, 2));

    // Both sectors landed in the image file.
    drop(d);
    let file = std::fs::read(&path).unwrap();
    for q in 0..2usize {
        let at = q * 8 * 512;
        let want: Vec<u8> = (0..512u32).map(|i| (i as u8) ^ (0x5a + q as u8)).collect();
        assert_eq!(&file[at..at + 512], &want[..], "sector of queue {q}");
    }
}
