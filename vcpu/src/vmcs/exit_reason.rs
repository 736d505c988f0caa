//! Basic exit reasons (SDM vol. 3C appendix C) and exit-qualification decoders (§28.2.1).

use serde::{Deserialize, Serialize};

macro_rules! exit_reasons {
    ($( $(#[$doc:meta])* $name:ident = $n:literal, )*) => {
        /// Basic VM-exit reasons with their architectural numbers (SDM appendix C, table C-1).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[repr(u16)]
        pub enum ExitReason {
            $( $(#[$doc])* $name = $n, )*
        }

        impl ExitReason {
            /// Every defined reason, in numeric order.
            pub const ALL: &'static [ExitReason] = &[$(ExitReason::$name,)*];

            /// From a basic exit reason (exit-reason bits 15:0); `None` for undefined numbers.
            pub const fn from_basic(n: u16) -> Option<Self> {
                match n {
                    $($n => Some(ExitReason::$name),)*
                    _ => None,
                }
            }
        }
    };
}

exit_reasons! {
    /// Exception or non-maskable interrupt.
    ExceptionOrNmi = 0,
    /// External interrupt.
    ExternalInterrupt = 1,
    /// Triple fault.
    TripleFault = 2,
    /// INIT signal.
    InitSignal = 3,
    /// Start-up IPI.
    StartupIpi = 4,
    /// I/O system-management interrupt.
    IoSmi = 5,
    /// Other SMI.
    OtherSmi = 6,
    /// Interrupt window.
    InterruptWindow = 7,
    /// NMI window.
    NmiWindow = 8,
    /// Task switch.
    TaskSwitch = 9,
    /// CPUID.
    Cpuid = 10,
    /// GETSEC.
    Getsec = 11,
    /// HLT.
    Hlt = 12,
    /// INVD.
    Invd = 13,
    /// INVLPG.
    Invlpg = 14,
    /// RDPMC.
    Rdpmc = 15,
    /// RDTSC.
    Rdtsc = 16,
    /// RSM.
    Rsm = 17,
    /// VMCALL.
    Vmcall = 18,
    /// VMCLEAR.
    Vmclear = 19,
    /// VMLAUNCH.
    Vmlaunch = 20,
    /// VMPTRLD.
    Vmptrld = 21,
    /// VMPTRST.
    Vmptrst = 22,
    /// VMREAD.
    Vmread = 23,
    /// VMRESUME.
    Vmresume = 24,
    /// VMWRITE.
    Vmwrite = 25,
    /// VMXOFF.
    Vmxoff = 26,
    /// VMXON.
    Vmxon = 27,
    /// Control-register access.
    CrAccess = 28,
    /// MOV DR.
    MovDr = 29,
    /// I/O instruction.
    IoInstruction = 30,
    /// RDMSR.
    Rdmsr = 31,
    /// WRMSR.
    Wrmsr = 32,
    /// VM-entry failure due to invalid guest state.
    EntryFailureGuestState = 33,
    /// VM-entry failure due to MSR loading.
    EntryFailureMsrLoading = 34,
    /// MWAIT.
    Mwait = 36,
    /// Monitor trap flag.
    MonitorTrapFlag = 37,
    /// MONITOR.
    Monitor = 39,
    /// PAUSE.
    Pause = 40,
    /// VM-entry failure due to machine-check event.
    EntryFailureMachineCheck = 41,
    /// TPR below threshold.
    TprBelowThreshold = 43,
    /// APIC access.
    ApicAccess = 44,
    /// Virtualized EOI.
    VirtualizedEoi = 45,
    /// Access to GDTR or IDTR.
    GdtrIdtrAccess = 46,
    /// Access to LDTR or TR.
    LdtrTrAccess = 47,
    /// EPT violation.
    EptViolation = 48,
    /// EPT misconfiguration.
    EptMisconfiguration = 49,
    /// INVEPT.
    Invept = 50,
    /// RDTSCP.
    Rdtscp = 51,
    /// VMX-preemption timer expired.
    PreemptionTimerExpired = 52,
    /// INVVPID.
    Invvpid = 53,
    /// WBINVD or WBNOINVD.
    Wbinvd = 54,
    /// XSETBV.
    Xsetbv = 55,
    /// APIC write.
    ApicWrite = 56,
    /// RDRAND.
    Rdrand = 57,
    /// INVPCID.
    Invpcid = 58,
    /// VMFUNC.
    Vmfunc = 59,
    /// ENCLS.
    Encls = 60,
    /// RDSEED.
    Rdseed = 61,
    /// Page-modification log full.
    PmlFull = 62,
    /// XSAVES.
    Xsaves = 63,
    /// XRSTORS.
    Xrstors = 64,
    /// PCONFIG.
    Pconfig = 65,
    /// SPP-related event.
    SppEvent = 66,
    /// UMWAIT.
    Umwait = 67,
    /// TPAUSE.
    Tpause = 68,
    /// LOADIWKEY.
    Loadiwkey = 69,
    /// ENCLV.
    Enclv = 70,
    /// ENQCMD PASID translation failure.
    EnqcmdPasidFailure = 72,
    /// ENQCMDS PASID translation failure.
    EnqcmdsPasidFailure = 73,
    /// Bus lock.
    BusLock = 74,
    /// Instruction timeout.
    InstructionTimeout = 75,
    /// SEAMCALL.
    Seamcall = 76,
    /// TDCALL.
    Tdcall = 77,
}

/// Exit-reason bit 31: VM-entry failure.
pub const EXIT_REASON_ENTRY_FAILURE: u32 = 1 << 31;

impl ExitReason {
    /// The architectural number.
    pub const fn number(self) -> u16 {
        self as u16
    }
}

/// Direction of an I/O instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoDirection {
    /// OUT (bit 3 = 0).
    Out,
    /// IN (bit 3 = 1).
    In,
}

/// Exit qualification for I/O instructions (SDM table 28-5).
///
/// ```
/// use vmkit_vcpu::vmcs::exit_reason::{IoDirection, IoQualification};
/// // `in al, dx` with DX = 0x3f8: size 1, IN, DX operand, port in bits 31:16.
/// let q = IoQualification::decode(0x03f8_0008);
/// assert_eq!((q.size, q.direction, q.port), (1, IoDirection::In, 0x3f8));
/// assert!(!q.immediate && !q.string && !q.rep);
/// assert_eq!(q.encode(), 0x03f8_0008);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoQualification {
    /// Access size in bytes (bits 2:0 hold size − 1: 1, 2 or 4).
    pub size: u8,
    /// Bit 3.
    pub direction: IoDirection,
    /// Bit 4: string instruction.
    pub string: bool,
    /// Bit 5: REP prefixed.
    pub rep: bool,
    /// Bit 6: operand encoding (0 = DX, 1 = immediate).
    pub immediate: bool,
    /// Bits 31:16: port.
    pub port: u16,
}

impl IoQualification {
    /// Decode a qualification.
    pub const fn decode(q: u64) -> Self {
        Self {
            size: (q & 7) as u8 + 1,
            direction: if q & (1 << 3) != 0 {
                IoDirection::In
            } else {
                IoDirection::Out
            },
            string: q & (1 << 4) != 0,
            rep: q & (1 << 5) != 0,
            immediate: q & (1 << 6) != 0,
            port: (q >> 16) as u16,
        }
    }

    /// Encode.
    pub const fn encode(&self) -> u64 {
        (self.size.saturating_sub(1) as u64 & 7)
            | (matches!(self.direction, IoDirection::In) as u64) << 3
            | (self.string as u64) << 4
            | (self.rep as u64) << 5
            | (self.immediate as u64) << 6
            | (self.port as u64) << 16
    }
}

/// Access type of a control-register access (bits 5:4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CrAccessType {
    /// 0: MOV to CR.
    MovToCr,
    /// 1: MOV from CR.
    MovFromCr,
    /// 2: CLTS.
    Clts,
    /// 3: LMSW.
    Lmsw,
}

/// Exit qualification for control-register accesses (SDM table 28-3).
///
/// ```
/// use vmkit_vcpu::vmcs::exit_reason::{CrAccessQualification, CrAccessType};
/// // mov cr3, rax: CR 3, MOV to CR, register 0 (RAX).
/// let q = CrAccessQualification::decode(0x0003);
/// assert_eq!((q.cr, q.access, q.gpr), (3, CrAccessType::MovToCr, 0));
/// // mov rbx, cr4 → 0x314 (CR 4, MOV from CR, RBX = 3).
/// let q = CrAccessQualification::decode(0x314);
/// assert_eq!((q.cr, q.access, q.gpr), (4, CrAccessType::MovFromCr, 3));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrAccessQualification {
    /// Bits 3:0: control register number (0 for CLTS and LMSW).
    pub cr: u8,
    /// Bits 5:4.
    pub access: CrAccessType,
    /// Bit 6: LMSW operand type (false = register, true = memory).
    pub lmsw_memory: bool,
    /// Bits 11:8: general-purpose register for MOV CR (0 = RAX … 15 = R15).
    pub gpr: u8,
    /// Bits 31:16: LMSW source data.
    pub lmsw_source: u16,
}

