//! Controlling a running vCPU from outside: pause/resume and kicks (KVM `immediate_exit` plus a
//! signal that interrupts KVM_RUN), a per-vCPU CPU-time budget ([`ExecutionCap`]) enforced from
//! the vCPU thread's CPU time, and pending-interrupt delivery — all in [`run_controlled`], a run
//! loop that adds these to [`run_until_exit`](crate::run_until_exit)'s dispatch.
//!
//! ```no_run
//! use std::time::Duration;
//! use vmkit_vcpu::control::{ExecutionCap, RunControl, run_controlled};
//! use vmkit_vcpu::{ExitStats, StopHandle};
//! # fn demo(vcpu: &mut vmkit_vcpu::KvmVcpu, io: &dyn vmkit_vcpu::IoHandler) -> Result<(), vmkit_vcpu::Error> {
//! let mut ctl = RunControl::new()?.with_cap(ExecutionCap::new(0.25, Duration::from_millis(20)));
//! let pauser = ctl.handle(); // Send + Clone: pause()/resume()/kick() from any thread
//! let mut stats = ExitStats::default();
//! let outcome = run_controlled(vcpu, io, &StopHandle::new(), &mut stats, &mut ctl)?;
//! # let _ = (outcome, pauser); Ok(()) }
//! ```

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use libc::c_int;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::events::InterruptQueue;
use crate::{
    Error, Exit, ExitStats, IoHandler, KvmVcpu, RunOutcome, StopHandle, VcpuInterruptWindow,
    VcpuRun, dispatch_io,
};

/// The signal used to kick a vCPU thread out of KVM_RUN: `SIGRTMIN() + KICK_SIGNAL_OFFSET`.
pub const KICK_SIGNAL_OFFSET: c_int = 0;

/// The kick signal number.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn noop_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), Error> {
    static ONCE: Once = Once::new();
    static RESULT: AtomicI32 = AtomicI32::new(0);
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), noop_handler) {
            RESULT.store(e.errno(), Ordering::Release);
        }
    });
    match RESULT.load(Ordering::Acquire) {
        0 => Ok(()),
        errno => Err(Error::Os {
            op: "installing the kick signal handler",
            source: std::io::Error::from_raw_os_error(errno),
        }),
    }
}

/// Where a kick lands: the vCPU thread and its `kvm_run.immediate_exit` byte.
pub trait VcpuKick {
    /// Pointer to the vCPU's `immediate_exit` byte, valid while the vCPU lives.
    fn immediate_exit_ptr(&mut self) -> *mut u8;
}

impl VcpuKick for KvmVcpu {
    fn immediate_exit_ptr(&mut self) -> *mut u8 {
        &mut self.fd_mut().get_kvm_run().immediate_exit
    }
}

#[derive(Clone, Copy)]
struct Target {
    thread: libc::pthread_t,
    immediate_exit: *mut u8,
}

#[derive(Default)]
struct State {
    target: Option<Target>,
    parked: bool,
}

// SAFETY: `immediate_exit` points into a vCPU's kvm_run mapping and is only dereferenced while
// the target is attached, i.e. while `run_controlled` holds `&mut` to that vCPU; detaching
// happens under the same mutex before `run_controlled` returns.
unsafe impl Send for State {}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    cv: Condvar,
    paused: AtomicBool,
    shutdown: AtomicBool,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Set immediate_exit (optionally) and signal the attached thread.
    fn kick_locked(st: &State, immediate: bool) {
        if let Some(t) = st.target {
            if immediate {
                // SAFETY: the target is attached (see `unsafe impl Send for State`), so the
                // pointer is live; KVM reads this byte at KVM_RUN entry, an atomic byte store
                // is the intended cross-thread protocol (as in QEMU's kvm_cpu_kick).
                unsafe { AtomicU8::from_ptr(t.immediate_exit).store(1, Ordering::SeqCst) };
            }
            // SAFETY: `t.thread` is the live vCPU thread while attached; the kick signal has
            // a no-op handler installed, so delivery only interrupts a blocking ioctl.
            unsafe { libc::pthread_kill(t.thread, kick_signal()) };
        }
    }
}

/// A thread-safe handle to a vCPU running under [`run_controlled`].
#[derive(Clone)]
pub struct VcpuHandle(Arc<Shared>);

impl VcpuHandle {
    /// Stop the vCPU at its next exit (kicked out of KVM_RUN at once) until [`resume`](Self::resume).
    pub fn pause(&self) {
        let st = self.0.lock();
        self.0.paused.store(true, Ordering::SeqCst);
        Shared::kick_locked(&st, true);
    }

