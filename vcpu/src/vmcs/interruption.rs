//! Interruption-information format shared by the VM-entry interruption-information field
//! (SDM vol. 3C §25.8.3, table 25-17), the VM-exit interruption information and the
//! IDT-vectoring information fields (§25.9.2–25.9.3).
//!
//! | bits  | meaning |
//! |-------|---------|
//! | 7:0   | vector |
//! | 10:8  | interruption type |
//! | 11    | deliver error code |
//! | 30:12 | reserved |
//! | 31    | valid |

use serde::{Deserialize, Serialize};

/// Bit 31: the field is valid.
pub const INTR_INFO_VALID: u32 = 1 << 31;
/// Bit 11: deliver an error code.
pub const INTR_INFO_DELIVER_CODE: u32 = 1 << 11;
/// Bits 30:12: reserved.
pub const INTR_INFO_RESERVED: u32 = 0x7fff_f000;

/// Interruption type (bits 10:8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum InterruptionType {
    /// 0: external interrupt.
    ExternalInterrupt = 0,
    /// 1: reserved.
    Reserved = 1,
    /// 2: non-maskable interrupt.
    Nmi = 2,
    /// 3: hardware exception (#DE, #GP, #PF …).
    HardwareException = 3,
    /// 4: software interrupt (`INT n`).
    SoftwareInterrupt = 4,
    /// 5: privileged software exception (`INT1`).
    PrivilegedSoftwareException = 5,
    /// 6: software exception (`INT3`, `INTO`).
    SoftwareException = 6,
    /// 7: other event (MTF).
    OtherEvent = 7,
}

impl InterruptionType {
    /// From bits 10:8 (only the low 3 bits of `v` are used).
    pub const fn from_bits(v: u32) -> Self {
        match v & 7 {
            0 => Self::ExternalInterrupt,
            1 => Self::Reserved,
            2 => Self::Nmi,
            3 => Self::HardwareException,
            4 => Self::SoftwareInterrupt,
            5 => Self::PrivilegedSoftwareException,
            6 => Self::SoftwareException,
            _ => Self::OtherEvent,
        }
    }

    /// Events whose delivery pushes RIP + instruction length (types 4, 5, 6).
    pub const fn is_software(self) -> bool {
        matches!(
            self,
            Self::SoftwareInterrupt | Self::PrivilegedSoftwareException | Self::SoftwareException
        )
    }
}

/// Exceptions that push an error code (SDM vol. 3A table 6-1): #DF, #TS, #NP, #SS, #GP, #PF,
/// #AC, #CP.
pub const fn exception_has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21)
}

/// A decoded, valid interruption-information value.
///
/// ```
/// use vmkit_vcpu::vmcs::{InterruptionInfo, InterruptionType};
/// let gp = InterruptionInfo::hardware_exception(13); // #GP delivers an error code
/// assert_eq!(gp.to_raw(), 0x8000_0b0d);
/// assert_eq!(InterruptionInfo::from_raw(0x8000_0b0d), Some(gp));
/// assert_eq!(InterruptionInfo::external_interrupt(0x20).to_raw(), 0x8000_0020);
/// assert_eq!(InterruptionInfo::from_raw(0x20), None); // valid bit clear
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InterruptionInfo {
    /// Vector (bits 7:0).
    pub vector: u8,
    /// Type (bits 10:8).
    pub kind: InterruptionType,
    /// Deliver error code (bit 11).
    pub deliver_error_code: bool,
    /// Reserved bits 30:12 as found (0 in anything this crate builds).
    pub reserved: u32,
}

impl InterruptionInfo {
    /// External interrupt `vector`.
    pub const fn external_interrupt(vector: u8) -> Self {
        Self::new(vector, InterruptionType::ExternalInterrupt, false)
    }
    /// NMI (vector 2).
    pub const fn nmi() -> Self {
        Self::new(2, InterruptionType::Nmi, false)
    }
    /// Hardware exception `vector`, delivering an error code if the exception has one.
    pub const fn hardware_exception(vector: u8) -> Self {
        Self::new(
            vector,
            InterruptionType::HardwareException,
            exception_has_error_code(vector),
        )
    }
    /// Software interrupt `INT vector`.
    pub const fn software_interrupt(vector: u8) -> Self {
        Self::new(vector, InterruptionType::SoftwareInterrupt, false)
    }

    /// Any combination (no validity checks: see
    /// [`check_guest_state`](super::checks::check_guest_state)).
    pub const fn new(vector: u8, kind: InterruptionType, deliver_error_code: bool) -> Self {
        Self {
            vector,
            kind,
            deliver_error_code,
            reserved: 0,
        }
    }

    /// Decode; `None` when the valid bit (31) is clear.
    pub const fn from_raw(v: u32) -> Option<Self> {
        if v & INTR_INFO_VALID == 0 {
            return None;
        }
        Some(Self {
            vector: v as u8,
            kind: InterruptionType::from_bits(v >> 8),
            deliver_error_code: v & INTR_INFO_DELIVER_CODE != 0,
            reserved: (v & INTR_INFO_RESERVED) >> 12,
        })
    }

    /// Encode, with the valid bit set.
    pub const fn to_raw(self) -> u32 {
        INTR_INFO_VALID
            | self.vector as u32
            | ((self.kind as u32) << 8)
            | if self.deliver_error_code {
                INTR_INFO_DELIVER_CODE
            } else {
                0
            }
            | ((self.reserved << 12) & INTR_INFO_RESERVED)
    }
}
