//! Fuzz the userspace IOAPIC: guest MMIO (IOREGSEL/IOWIN/EOI at any offset and width), line
//! changes and EOIs in any order, delivering into a recording sink.
//!
//! Invariants: nothing panics; every delivered message decodes (reserved delivery modes are
//! never sent); one message per counted delivery; remote IRR is only ever set on level entries.

use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use vmkit_devices::MutBusDevice;
use vmkit_devices::ioapic::{IOAPIC_MMIO_SIZE, IOAPIC_NUM_PINS, Ioapic, redir};
use vmkit_devices::msi::RecordingMsiSink;

/// One thing the guest or a device does.
#[derive(Arbitrary, Debug)]
pub enum Op {
    /// A guest MMIO load.
    Read {
        /// Offset in the 4 KiB window.
        offset: u16,
        /// Width (taken modulo 9).
        len: u8,
    },
    /// A guest MMIO store.
    Write {
        /// Offset in the 4 KiB window.
        offset: u16,
        /// Bytes (at most 8 used).
        data: Vec<u8>,
    },
    /// A device drives a line (any pin number).
    Line {
        /// Pin.
        pin: u8,
        /// Level.
        asserted: bool,
    },
    /// A local APIC EOI exit.
    Eoi {
        /// Vector.
        vector: u8,
    },
}

/// Run one input.
pub fn run(data: &[u8]) {
    let Ok(ops) = Unstructured::new(data).arbitrary::<Vec<Op>>() else {
        return;
    };
    let sink = Arc::new(RecordingMsiSink::default());
    let mut io = Ioapic::new(sink.clone());
    for op in ops {
        match op {
            Op::Read { offset, len } => {
                let mut buf = vec![0u8; (len % 9) as usize];
                io.read(offset as u64 % IOAPIC_MMIO_SIZE, &mut buf);
            }
            Op::Write { offset, mut data } => {
                data.truncate(8);
                io.write(offset as u64 % IOAPIC_MMIO_SIZE, &data);
            }
            Op::Line { pin, asserted } => io.set_irq(pin, asserted),
            Op::Eoi { vector } => io.end_of_interrupt(vector),
        }
        for p in 0..IOAPIC_NUM_PINS as u8 {
            let e = io.entry(p).unwrap_or(0);
            assert!(
                e & redir::REMOTE_IRR == 0 || e & redir::TRIGGER_MODE != 0,
                "remote IRR on an edge pin: {e:#x}"
            );
        }
    }
    let sent = sink.sent();
    assert_eq!(sent.len() as u64, io.stats().delivered);
    for m in sent {
        assert!(m.fields().is_ok(), "undecodable message {m:?}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replay_corpus() {
        let seeds = crate::corpus("ioapic");
        assert!(!seeds.is_empty());
        for s in seeds {
            super::run(&s);
        }
    }
}