    /// Let a paused vCPU run again.
    pub fn resume(&self) {
        let _st = self.0.lock();
        self.0.paused.store(false, Ordering::SeqCst);
        self.0.cv.notify_all();
    }

    /// Wait until the vCPU is parked by a pause (true) or `timeout` passes (false).
    pub fn wait_paused(&self, timeout: Duration) -> bool {
        let st = self.0.lock();
        let (st, _) = self
            .0
            .cv
            .wait_timeout_while(st, timeout, |s| !s.parked)
            .unwrap_or_else(|e| e.into_inner());
        st.parked
    }

    /// Is the vCPU parked?
    pub fn is_paused(&self) -> bool {
        self.0.lock().parked
    }

    /// Make the vCPU leave KVM_RUN now (e.g. after a [`StopHandle`] request or a raised
    /// interrupt); the run loop then re-checks its inputs.
    pub fn kick(&self) {
        Shared::kick_locked(&self.0.lock(), true);
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

/// Inputs of [`run_controlled`]: pause/kick handle, optional CPU cap, optional interrupt queue.
pub struct RunControl {
    shared: Arc<Shared>,
    cap: Option<CapState>,
    irqs: Option<InterruptQueue>,
    ticker: Option<JoinHandle<()>>,
}

impl RunControl {
    /// No cap, no interrupt queue. Installs the kick signal's no-op handler (process-wide).
    pub fn new() -> Result<Self, Error> {
        install_kick_handler()?;
        Ok(Self {
            shared: Arc::default(),
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
        let shared = self.shared.clone();
        let tick = cap.period / 4;
        self.ticker = Some(std::thread::spawn(move || {
            while !shared.shutdown.load(Ordering::Acquire) {
                std::thread::park_timeout(tick);
                Shared::kick_locked(&shared.lock(), false);
            }
        }));
        self
    }

    /// Deliver external interrupts from `irqs` through interrupt windows.
    pub fn with_interrupts(mut self, irqs: InterruptQueue) -> Self {
        self.irqs = Some(irqs);
        self
    }

    /// A handle for other threads.
    pub fn handle(&self) -> VcpuHandle {
        VcpuHandle(self.shared.clone())
    }

    /// Total time the cap made the vCPU sleep.
    pub fn throttled(&self) -> Duration {
        self.cap.as_ref().map_or(Duration::ZERO, |c| c.throttled)
    }

    fn park_if_paused(&self, ie: *mut u8) {
        if !self.shared.paused.load(Ordering::Acquire) {
            return;
        }
        let mut st = self.shared.lock();
        st.parked = true;
        self.shared.cv.notify_all();
        while self.shared.paused.load(Ordering::Acquire) {
            st = self.shared.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked = false;
        // SAFETY: `ie` is the attached vCPU's immediate_exit byte (see `Attached`).
        unsafe { AtomicU8::from_ptr(ie).store(0, Ordering::SeqCst) };
    }
}

impl Drop for RunControl {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        if let Some(t) = self.ticker.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Registers the calling thread and vCPU as the kick target for the lifetime of the guard.
struct Attached<'a>(&'a Shared);

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.0.lock().target = None;
    }
}

/// Like [`run_until_exit`](crate::run_until_exit), plus: park while paused, enforce the CPU cap,
/// deliver queued interrupts through interrupt windows, and resume transparently after kicks
/// (`Exit::Interrupted`) and interrupt-window exits. Returns on a stop request or any other
/// non-I/O exit.
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
    let ie = vcpu.immediate_exit_ptr();
    {
        let mut st = ctl.shared.lock();
        st.target = Some(Target {
            // SAFETY: pthread_self has no preconditions.
            thread: unsafe { libc::pthread_self() },
            immediate_exit: ie,
        });
    }
    let _attached = Attached(&ctl.shared);
    if let Some(c) = ctl.cap.as_mut() {
        c.wall0 = Instant::now();
        c.cpu0 = thread_cpu_time();
    }
    loop {
        // A kick left immediate_exit set; clear it before looking at the inputs, so a pause
        // that lands after this store is still seen below.
        // SAFETY: `ie` points into `vcpu`'s kvm_run, borrowed for this whole call.
        unsafe { AtomicU8::from_ptr(ie).store(0, Ordering::SeqCst) };
        if let Some(status) = stop.requested() {
            return Ok(RunOutcome::Stopped(status));
        }
        ctl.park_if_paused(ie);
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
