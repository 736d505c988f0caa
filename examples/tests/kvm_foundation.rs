//! End-to-end tests of the foundation seams (memory → vCPU → exit → bus → device) on /dev/kvm.

use std::sync::Arc;

use iced_x86::code_asm::*;
use vmkit_devices::bus::{BusDevice, IoBuses};
use vmkit_devices::debug_exit::DebugExit;
use vmkit_vcpu::test_utils::TinyGuest;
use vmkit_vcpu::{ExitKind, ExitStats, RunOutcome, StopHandle, run_until_exit};

/// Records 4-byte values written to its port.
#[derive(Default)]
struct Sink(std::sync::Mutex<Vec<u32>>);

impl BusDevice for Sink {
    fn read(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _: u64, data: &[u8]) {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        self.0.lock().unwrap().push(u32::from_le_bytes(v));
    }
}

#[test]
fn kvm_unclaimed_mmio_keeps_running() {
    const UNCLAIMED: u64 = 0xd000_0000; // inside the 32-bit hole, no device there
    let mut g = TinyGuest::new(|a| {
        a.mov(rbx, UNCLAIMED)?;
        a.mov(eax, dword_ptr(rbx))?; // unclaimed MMIO load
        a.out(0x80, eax)?; // report what it read
        a.mov(dword_ptr(rbx + 8), eax)?; // unclaimed MMIO store
        a.mov(eax, 0x600d_u32)?;
        a.out(0x80, eax)?; // still running
        a.mov(al, 5u32)?;
        a.out(0xf4, al)?;
        a.hlt()
    })
    .unwrap();
    let stop = StopHandle::new();
    let buses = IoBuses::default();
    let sink = Arc::new(Sink::default());
    buses.pio.insert(0x80, 4, "sink", sink.clone()).unwrap();
    buses
        .pio
        .insert(
            0xf4,
            4,
            "debug-exit",
            Arc::new(DebugExit::new(stop.clone())),
        )
        .unwrap();
    let mut stats = ExitStats::default();
    let out = run_until_exit(&mut g.vcpu, &buses, &stop, &mut stats).unwrap();
    assert_eq!(out, RunOutcome::Stopped(5));
    assert_eq!(*sink.0.lock().unwrap(), [0xffff_ffff, 0x600d]);
    let bus = buses.mmio.stats();
    assert_eq!((bus.unclaimed_reads, bus.unclaimed_writes), (1, 1));
    assert_eq!(stats.get(ExitKind::MmioRead), 1);
    assert_eq!(stats.get(ExitKind::MmioWrite), 1);
    assert_eq!(stats.get(ExitKind::PioWrite), 3);
}
