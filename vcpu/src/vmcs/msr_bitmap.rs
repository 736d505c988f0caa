//! The MSR-bitmap page (SDM vol. 3C §25.6.9).
//!
//! Four 1-KiB bitmaps: reads of MSRs 0–0x1fff, reads of 0xc000_0000–0xc000_1fff, then writes of
//! the same two ranges. A set bit makes the access exit; MSRs outside both ranges always exit.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Size of the bitmap page.
pub const MSR_BITMAP_SIZE: usize = 4096;
/// First MSR of the low range.
pub const MSR_LOW_BASE: u32 = 0;
/// First MSR of the high range.
pub const MSR_HIGH_BASE: u32 = 0xc000_0000;
/// MSRs per range.
pub const MSR_RANGE_LEN: u32 = 0x2000;

/// Errors building an [`MsrBitmap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum MsrBitmapError {
    /// The page must be exactly 4096 bytes.
    #[error("MSR bitmap is {0} bytes, expected 4096")]
    WrongSize(usize),
    /// The MSR is outside both bitmap ranges (its accesses always exit).
    #[error("MSR {0:#x} is outside the MSR-bitmap ranges")]
    OutOfRange(u32),
}

/// The contents of an MSR-bitmap page.
///
/// ```
/// use vmkit_vcpu::vmcs::MsrBitmap;
/// let mut b = MsrBitmap::default(); // nothing exits
/// b.set_read_exiting(0xc000_0080, true).unwrap(); // EFER reads exit
/// assert!(b.read_exits(0xc000_0080));
/// assert!(!b.write_exits(0xc000_0080));
/// assert!(b.read_exits(0x4000_0000)); // out of range: always exits
/// assert_eq!(b.as_bytes()[1024 + 0x80 / 8], 1);
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<u8>", into = "Vec<u8>")]
pub struct MsrBitmap(Box<[u8; MSR_BITMAP_SIZE]>);

impl Default for MsrBitmap {
    fn default() -> Self {
        Self(Box::new([0; MSR_BITMAP_SIZE]))
    }
}

impl std::fmt::Debug for MsrBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.iter().map(|b| b.count_ones()).sum::<u32>();
        write!(f, "MsrBitmap({n} bits set)")
    }
}

impl TryFrom<Vec<u8>> for MsrBitmap {
    type Error = MsrBitmapError;
    fn try_from(v: Vec<u8>) -> Result<Self, Self::Error> {
        Self::from_bytes(&v)
    }
}

impl From<MsrBitmap> for Vec<u8> {
    fn from(b: MsrBitmap) -> Self {
        b.0.to_vec()
    }
}

/// (byte offset of the read bitmap, bit index) for `msr`.
fn locate(msr: u32) -> Option<(usize, u32)> {
    if msr < MSR_LOW_BASE + MSR_RANGE_LEN {
        Some((0, msr - MSR_LOW_BASE))
    } else if (MSR_HIGH_BASE..MSR_HIGH_BASE + MSR_RANGE_LEN).contains(&msr) {
        Some((1024, msr - MSR_HIGH_BASE))
    } else {
        None
    }
}

impl MsrBitmap {
    /// Every access exits.
    pub fn all_exiting() -> Self {
        Self(Box::new([0xff; MSR_BITMAP_SIZE]))
    }

    /// From a 4096-byte page.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MsrBitmapError> {
        let arr: [u8; MSR_BITMAP_SIZE] = bytes
            .try_into()
            .map_err(|_| MsrBitmapError::WrongSize(bytes.len()))?;
        Ok(Self(Box::new(arr)))
    }

    /// The page.
    pub fn as_bytes(&self) -> &[u8; MSR_BITMAP_SIZE] {
        &self.0
    }

    fn bit(&self, base: usize, msr: u32) -> bool {
        match locate(msr) {
            Some((off, idx)) => {
                let byte = self.0[base + off + (idx / 8) as usize];
                byte & (1 << (idx % 8)) != 0
            }
            None => true,
        }
    }

    fn set_bit(&mut self, base: usize, msr: u32, on: bool) -> Result<(), MsrBitmapError> {
        let (off, idx) = locate(msr).ok_or(MsrBitmapError::OutOfRange(msr))?;
        let byte = &mut self.0[base + off + (idx / 8) as usize];
        if on {
            *byte |= 1 << (idx % 8);
        } else {
            *byte &= !(1 << (idx % 8));
        }
        Ok(())
    }

    /// Does RDMSR of `msr` exit?
    pub fn read_exits(&self, msr: u32) -> bool {
        self.bit(0, msr)
    }

    /// Does WRMSR of `msr` exit?
    pub fn write_exits(&self, msr: u32) -> bool {
        self.bit(2048, msr)
    }

    /// Make RDMSR of `msr` exit (or not).
    pub fn set_read_exiting(&mut self, msr: u32, on: bool) -> Result<(), MsrBitmapError> {
        self.set_bit(0, msr, on)
    }

    /// Make WRMSR of `msr` exit (or not).
    pub fn set_write_exiting(&mut self, msr: u32, on: bool) -> Result<(), MsrBitmapError> {
        self.set_bit(2048, msr, on)
    }

    /// The 1-KiB bitmaps as (first MSR, read bits, write bits), for mapping to filters.
    pub fn ranges(&self) -> [(u32, &[u8], &[u8]); 2] {
        [
            (MSR_LOW_BASE, &self.0[0..1024], &self.0[2048..3072]),
            (MSR_HIGH_BASE, &self.0[1024..2048], &self.0[3072..4096]),
        ]
    }
}
