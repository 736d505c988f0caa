//! Tests against the real /dev/kvm with tiny guests (names start with `kvm_`).

use std::cell::RefCell;

use iced_x86::code_asm::*;

use crate::test_utils::TinyGuest;
use crate::{Exit, ExitKind, ExitStats, IoHandler, RunOutcome, StopHandle, run_until_exit};

#[derive(Default)]
struct Log(RefCell<Vec<(u16, Vec<u8>)>>);

impl IoHandler for Log {
    fn pio_read(&self, _: u16, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.0.borrow_mut().push((port, data.to_vec()))
    }
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

#[test]
fn kvm_long_mode_guest_writes_ports_and_halts() {
    let mut g = TinyGuest::new(|a| {
        a.mov(rax, 0x1234_5678_9abc_def0u64)?; // a 64-bit immediate: we really are in long mode
        a.shr(rax, 32)?;
        a.mov(dx, 0x80u32)?;
        a.out(dx, eax)?;
        a.mov(al, 7u32)?;
        a.out(0x81, al)?;
        a.hlt()
    })
    .unwrap();
    let io = Log::default();
    let mut stats = ExitStats::default();
    let out = run_until_exit(&mut g.vcpu, &io, &StopHandle::new(), &mut stats).unwrap();
    assert_eq!(out, RunOutcome::Exit(Exit::Hlt));
    assert_eq!(
        *io.0.borrow(),
        vec![
            (0x80, 0x1234_5678u32.to_le_bytes().to_vec()),
            (0x81, vec![7])
        ]
    );
    assert_eq!(stats.get(ExitKind::PioWrite), 2);
    assert_eq!(stats.get(ExitKind::Hlt), 1);
}
