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

/// Answers reads of port 0x60 with 1, 2, 3, … and logs writes.
#[derive(Default)]
struct Counter {
    log: Log,
    next: std::cell::Cell<u8>,
}

impl IoHandler for Counter {
    fn pio_read(&self, _: u16, data: &mut [u8]) {
        for b in data {
            self.next.set(self.next.get() + 1);
            *b = self.next.get();
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        self.log.pio_write(port, data)
    }
    fn mmio_read(&self, _: u64, data: &mut [u8]) {
        data.fill(0xff)
    }
    fn mmio_write(&self, _: u64, _: &[u8]) {}
}

#[test]
fn kvm_string_port_io_reaches_the_handler_one_element_at_a_time() {
    use crate::test_utils::DATA_ADDR;
    let mut g = TinyGuest::new(|a| {
        let mut msg = a.create_label();
        a.lea(rsi, ptr(msg))?;
        a.mov(ecx, 3u32)?;
        a.mov(dx, 0x80u32)?;
        a.rep().outsb()?; // three 1-byte writes, possibly in one exit
        a.mov(rdi, DATA_ADDR)?;
        a.mov(ecx, 2u32)?;
        a.mov(dx, 0x60u32)?;
        a.rep().insw()?; // two 2-byte reads into memory
        a.mov(eax, dword_ptr(DATA_ADDR))?;
        a.out(0x81, eax)?; // report what landed in memory
        a.hlt()?;
        a.set_label(&mut msg)?;
        a.db(b"abc")
    })
    .unwrap();
    let io = Counter::default();
    let mut stats = ExitStats::default();
    let out = run_until_exit(&mut g.vcpu, &io, &StopHandle::new(), &mut stats).unwrap();
    assert_eq!(out, RunOutcome::Exit(Exit::Hlt));
    let expected: Vec<(u16, Vec<u8>)> = vec![
        (0x80, b"a".to_vec()),
        (0x80, b"b".to_vec()),
        (0x80, b"c".to_vec()),
        (0x81, vec![1, 2, 3, 4]),
    ];
    assert_eq!(*io.log.0.borrow(), expected);
    println!(
        "string I/O exits: {}",
        stats.get(ExitKind::PioWrite) + stats.get(ExitKind::PioRead)
    );
}
