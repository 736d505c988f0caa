//! The root complex as the next device's author sees it: requester IDs, buses other than 0,
//! ARI function numbers, functions that appear and disappear at run time, and every side
//! effect as an event to observers.

use std::sync::{Arc, Mutex};

use super::*;
use crate::IoBuses;

/// A function with one 4 KiB memory BAR that remembers its requester ID.
struct Endpoint {
    cfg: ConfigSpace,
    rid: Option<RequesterId>,
}

impl Endpoint {
    fn new(device_id: u16) -> Arc<Mutex<Self>> {
        let mut cfg = ConfigSpace::new(&PciHeader {
            vendor_id: 0x1af4,
            device_id,
            ..Default::default()
        });
        cfg.add_bar(
            0,
            BarKind::Memory32 {
                prefetchable: false,
            },
            0x1000,
        )
        .unwrap();
        Arc::new(Mutex::new(Self { cfg, rid: None }))
    }
}

impl PciFunction for Endpoint {
    fn config_space(&self) -> &ConfigSpace {
        &self.cfg
    }
    fn config_space_mut(&mut self) -> &mut ConfigSpace {
        &mut self.cfg
    }
    fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
        // Reads return the low byte of the requester ID and the offset: who answered.
        let id = self.rid.map_or(0, |r| r.to_u16() as u8);
        data.fill(id ^ offset as u8);
    }
    fn bar_write(&mut self, _: u8, _: u64, _: &[u8]) {}
    fn attached(&mut self, rid: RequesterId) {
        self.rid = Some(rid);
    }
}

const ECAM: u64 = 0xb000_0000;

fn ecam_addr(rid: RequesterId, reg: u16) -> u64 {
    ECAM + (u64::from(rid.to_u16()) << 12) + u64::from(reg)
}

fn setup() -> (Arc<IoBuses>, Arc<PciRoot>, Arc<RecordingPciObserver>) {
    let buses = Arc::new(IoBuses::default());
    let root = PciRoot::new(&buses);
    buses
        .mmio
        .insert(ECAM, root::PCI_ECAM_SEGMENT_SIZE, "ecam", root.ecam())
        .unwrap();
    buses
        .pio
        .insert(0xcf8, root::PCI_CONFIG_IO_LEN, "cf8", root.config_io())
        .unwrap();
    let obs = Arc::new(RecordingPciObserver::default());
    root.observe(obs.clone());
    (buses, root, obs)
}

fn ecam_write(b: &IoBuses, rid: RequesterId, reg: u16, data: &[u8]) {
    assert!(b.mmio.write(ecam_addr(rid, reg), data));
}

fn ecam_read32(b: &IoBuses, rid: RequesterId, reg: u16) -> u32 {
    let mut d = [0u8; 4];
    b.mmio.read(ecam_addr(rid, reg), &mut d);
    u32::from_le_bytes(d)
}

fn bar0(address: u64) -> PciBar {
    PciBar {
        index: 0,
        kind: BarKind::Memory32 {
            prefetchable: false,
        },
        address,
        size: 0x1000,
    }
}

#[test]
fn functions_on_other_buses_and_ari_numbers_are_reachable_and_know_their_requester_id() {
    let (b, root, _) = setup();
    let on_bus_3 = RequesterId::new(3, 4, 2).unwrap();
    let ari = RequesterId::ari(5, 200);
    let (f1, f2) = (Endpoint::new(0x1041), Endpoint::new(0x1042));
    root.add_function(on_bus_3, "bus3", f1.clone()).unwrap();
    root.add_function(ari, "vf200", f2.clone()).unwrap();
    assert_eq!(f1.lock().unwrap().rid, Some(on_bus_3));
    assert_eq!(f2.lock().unwrap().rid, Some(ari));
    // ECAM reaches both; so does 0xCF8 for bus 3 (CONFIG_ADDRESS bits 23:16).
    assert_eq!(ecam_read32(&b, on_bus_3, 0), 0x1041_1af4);
    assert_eq!(ecam_read32(&b, ari, 0), 0x1042_1af4);
    let cfg_addr = 0x8000_0000u32 | 3 << 16 | (4 << 3 | 2) << 8;
    b.pio.write(0xcf8, &cfg_addr.to_le_bytes());
    let mut id = [0u8; 4];
    b.pio.read(0xcfc, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1041_1af4);
    // Nothing at 5:00.0: all-ones, counted as absent (not as a bad access).
    assert_eq!(
        ecam_read32(&b, RequesterId::new(5, 0, 0).unwrap(), 0),
        u32::MAX
    );
    assert_eq!(root.stats().absent_function_accesses, 1);
    assert_eq!(root.stats().bad_accesses, 0);
    assert_eq!(
        root.functions(),
        [(on_bus_3, "bus3".to_string()), (ari, "vf200".to_string())]
    );
    assert!(matches!(
        root.add_function(ari, "again", Endpoint::new(1)),
        Err(PciError::SlotInUse { .. })
    ));
}

