//! VMCS field encodings (Intel SDM vol. 3C §25.11.2 and appendix B).
//!
//! A field is named by a 32-bit encoding:
//!
//! | bits  | meaning |
//! |-------|---------|
//! | 0     | access type: 0 = full, 1 = high (upper 32 bits of a 64-bit field) |
//! | 9:1   | index |
//! | 11:10 | type: 0 = control, 1 = VM-exit information (read-only), 2 = guest state, 3 = host state |
//! | 12    | reserved (0) |
//! | 14:13 | width: 0 = 16-bit, 1 = 64-bit, 2 = 32-bit, 3 = natural width |
//! | 31:15 | reserved (0) |

use std::fmt;

use serde::{Deserialize, Serialize};

/// Width of a VMCS field (encoding bits 14:13).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FieldWidth {
    /// 16-bit field.
    Bits16,
    /// 64-bit field (accessible whole or as two 32-bit halves).
    Bits64,
    /// 32-bit field.
    Bits32,
    /// Natural width (64 bits on a processor supporting Intel 64).
    Natural,
}

impl FieldWidth {
    /// Largest value the field can hold.
    pub const fn max_value(self) -> u64 {
        match self {
            FieldWidth::Bits16 => u16::MAX as u64,
            FieldWidth::Bits32 => u32::MAX as u64,
            FieldWidth::Bits64 | FieldWidth::Natural => u64::MAX,
        }
    }
}

/// Type of a VMCS field (encoding bits 11:10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FieldType {
    /// VM-execution, VM-exit or VM-entry control.
    Control,
    /// VM-exit information (read-only for software).
    ExitInformation,
    /// Guest-state area.
    GuestState,
    /// Host-state area.
    HostState,
}

/// Bits of an encoding that must be zero (bit 12 and bits 31:15).
pub const VMCS_FIELD_RESERVED_MASK: u32 = 0xffff_8000 | (1 << 12);
/// Encoding bit 0: high access to a 64-bit field.
pub const VMCS_FIELD_ACCESS_HIGH: u32 = 1;

/// A VMCS field encoding. Constants for every field this model holds are associated items
/// (`VmcsField::GUEST_RIP` …), named as in the Linux/KVM `vmx.h` spelling of the SDM names.
///
/// ```
/// use vmkit_vcpu::vmcs::{FieldType, FieldWidth, VmcsField};
/// let f = VmcsField::GUEST_CS_AR_BYTES; // 0x4816
/// assert_eq!(f.width(), FieldWidth::Bits32);
/// assert_eq!(f.field_type(), FieldType::GuestState);
/// assert_eq!(f.index(), 11);
/// assert!(!f.is_high());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmcsField(pub u32);

impl VmcsField {
    /// The raw encoding.
    pub const fn encoding(self) -> u32 {
        self.0
    }

    /// Width from bits 14:13.
    pub const fn width(self) -> FieldWidth {
        match (self.0 >> 13) & 3 {
            0 => FieldWidth::Bits16,
            1 => FieldWidth::Bits64,
            2 => FieldWidth::Bits32,
            _ => FieldWidth::Natural,
        }
    }

    /// Type from bits 11:10.
    pub const fn field_type(self) -> FieldType {
        match (self.0 >> 10) & 3 {
            0 => FieldType::Control,
            1 => FieldType::ExitInformation,
            2 => FieldType::GuestState,
            _ => FieldType::HostState,
        }
    }

    /// Index from bits 9:1.
    pub const fn index(self) -> u32 {
        (self.0 >> 1) & 0x1ff
    }

    /// Access type bit 0: the high half of a 64-bit field.
    pub const fn is_high(self) -> bool {
        self.0 & VMCS_FIELD_ACCESS_HIGH != 0
    }

    /// True when bit 12 or bits 31:15 are set.
    pub const fn has_reserved_bits(self) -> bool {
        self.0 & VMCS_FIELD_RESERVED_MASK != 0
    }

    /// Read-only for software (VM-exit information fields).
    pub const fn is_read_only(self) -> bool {
        matches!(self.field_type(), FieldType::ExitInformation)
    }

    /// The SDM/`vmx.h` name, if this model knows the field (`None` for a high access or an
    /// unknown encoding).
    pub fn name(self) -> Option<&'static str> {
        super::KNOWN_FIELDS
            .iter()
            .find(|(f, _)| *f == self)
            .map(|(_, n)| *n)
    }

    /// Every field the model holds, in encoding order.
    pub fn all() -> impl Iterator<Item = VmcsField> {
        super::KNOWN_FIELDS.iter().map(|(f, _)| *f)
    }
}

impl fmt::Debug for VmcsField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}({:#06x})", self.0),
            None => write!(f, "VmcsField({:#x})", self.0),
        }
    }
}

impl fmt::Display for VmcsField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
