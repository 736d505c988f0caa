//! The run loop: guest I/O goes to an [`IoHandler`]; everything else comes back as data.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Exit, ExitStats, VcpuExit, VcpuRun};

/// Where the run loop sends guest port and MMIO accesses — in a VMM, its PIO and MMIO buses.
///
/// Handlers must not panic on any guest input: unclaimed reads should return all-ones.
pub trait IoHandler {
    /// `in` from `port`: fill `data`.
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// `out` to `port`.
    fn pio_write(&self, port: u16, data: &[u8]);
    /// MMIO load at `addr`: fill `data`.
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// MMIO store at `addr`.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

impl<T: IoHandler + ?Sized> IoHandler for &T {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        (**self).pio_read(port, data)
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        (**self).pio_write(port, data)
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        (**self).mmio_read(addr, data)
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) {
        (**self).mmio_write(addr, data)
    }
}

const STOP_BIT: u64 = 1 << 63;

/// A shared "stop the VM with this status" request, cloned into devices (a debug-exit port) and
/// other threads. The run loop checks it before every entry: one relaxed atomic load.
///
/// ```
/// use vmkit_vcpu::StopHandle;
/// let stop = StopHandle::new();
/// let device_side = stop.clone();
/// assert_eq!(stop.requested(), None);
/// device_side.request(3);
/// assert_eq!(stop.requested(), Some(3));
/// ```
#[derive(Clone, Debug, Default)]
pub struct StopHandle(Arc<AtomicU64>);