impl CrAccessQualification {
    /// Decode a qualification.
    pub const fn decode(q: u64) -> Self {
        Self {
            cr: (q & 0xf) as u8,
            access: match (q >> 4) & 3 {
                0 => CrAccessType::MovToCr,
                1 => CrAccessType::MovFromCr,
                2 => CrAccessType::Clts,
                _ => CrAccessType::Lmsw,
            },
            lmsw_memory: q & (1 << 6) != 0,
            gpr: ((q >> 8) & 0xf) as u8,
            lmsw_source: (q >> 16) as u16,
        }
    }

    /// Encode.
    pub const fn encode(&self) -> u64 {
        (self.cr as u64 & 0xf)
            | (self.access as u64) << 4
            | (self.lmsw_memory as u64) << 6
            | (self.gpr as u64 & 0xf) << 8
            | (self.lmsw_source as u64) << 16
    }
}

const fn bit(q: u64, n: u32) -> bool {
    q & (1 << n) != 0
}

/// Exit qualification for EPT violations (SDM table 28-7).
///
/// ```
/// use vmkit_vcpu::vmcs::exit_reason::EptViolationQualification;
/// // A data write to a GPA mapped read-only, from a linear-address translation.
/// let q = EptViolationQualification::decode(0b1_1000_1010);
/// assert!(q.write && !q.read && !q.fetch);
/// assert!(q.readable && !q.writable && !q.executable);
/// assert!(q.linear_address_valid && q.translated_access);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EptViolationQualification {
    /// Bit 0: data read.
    pub read: bool,
    /// Bit 1: data write.
    pub write: bool,
    /// Bit 2: instruction fetch.
    pub fetch: bool,
    /// Bit 3: the GPA was readable.
    pub readable: bool,
    /// Bit 4: the GPA was writable.
    pub writable: bool,
    /// Bit 5: the GPA was executable (supervisor-mode executable with mode-based control).
    pub executable: bool,
    /// Bit 6: user-mode executable (mode-based execute control).
    pub user_executable: bool,
    /// Bit 7: the guest linear-address field is valid.
    pub linear_address_valid: bool,
    /// Bit 8 (if bit 7): the access was the translation of a linear address (true) rather than
    /// an access to a paging-structure entry (false).
    pub translated_access: bool,
    /// Bit 12: NMI unblocking due to IRET.
    pub nmi_unblocking: bool,
}

impl EptViolationQualification {
    /// Decode a qualification.
    pub const fn decode(q: u64) -> Self {
        Self {
            read: bit(q, 0),
            write: bit(q, 1),
            fetch: bit(q, 2),
            readable: bit(q, 3),
            writable: bit(q, 4),
            executable: bit(q, 5),
            user_executable: bit(q, 6),
            linear_address_valid: bit(q, 7),
            translated_access: bit(q, 8),
            nmi_unblocking: bit(q, 12),
        }
    }

    /// Encode.
    pub const fn encode(&self) -> u64 {
        (self.read as u64)
            | (self.write as u64) << 1
            | (self.fetch as u64) << 2
            | (self.readable as u64) << 3
            | (self.writable as u64) << 4
            | (self.executable as u64) << 5
            | (self.user_executable as u64) << 6
            | (self.linear_address_valid as u64) << 7
            | (self.translated_access as u64) << 8
            | (self.nmi_unblocking as u64) << 12
    }
}
