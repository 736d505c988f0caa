//! Controlling a running vCPU from outside: pause/resume, kicks and register reads through the
//! vCPU's [`VcpuHandle`] (see [`crate::handle`]), a per-vCPU CPU-time budget ([`ExecutionCap`]) enforced from
//! the vCPU thread's CPU time, and pending-interrupt delivery — all in [`run_controlled`], a run
//! loop that adds these to [`run_until_exit`](crate::run_until_exit)'s dispatch.
//!
//! ```no_run
//! use std::time::Duration;
//! use vmkit_vcpu::control::{ExecutionCap, RunControl, run_controlled};
//! use vmkit_vcpu::{ExitStats, StopHandle};
//! # fn demo(vcpu: &mut vmkit_vcpu::KvmVcpu, io: &dyn vmkit_vcpu::IoHandler) -> Result<(), vmkit_vcpu::Error> {
//! let mut ctl = RunControl::new()?.with_cap(ExecutionCap::new(0.25, Duration::from_millis(20)));
//! let pauser = vcpu.handle()?; // Send + Clone: pause()/resume()/kick() from any thread
//! let mut stats = ExitStats::default();
//! let outcome = run_controlled(vcpu, io, &StopHandle::new(), &mut stats, &mut ctl)?;
//! # let _ = (outcome, pauser); Ok(()) }
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::events::InterruptQueue;
pub use crate::handle::{KICK_SIGNAL_OFFSET, VcpuHandle, kick_signal};
use crate::{
    Error, Exit, ExitStats, IoHandler, KvmVcpu, RunOutcome, StopHandle, VcpuInterruptWindow,
    VcpuRun, dispatch_io,
};

/// A vCPU that hands out a [`VcpuHandle`] (its kick, pause and register-read gate).
pub trait VcpuKick {
    /// The vCPU's handle.
    ///
    /// # Errors
    /// Installing the kick signal handler fails.
    fn handle(&self) -> Result<VcpuHandle, Error>;
}

impl VcpuKick for KvmVcpu {
    fn handle(&self) -> Result<VcpuHandle, Error> {
        KvmVcpu::handle(self)
    }
}

/// A CPU-time budget: at most `fraction` of one core, measured over windows of `period` from
/// the vCPU thread's CPU time (CLOCK_THREAD_CPUTIME_ID), which includes guest time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExecutionCap {
    /// Fraction of one core (0 < fraction ≤ 1).
    pub fraction: f64,
    /// Accounting window; the vCPU is also kicked every `period / 4` so a guest that never
    /// exits is still throttled.
    pub period: Duration,
}

impl ExecutionCap {
    /// `fraction` of a core (clamped to 0.001‥1) over `period` (at least 1 ms).
    pub fn new(fraction: f64, period: Duration) -> Self {
        Self {
            fraction: fraction.clamp(0.001, 1.0),
            period: period.max(Duration::from_millis(1)),
        }
    }
}

/// CPU time of the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

struct CapState {
    cap: ExecutionCap,
    wall0: Instant,
    cpu0: Duration,
    throttled: Duration,
}

impl CapState {
    fn throttle(&mut self) {
        let elapsed = self.wall0.elapsed();
        let used = thread_cpu_time().saturating_sub(self.cpu0);
        let allowed = elapsed.mul_f64(self.cap.fraction);
        if used > allowed {
            let wait = used.div_f64(self.cap.fraction).saturating_sub(elapsed);
            self.throttled += wait;
            std::thread::sleep(wait);
        }
        if self.wall0.elapsed() >= self.cap.period {
            self.wall0 = Instant::now();
            self.cpu0 = thread_cpu_time();
        }
    }
}

/// Inputs of [`run_controlled`]: optional CPU cap, optional interrupt queue. Pause, resume and
/// kicks go through the vCPU's own [`VcpuHandle`] ([`KvmVcpu::handle`]).
pub struct RunControl {
    /// The running vCPU's handle, for the cap's ticker.
    target: Arc<Mutex<Option<VcpuHandle>>>,
    shutdown: Arc<AtomicBool>,
    cap: Option<CapState>,
    irqs: Option<InterruptQueue>,
    ticker: Option<JoinHandle<()>>,
}

impl RunControl {
    /// No cap, no interrupt queue.
    ///
    /// # Errors
    /// Installing the kick signal's no-op handler (process-wide) fails.
    pub fn new() -> Result<Self, Error> {
        crate::handle::install_kick_handler()?;
        Ok(Self {
            target: Arc::default(),
            shutdown: Arc::default(),
            cap: None,
            irqs: None,
            ticker: None,
        })
    }

    /// Enforce `cap`.
    pub fn with_cap(mut self, cap: ExecutionCap) -> Self {
        self.cap = Some(CapState {
            cap,
            wall0: Instant::now(),
            cpu0: Duration::ZERO,
            throttled: Duration::ZERO,
        });
        let target = self.target.clone();
        let shutdown = self.shutdown.clone();
        let tick = cap.period / 4;
        self.ticker = Some(std::thread::spawn(move || {
            while !shutdown.load(Ordering::Acquire) {
                std::thread::park_timeout(tick);
                if let Some(h) = target.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    h.kick();
                }
            }
        }));
        self
    }

    /// Deliver external interrupts from `irqs` through interrupt windows.
    pub fn with_interrupts(mut self, irqs: InterruptQueue) -> Self {
        self.irqs = Some(irqs);
        self
    }

    /// Total time the cap made the vCPU sleep.
    pub fn throttled(&self) -> Duration {
        self.cap.as_ref().map_or(Duration::ZERO, |c| c.throttled)
    }
}

impl Drop for RunControl {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::Release);
        if let Some(t) = self.ticker.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Gives the cap's ticker the vCPU's handle for the lifetime of the guard.
struct Attached<'a>(&'a Mutex<Option<VcpuHandle>>);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Like [`run_until_exit`](crate::run_until_exit), plus: enforce the CPU cap, deliver queued
/// interrupts through interrupt windows, and resume transparently after kicks
/// (`Exit::Interrupted`) and interrupt-window exits. Returns on a stop request or any other
/// non-I/O exit. A paused vCPU parks inside its own `run` (see [`VcpuHandle`]), under this
/// loop as under any other.
///
/// # Errors
/// The vCPU backend fails, or installing the kick handler does.
pub fn run_controlled<V, H>(
    vcpu: &mut V,
    io: &H,
    stop: &StopHandle,
    stats: &mut ExitStats,
    ctl: &mut RunControl,
) -> Result<RunOutcome, Error>
where
    V: VcpuRun + VcpuInterruptWindow + VcpuKick + ?Sized,
    H: IoHandler + ?Sized,
{
    if ctl.cap.is_some() {
        *ctl.target.lock().unwrap_or_else(|e| e.into_inner()) = Some(vcpu.handle()?);
    }
    let _attached = Attached(&ctl.target);
    if let Some(c) = ctl.cap.as_mut() {
        c.wall0 = Instant::now();
        c.cpu0 = thread_cpu_time();
    }
    loop {
        if let Some(status) = stop.requested() {
            return Ok(RunOutcome::Stopped(status));
        }
        if let Some(c) = ctl.cap.as_mut() {
            c.throttle();
        }
        if let Some(q) = ctl.irqs.as_ref() {
            q.before_entry(vcpu)?;
        }
        let exit = vcpu.run()?;
        stats.record(exit.kind());
        match dispatch_io(exit, io) {
            None | Some(Exit::Interrupted) => {}
            Some(Exit::IrqWindowOpen) if ctl.irqs.is_some() => {}
            Some(e) => return Ok(RunOutcome::Exit(e)),
        }
    }
}
