//! One handle to a vCPU for other threads: kick it out of KVM_RUN, pause and resume it, and
//! read its registers — under any run loop ([`run_until_exit`](crate::run_until_exit),
//! [`run_controlled`](crate::control::run_controlled), the split-irqchip loop of
//! vmkit-devices, or the VMM's own), because the gate it works through is in
//! [`KvmVcpu::run`](crate::VcpuRun::run) itself.
//!
//! The protocol (as QEMU's `kvm_cpu_kick`): a kick sets `kvm_run.immediate_exit` and sends the
//! kick signal (a no-op handler) to the thread inside KVM_RUN, so KVM_RUN returns EINTR whether
//! the signal lands before entry or during it; a kick while the vCPU is outside KVM_RUN is kept
//! and makes the next run return [`Exit::Interrupted`](crate::Exit::Interrupted) at once. A
//! paused vCPU parks at its next entry until resumed.
//!
//! ```no_run
//! use std::time::Duration;
//! # fn demo(vcpu: &vmkit_vcpu::KvmVcpu) -> Result<(), vmkit_vcpu::Error> {
//! let handle = vcpu.handle()?; // Send + Sync + Clone
//! std::thread::spawn(move || {
//!     // A hung guest: where is it?
//!     let regs = handle.general_registers(Duration::from_secs(1))?;
//!     println!("rip {:#x}", regs.rip);
//!     handle.kick(); // make the run loop look at its stop request
//!     Ok::<(), vmkit_vcpu::Error>(())
//! });
//! # Ok(()) }
//! ```

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_sregs};
use libc::c_int;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

use crate::Error;
use crate::entry::GeneralRegisters;

mod ioctls {
    use kvm_bindings::{KVMIO, kvm_regs, kvm_sregs};
    use vmm_sys_util::ioctl_ior_nr;
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
}

/// The signal used to kick a vCPU thread out of KVM_RUN: `SIGRTMIN() + KICK_SIGNAL_OFFSET`.
pub const KICK_SIGNAL_OFFSET: c_int = 0;

/// The kick signal number.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn noop_handler(_: c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the kick signal's no-op handler (process-wide, once).
///
/// # Errors
/// [`Error::Os`] when `sigaction` fails.
pub fn install_kick_handler() -> Result<(), Error> {
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

#[derive(Default)]
struct GateState {
    /// The thread inside KVM_RUN (between `enter` and `leave`).
    running: Option<libc::pthread_t>,
    /// A kick that found the vCPU outside KVM_RUN, for its next entry.
    kick_pending: bool,
    paused: bool,
    parked: bool,
}

/// The vCPU side of [`VcpuHandle`]: the backend's `run` passes through
/// [`enter`](Self::enter) and [`leave`](Self::leave) around KVM_RUN.
pub(crate) struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
    /// The vCPU's `kvm_run.immediate_exit`; dereferenced only while `running` is set, i.e.
    /// while `KvmVcpu::run` holds `&mut` to the vCPU (so its kvm_run mapping is alive).
    immediate_exit: *mut u8,
    /// A duplicate of the vCPU fd for register reads from other threads (`None` for a gate
    /// with no KVM vCPU behind it).
    fd: Option<OwnedFd>,
}

// SAFETY: `immediate_exit` is only dereferenced under `state`'s mutex while `running` is set
// (see the field); the other fields are Send + Sync.
unsafe impl Send for Gate {}
// SAFETY: as for Send: all shared access to the pointer is serialised by the mutex.
unsafe impl Sync for Gate {}

/// What [`Gate::enter`] decided.
pub(crate) enum Entry {
    /// Enter KVM_RUN.
    Run,
    /// A kick is pending: report `Exit::Interrupted` without entering.
    Kicked,
}