#[test]
fn bar_side_effects_and_hot_plug_are_events() {
    let (b, root, obs) = setup();
    let rid = RequesterId::new(1, 0, 0).unwrap();
    root.add_function(rid, "ep", Endpoint::new(0x1041)).unwrap();
    assert_eq!(obs.events(), [PciEvent::FunctionAdded(rid)]);
    obs.clear();
    // Program and enable BAR 0, move it, disable decoding.
    ecam_write(&b, rid, reg::BAR0, &0xe000_0000u32.to_le_bytes());
    ecam_write(&b, rid, reg::COMMAND, &command::MEMORY_SPACE.to_le_bytes());
    ecam_write(&b, rid, reg::BAR0, &0xe010_0000u32.to_le_bytes());
    let mut d = [0u8; 1];
    b.mmio.read(0xe010_0004, &mut d);
    assert_eq!(
        d[0],
        (rid.to_u16() as u8) ^ 4,
        "the BAR answers at its new place"
    );
    ecam_write(&b, rid, reg::COMMAND, &0u16.to_le_bytes());
    assert_eq!(
        obs.events(),
        [
            PciEvent::BarMapped {
                rid,
                bar: bar0(0xe000_0000)
            },
            PciEvent::BarMoved {
                rid,
                from: bar0(0xe000_0000),
                to: bar0(0xe010_0000)
            },
            PciEvent::BarUnmapped {
                rid,
                bar: bar0(0xe010_0000)
            },
        ]
    );
    assert_eq!(obs.events()[1].bar_address(rid, 0), Some(Some(0xe010_0000)));
    assert_eq!(obs.events()[2].bar_address(rid, 0), Some(None));
    assert_eq!(obs.events()[1].bar_address(rid, 2), None);
    // Decoding again, then hot-unplug: the BAR goes with the function.
    ecam_write(&b, rid, reg::COMMAND, &command::MEMORY_SPACE.to_le_bytes());
    obs.clear();
    assert!(root.remove(rid).is_some());
    assert_eq!(
        obs.events(),
        [
            PciEvent::BarUnmapped {
                rid,
                bar: bar0(0xe010_0000)
            },
            PciEvent::FunctionRemoved(rid),
        ]
    );
    assert!(b.mmio.ranges().iter().all(|r| r.0 != 0xe010_0000));
    assert_eq!(ecam_read32(&b, rid, 0), u32::MAX);
    assert!(root.remove(rid).is_none());
    // And a new function can appear in its place at run time.
    root.add_function(rid, "ep2", Endpoint::new(0x1042))
        .unwrap();
    assert_eq!(ecam_read32(&b, rid, 0), 0x1042_1af4);
}

/// ECAM beyond the 256 buses of a segment is a bad access (it used to alias bus 0xff).
#[test]
fn ecam_beyond_the_segment_is_refused() {
    let buses = Arc::new(IoBuses::default());
    let root = PciRoot::new(&buses);
    // Map a window larger than the segment to reach the offset at all.
    buses
        .mmio
        .insert(ECAM, 2 * root::PCI_ECAM_SEGMENT_SIZE, "ecam", root.ecam())
        .unwrap();
    let mut d = [0u8; 4];
    buses.mmio.read(ECAM + root::PCI_ECAM_SEGMENT_SIZE, &mut d);
    assert_eq!(d, [0xff; 4]);
    assert_eq!(root.stats().bad_accesses, 1);
}