impl StopHandle {
    /// A handle with no stop requested.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ask the run loop to stop with `status`. The first request wins.
    pub fn request(&self, status: u32) {
        let _ = self.0.compare_exchange(
            0,
            STOP_BIT | status as u64,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The requested status, if a stop was requested.
    #[inline]
    pub fn requested(&self) -> Option<u32> {
        let v = self.0.load(Ordering::Acquire);
        (v & STOP_BIT != 0).then_some(v as u32)
    }

    /// Forget a previous request (e.g. before re-running a VM).
    pub fn clear(&self) {
        self.0.store(0, Ordering::Release);
    }
}

/// Why [`run_until_exit`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// A [`StopHandle`] request, with its status.
    Stopped(u32),
    /// An exit the loop does not handle; the caller decides (resume by calling the loop again).
    Exit(Exit),
}

/// Run `vcpu`, dispatching PIO/MMIO exits to `io`, until a stop is requested or a non-I/O exit
/// occurs. Every exit is counted in `stats`.
pub fn run_until_exit<V, H>(
    vcpu: &mut V,
    io: &H,
    stop: &StopHandle,
    stats: &mut ExitStats,
) -> Result<RunOutcome, Error>
where
    V: VcpuRun + ?Sized,
    H: IoHandler + ?Sized,
{
    loop {
        if let Some(status) = stop.requested() {
            return Ok(RunOutcome::Stopped(status));
        }
        let exit = vcpu.run()?;
        stats.record(exit.kind());
        if let Some(e) = dispatch_io(exit, io) {
            return Ok(RunOutcome::Exit(e));
        }
    }
}

/// Complete an I/O exit through `io` (string I/O one element at a time) and return `None`, or
/// return the non-I/O exit untouched. The one place both run loops dispatch guest I/O.
#[inline]
pub fn dispatch_io<H: IoHandler + ?Sized>(exit: VcpuExit<'_>, io: &H) -> Option<Exit> {
    match exit {
        VcpuExit::PioRead { port, size, data } => {
            for access in data.chunks_mut(usize::from(size.max(1))) {
                io.pio_read(port, access);
            }
        }
        VcpuExit::PioWrite { port, size, data } => {
            for access in data.chunks(usize::from(size.max(1))) {
                io.pio_write(port, access);
            }
        }
        VcpuExit::MmioRead { addr, data } => io.mmio_read(addr, data),
        VcpuExit::MmioWrite { addr, data } => io.mmio_write(addr, data),
        VcpuExit::Other(e) => return Some(e),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExitKind;
    use std::cell::RefCell;

    /// A scripted vCPU: replays synthetic exits.
    struct Script {
        exits: Vec<ScriptExit>,
        buf: [u8; 8],
    }

    #[derive(Clone)]
    enum ScriptExit {
        In(u16, usize),
        Out(u16, Vec<u8>),
        /// `rep outs`: (port, element size, all bytes).
        OutString(u16, u8, Vec<u8>),
        /// `rep ins`: (port, element size, total bytes).
        InString(u16, u8, usize),
        MmioIn(u64, usize),
        Other(Exit),
    }

    impl VcpuRun for Script {
        fn run(&mut self) -> Result<VcpuExit<'_>, Error> {
            let e = self.exits.remove(0);
            Ok(match e {
                ScriptExit::In(port, n) => VcpuExit::PioRead {
                    port,
                    size: n as u8,
                    data: &mut self.buf[..n],
                },
                ScriptExit::Out(port, d) => {
                    self.buf[..d.len()].copy_from_slice(&d);
                    VcpuExit::PioWrite {
                        port,
                        size: d.len() as u8,
                        data: &self.buf[..d.len()],
                    }
                }
                ScriptExit::OutString(port, size, d) => {
                    self.buf[..d.len()].copy_from_slice(&d);
                    VcpuExit::PioWrite {
                        port,
                        size,
                        data: &self.buf[..d.len()],
                    }
                }
                ScriptExit::InString(port, size, n) => VcpuExit::PioRead {
                    port,
                    size,
                    data: &mut self.buf[..n],
                },
                ScriptExit::MmioIn(addr, n) => VcpuExit::MmioRead {
                    addr,
                    data: &mut self.buf[..n],
                },
                ScriptExit::Other(e) => VcpuExit::Other(e),
            })
        }
    }

    #[derive(Default)]
    struct Recorder {
        log: RefCell<Vec<String>>,
        stop: StopHandle,
    }

    impl IoHandler for Recorder {
        fn pio_read(&self, port: u16, data: &mut [u8]) {
            data.fill(0x42);
            self.log
                .borrow_mut()
                .push(format!("in {port:#x} {}", data.len()));
        }
        fn pio_write(&self, port: u16, data: &[u8]) {
            self.log
                .borrow_mut()
                .push(format!("out {port:#x} {data:?}"));
            if port == 0xf4 {
                self.stop.request(data[0] as u32);
            }
        }
        fn mmio_read(&self, addr: u64, data: &mut [u8]) {
            data.fill(0xff);
            self.log.borrow_mut().push(format!("mmio-in {addr:#x}"));
        }
        fn mmio_write(&self, _: u64, _: &[u8]) {}
    }

    #[test]
    fn dispatches_io_and_returns_other_exits() {
        let mut v = Script {
            exits: vec![
                ScriptExit::Out(0x3f8, vec![b'h']),
                ScriptExit::In(0x3fd, 1),
                ScriptExit::MmioIn(0xd000_0000, 4),
                ScriptExit::Other(Exit::Hlt),
            ],
            buf: [0; 8],
        };
        let io = Recorder::default();
        let mut stats = ExitStats::default();
        let out = run_until_exit(&mut v, &io, &StopHandle::new(), &mut stats).unwrap();
        assert_eq!(out, RunOutcome::Exit(Exit::Hlt));
        assert_eq!(
            *io.log.borrow(),
            ["out 0x3f8 [104]", "in 0x3fd 1", "mmio-in 0xd0000000"]
        );
        assert_eq!(stats.get(ExitKind::PioWrite), 1);
        assert_eq!(stats.get(ExitKind::PioRead), 1);
        assert_eq!(stats.get(ExitKind::MmioRead), 1);
        assert_eq!(stats.get(ExitKind::Hlt), 1);
    }

    #[test]
    fn string_io_is_dispatched_one_element_at_a_time() {
        let mut v = Script {
            exits: vec![
                ScriptExit::OutString(0x80, 1, b"abc".to_vec()),
                ScriptExit::OutString(0x80, 2, vec![1, 2, 3, 4]),
                ScriptExit::InString(0x60, 4, 8),
                ScriptExit::Other(Exit::Hlt),
            ],
            buf: [0; 8],
        };
        let io = Recorder::default();
        let mut stats = ExitStats::default();
        run_until_exit(&mut v, &io, &StopHandle::new(), &mut stats).unwrap();
        assert_eq!(
            *io.log.borrow(),
            [
                "out 0x80 [97]",
                "out 0x80 [98]",
                "out 0x80 [99]",
                "out 0x80 [1, 2]",
                "out 0x80 [3, 4]",
                "in 0x60 4",
                "in 0x60 4"
            ]
        );
        // Still one exit each: the split is the handler's view, not KVM's.
        assert_eq!(stats.get(ExitKind::PioWrite), 2);
        assert_eq!(v.buf, [0x42; 8]);
    }

    #[test]
    fn stop_request_from_a_device_ends_the_loop() {
        let mut v = Script {
            exits: vec![ScriptExit::Out(0xf4, vec![7]), ScriptExit::Other(Exit::Hlt)],
            buf: [0; 8],
        };
        let io = Recorder::default();
        let mut stats = ExitStats::default();
        let out = run_until_exit(&mut v, &io, &io.stop.clone(), &mut stats).unwrap();
        assert_eq!(out, RunOutcome::Stopped(7));
        assert_eq!(stats.total(), 1);
        // First request wins.
        io.stop.request(9);
        assert_eq!(io.stop.requested(), Some(7));
    }
}