impl Gate {
    pub(crate) fn new(immediate_exit: *mut u8, fd: Option<OwnedFd>) -> Self {
        Self {
            state: Mutex::default(),
            cv: Condvar::new(),
            immediate_exit,
            fd,
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before KVM_RUN, on the vCPU thread: park while paused, consume a pending kick, or
    /// register the thread as running (clearing a stale immediate_exit in the same critical
    /// section, so a kick after it sets the byte again and one before it is pending).
    pub(crate) fn enter(&self) -> Entry {
        let mut st = self.lock();
        while st.paused {
            st.parked = true;
            self.cv.notify_all();
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked = false;
        if std::mem::take(&mut st.kick_pending) {
            return Entry::Kicked;
        }
        // SAFETY: pthread_self has no preconditions.
        st.running = Some(unsafe { libc::pthread_self() });
        // SAFETY: called from `KvmVcpu::run`, which holds `&mut` to the vCPU whose kvm_run
        // holds this byte; KVM reads it at entry, an atomic byte store is the protocol.
        unsafe { AtomicU8::from_ptr(self.immediate_exit).store(0, Ordering::SeqCst) };
        Entry::Run
    }

    /// After KVM_RUN, on the vCPU thread.
    pub(crate) fn leave(&self) {
        let mut st = self.lock();
        st.running = None;
        // A kick raced with an exit of another kind: it is still reported, at the next entry
        // (`kick_pending` was not set, the byte was). Keep it as pending.
        // SAFETY: as in `enter`: still inside `KvmVcpu::run`.
        let ie = unsafe { AtomicU8::from_ptr(self.immediate_exit) };
        if ie.swap(0, Ordering::SeqCst) != 0 {
            st.kick_pending = true;
        }
        self.cv.notify_all();
    }

    /// KVM_RUN returned EINTR: the pending kick (if any) is what it reports.
    pub(crate) fn interrupted(&self) {
        self.lock().kick_pending = false;
    }

    fn kick_locked(&self, st: &mut GateState) {
        match st.running {
            Some(thread) => {
                // SAFETY: `running` is set, so the vCPU is inside `KvmVcpu::run` and its
                // kvm_run mapping is alive (see the field).
                unsafe { AtomicU8::from_ptr(self.immediate_exit).store(1, Ordering::SeqCst) };
                // SAFETY: `thread` is inside KvmVcpu::run (it clears `running` under this
                // mutex before returning), so it is alive; the kick signal has a no-op
                // handler (installed before any handle exists), so it only interrupts KVM_RUN.
                unsafe { libc::pthread_kill(thread, kick_signal()) };
            }
            None => st.kick_pending = true,
        }
    }
}

/// A thread-safe handle to a vCPU ([`KvmVcpu::handle`](crate::KvmVcpu::handle)): kick,
/// pause/resume, register reads. See the [module docs](self).
#[derive(Clone)]
pub struct VcpuHandle(pub(crate) Arc<Gate>);

impl VcpuHandle {
    /// A handle to no vCPU (for synthetic vCPUs in tests and benches): kicks and pauses are
    /// recorded, register reads fail.
    pub fn detached() -> Self {
        static mut NOWHERE: u8 = 0;
        // A gate that is never entered never dereferences the pointer.
        Self(Arc::new(Gate::new(&raw mut NOWHERE, None)))
    }

    /// Make the vCPU leave KVM_RUN now, or its next run return `Exit::Interrupted` at once if
    /// it is not inside KVM_RUN; the run loop then re-checks its inputs (a [`StopHandle`]
    /// request, raised interrupts).
    ///
    /// [`StopHandle`]: crate::StopHandle
    pub fn kick(&self) {
        let gate = &self.0;
        gate.kick_locked(&mut gate.lock());
    }

    /// Stop the vCPU: it leaves KVM_RUN (kicked) and parks at its next entry until
    /// [`resume`](Self::resume).
    pub fn pause(&self) {
        let gate = &self.0;
        let mut st = gate.lock();
        st.paused = true;
        if st.running.is_some() {
            gate.kick_locked(&mut st);
        }
    }

    /// Let a paused vCPU run again.
    pub fn resume(&self) {
        self.0.lock().paused = false;
        self.0.cv.notify_all();
    }

    /// Wait until the vCPU is paused and outside KVM_RUN (true) or `timeout` passes (false).
    pub fn wait_paused(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let gate = &self.0;
        let mut st = gate.lock();
        while !(st.paused && st.running.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = gate
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Is the vCPU paused and outside KVM_RUN?
    pub fn is_paused(&self) -> bool {
        let st = self.0.lock();
        st.paused && st.running.is_none()
    }

    /// Is the vCPU thread parked at its entry by a pause?
    pub fn is_parked(&self) -> bool {
        self.0.lock().parked
    }

    /// Pause the vCPU (waiting at most `timeout` for it to leave KVM_RUN), issue `request` on
    /// a duplicate of its fd, and resume it unless it was paused already (a pause another
    /// thread makes meanwhile is undone by that resume: pause explicitly around reads then).
    fn read_paused<T: Default>(&self, timeout: Duration, request: u64) -> Result<T, Error> {
        let was_paused = self.0.lock().paused;
        self.pause();
        let result = self.read_now(timeout, request);
        if !was_paused {
            self.resume();
        }
        result
    }

    fn read_now<T: Default>(&self, timeout: Duration, request: u64) -> Result<T, Error> {
        let fd = self.0.fd.as_ref().ok_or(Error::Os {
            op: "reading registers of a detached handle",
            source: std::io::ErrorKind::Unsupported.into(),
        })?;
        if !self.wait_paused(timeout) {
            return Err(Error::Os {
                op: "waiting for the vCPU to leave KVM_RUN",
                source: std::io::ErrorKind::TimedOut.into(),
            });
        }
        let mut out = T::default();
        // SAFETY: `fd` is a live vCPU fd; `request` is KVM_GET_REGS or KVM_GET_SREGS, whose
        // argument is the `T` (`kvm_regs` / `kvm_sregs`) passed by the typed callers below,
        // written by the kernel and no larger than `out`.
        let ret = unsafe { ioctl_with_mut_ref(fd, request as _, &mut out) };
        if ret < 0 {
            return Err(Error::Os {
                op: "reading vCPU registers from another thread",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(out)
    }

    /// The vCPU's general registers, read while it is paused (at most `timeout` to get it out
    /// of KVM_RUN); a running vCPU is resumed afterwards.
    ///
    /// # Errors
    /// [`Error::Os`]: the vCPU did not leave KVM_RUN in time, the ioctl failed, or the handle is
    /// [`detached`](Self::detached).
    pub fn general_registers(&self, timeout: Duration) -> Result<GeneralRegisters, Error> {
        let r: kvm_regs = self.read_paused(timeout, ioctls::KVM_GET_REGS() as u64)?;
        Ok(GeneralRegisters::from_kvm(&r))
    }

    /// The vCPU's special registers, read as [`general_registers`](Self::general_registers).
    ///
    /// # Errors
    /// As [`general_registers`](Self::general_registers).
    pub fn sregs(&self, timeout: Duration) -> Result<kvm_sregs, Error> {
        self.read_paused(timeout, ioctls::KVM_GET_SREGS() as u64)
    }
}

impl std::fmt::Debug for VcpuHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.0.lock();
        f.debug_struct("VcpuHandle")
            .field("fd", &self.0.fd.as_ref().map(|fd| fd.as_raw_fd()))
            .field("running", &st.running.is_some())
            .field("paused", &st.paused)
            .field("kick_pending", &st.kick_pending)
            .finish()
    }
}
