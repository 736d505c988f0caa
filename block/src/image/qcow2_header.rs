//! The fixed fields of a qcow2 header (qcow2 specification, "Header"), named and read without
//! any validation. Two readers share them and validate what each needs: the writable open's
//! refcount-coverage check (`qcow2.rs`) and the consistency check (`qcow2_check::layout`),
//! which refuses far more — using the check's rules on every open would refuse images QEMU
//! and imago open. The big-endian readers serve the check's other tables too.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::ImageError;

/// Bytes of the header the fields below lie in (the version 3 header with its compression
/// type byte, padded).
pub(crate) const FIXED_HEADER_BYTES: usize = 112;

/// Big-endian `u32` at `o` of `b` (zero where `b` is too short).
pub(crate) fn be32_at(b: &[u8], o: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(o..o.saturating_add(4)) {
        w.copy_from_slice(s);
    }
    u32::from_be_bytes(w)
}

/// Big-endian `u64` at `o` of `b` (zero where `b` is too short).
pub(crate) fn be64_at(b: &[u8], o: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(o..o.saturating_add(8)) {
        w.copy_from_slice(s);
    }
    u64::from_be_bytes(w)
}

/// A qcow2 header's first [`FIXED_HEADER_BYTES`] bytes (zeroes past the end of a short file).
pub(crate) struct HeaderFields([u8; FIXED_HEADER_BYTES]);

impl HeaderFields {
    /// Wrap header bytes.
    pub(crate) fn new(bytes: [u8; FIXED_HEADER_BYTES]) -> Self {
        Self(bytes)
    }

    /// Read them from the start of `file`.
    pub(crate) fn read(file: &File) -> Result<Self, ImageError> {
        let len = file.metadata().map_err(ImageError::Io)?.len();
        let mut b = [0u8; FIXED_HEADER_BYTES];
        let n = (FIXED_HEADER_BYTES as u64).min(len) as usize;
        if let Some(inside) = b.get_mut(..n) {
            file.read_exact_at(inside, 0).map_err(ImageError::Io)?;
        }
        Ok(Self(b))
    }

    fn be32(&self, o: usize) -> u32 {
        be32_at(&self.0, o)
    }

    fn be64(&self, o: usize) -> u64 {
        be64_at(&self.0, o)
    }

    /// Bytes 0–3: `QFI\xfb`.
    pub(crate) fn magic(&self) -> [u8; 4] {
        [self.0[0], self.0[1], self.0[2], self.0[3]]
    }
    /// `version` (2 or 3).
    pub(crate) fn version(&self) -> u32 {
        self.be32(4)
    }
    /// `backing_file_offset`.
    pub(crate) fn backing_file_offset(&self) -> u64 {
        self.be64(8)
    }
    /// `cluster_bits`.
    pub(crate) fn cluster_bits(&self) -> u32 {
        self.be32(20)
    }
    /// `size`: the virtual disk size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.be64(24)
    }
    /// `crypt_method` (0 none, 1 AES, 2 LUKS).
    pub(crate) fn crypt_method(&self) -> u32 {
        self.be32(32)
    }
    /// `l1_size`: entries of the active L1 table.
    pub(crate) fn l1_size(&self) -> u64 {
        u64::from(self.be32(36))
    }
    /// `l1_table_offset`.
    pub(crate) fn l1_table_offset(&self) -> u64 {
        self.be64(40)
    }
    /// `refcount_table_offset`.
    pub(crate) fn refcount_table_offset(&self) -> u64 {
        self.be64(48)
    }
    /// `refcount_table_clusters`.
    pub(crate) fn refcount_table_clusters(&self) -> u64 {
        u64::from(self.be32(56))
    }
    /// `nb_snapshots`.
    pub(crate) fn nb_snapshots(&self) -> u64 {
        u64::from(self.be32(60))
    }
    /// `snapshots_offset`.
    pub(crate) fn snapshots_offset(&self) -> u64 {
        self.be64(64)
    }
    /// `incompatible_features` (version 3; 0 for version 2).
    pub(crate) fn incompatible_features(&self) -> u64 {
        if self.version() >= 3 {
            self.be64(72)
        } else {
            0
        }
    }
    /// `autoclear_features` (version 3; 0 for version 2).
    pub(crate) fn autoclear_features(&self) -> u64 {
        if self.version() >= 3 {
            self.be64(88)
        } else {
            0
        }
    }
    /// `refcount_order` (version 3; 4, i.e. 16-bit refcounts, for version 2).
    pub(crate) fn refcount_order(&self) -> u32 {
        if self.version() >= 3 {
            self.be32(96)
        } else {
            4
        }
    }
    /// `header_length` (version 3; 72 for version 2).
    pub(crate) fn header_length(&self) -> u64 {
        if self.version() >= 3 {
            u64::from(self.be32(100))
        } else {
            72
        }
    }
    /// `compression_type` (byte 104, present when the header is longer than 104 bytes; else
    /// 0, zlib).
    pub(crate) fn compression_type(&self) -> u8 {
        if self.header_length() > 104 {
            self.0[104]
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_sit_where_the_specification_puts_them() {
        let mut b = [0u8; FIXED_HEADER_BYTES];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(0, b"QFI\xfb");
        put(4, &3u32.to_be_bytes());
        put(8, &0x1000u64.to_be_bytes());
        put(20, &16u32.to_be_bytes());
        put(24, &(1u64 << 30).to_be_bytes());
        put(32, &2u32.to_be_bytes());
        put(36, &2u32.to_be_bytes());
        put(40, &0x3_0000u64.to_be_bytes());
        put(48, &0x1_0000u64.to_be_bytes());
        put(56, &1u32.to_be_bytes());
        put(60, &3u32.to_be_bytes());
        put(64, &0x5_0000u64.to_be_bytes());
        put(72, &0x18u64.to_be_bytes());
        put(88, &1u64.to_be_bytes());
        put(96, &5u32.to_be_bytes());
        put(100, &112u32.to_be_bytes());
        put(104, &[1]);
        let h = HeaderFields::new(b);
        assert_eq!(h.magic(), *b"QFI\xfb");
        assert_eq!(
            (
                h.version(),
                h.backing_file_offset(),
                h.cluster_bits(),
                h.size()
            ),
            (3, 0x1000, 16, 1 << 30)
        );
        assert_eq!(
            (h.crypt_method(), h.l1_size(), h.l1_table_offset()),
            (2, 2, 0x3_0000)
        );
        assert_eq!(
            (h.refcount_table_offset(), h.refcount_table_clusters()),
            (0x1_0000, 1)
        );
        assert_eq!((h.nb_snapshots(), h.snapshots_offset()), (3, 0x5_0000));
        assert_eq!(
            (h.incompatible_features(), h.autoclear_features()),
            (0x18, 1)
        );
        assert_eq!(
            (h.refcount_order(), h.header_length(), h.compression_type()),
            (5, 112, 1)
        );
        // Version 2 has none of the version 3 fields: their defaults.
        b[4..8].copy_from_slice(&2u32.to_be_bytes());
        let h = HeaderFields::new(b);
        assert_eq!(
            (
                h.incompatible_features(),
                h.autoclear_features(),
                h.refcount_order(),
                h.header_length(),
                h.compression_type()
            ),
            (0, 0, 4, 72, 0)
        );
    }
}
