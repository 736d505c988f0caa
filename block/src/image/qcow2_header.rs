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

    /// Check what every reader needs before it trusts any other field, as QEMU's
    /// `qcow2_do_open` does: the magic, version 2 or 3, `cluster_bits` 9..=21, a version 3
    /// `header_length` of 104 up to a cluster, and a file of `file_len` bytes holding the
    /// header. Returns `(cluster_bits, header_length)`.
    pub(crate) fn validate_frame(&self, file_len: u64) -> Result<(u32, u64), ImageError> {
        if self.magic() != super::QCOW2_MAGIC {
            return Err(bad("no qcow2 magic"));
        }
        let version = self.version();
        if version != 2 && version != 3 {
            return Err(bad("unsupported version"));
        }
        let cluster_bits = self.cluster_bits();
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad("cluster_bits out of range"));
        }
        let header_length = self.header_length();
        if version == 3 && !(104..=1u64 << cluster_bits).contains(&header_length) {
            return Err(bad("header_length out of range"));
        }
        if file_len < header_length {
            return Err(bad("file shorter than its header"));
        }
        Ok((cluster_bits, header_length))
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

/// Header extension types (qcow2 specification, "Header extensions").
const EXT_END: u32 = 0;
/// Backing file format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// External data file name.
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Longest backing file name QEMU accepts (`block/qcow2.c`: 1023 bytes).
const MAX_BACKING_NAME: u64 = 1023;

/// What opening a qcow2 image must know from its header before it opens anything: the names
/// the header gives other files, and the features that decide whether it can be opened at
/// all. Read from the first cluster, where the specification keeps all of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct OpenHeader {
    /// `cluster_bits` (9..=21).
    pub cluster_bits: u32,
    /// `crypt_method` (0: none).
    pub crypt_method: u32,
    /// `incompatible_features`.
    pub incompatible: u64,
    /// `autoclear_features`.
    pub autoclear: u64,
    /// The backing file name (bytes `backing_file_offset..+backing_file_size`), if any.
    pub backing_file: Option<Vec<u8>>,
    /// The backing file format extension's string, if present.
    pub backing_format: Option<Vec<u8>>,
    /// The external data file name extension's string, if present.
    pub data_file: Option<Vec<u8>>,
}

pub(crate) fn bad(why: &str) -> ImageError {
    ImageError::Format(std::io::Error::other(format!("qcow2: {why}")))
}

/// Read the header of the qcow2 image in `file` ([`parse_open_header`] over its first
/// cluster).
pub(crate) fn read_open_header(file: &File) -> Result<OpenHeader, ImageError> {
    let fixed = HeaderFields::read(file)?;
    let bits = fixed.cluster_bits();
    if !(9..=21).contains(&bits) {
        return Err(bad("cluster_bits out of range"));
    }
    let len = file.metadata().map_err(ImageError::Io)?.len();
    let n = (1u64 << bits).min(len) as usize;
    let mut first = vec![0u8; n];
    file.read_exact_at(&mut first, 0).map_err(ImageError::Io)?;
    parse_open_header(&first)
}

/// Parse the header fields and extensions an open needs from `first`, the first cluster of
/// the file (or all of a shorter file). Pure: every offset and length is checked against
/// `first`, so no input can make it panic or read outside it.
///
/// Follows QEMU's `qcow2_do_open` / `qcow2_read_extensions`: extensions start after the
/// header (byte 72 for version 2, `header_length` for version 3) and end at the backing file
/// name (or the end of the cluster); each is a big-endian `type`, `length` and `length` bytes
/// padded to 8; type 0 ends them. A backing name longer than 1023 bytes, or reaching past
/// the first cluster, is refused as QEMU refuses it.
pub(crate) fn parse_open_header(first: &[u8]) -> Result<OpenHeader, ImageError> {
    let mut fixed = [0u8; FIXED_HEADER_BYTES];
    let n = first.len().min(FIXED_HEADER_BYTES);
    fixed[..n].copy_from_slice(&first[..n]);
    let h = HeaderFields::new(fixed);
    let (cluster_bits, header_length) = h.validate_frame(first.len() as u64)?;
    let cs = 1u64 << cluster_bits;
    let mut out = OpenHeader {
        cluster_bits,
        crypt_method: h.crypt_method(),
        incompatible: h.incompatible_features(),
        autoclear: h.autoclear_features(),
        ..OpenHeader::default()
    };
    let name_offset = h.backing_file_offset();
    let ext_end = if name_offset != 0 {
        let name_len = u64::from(be32_at(&fixed, 16));
        if name_offset > cs || name_len > MAX_BACKING_NAME.min(cs - name_offset) {
            return Err(bad(
                "backing file name too long or outside the first cluster",
            ));
        }
        let name = first
            .get(name_offset as usize..(name_offset + name_len) as usize)
            .ok_or_else(|| bad("backing file name beyond the end of the file"))?;
        if name.is_empty() || name.contains(&0) {
            return Err(bad("empty backing file name, or one with a NUL byte"));
        }
        out.backing_file = Some(name.to_vec());
        name_offset
    } else {
        cs
    };
    let mut at = header_length;
    loop {
        if at.saturating_add(8) > ext_end {
            // QEMU requires the end marker; images without one stop at the name or cluster end.
            break;
        }
        let kind = be32_at(first, at as usize);
        let len = u64::from(be32_at(first, at as usize + 4));
        at += 8;
        if kind == EXT_END {
            break;
        }
        let end = at + len;
        if end > ext_end {
            return Err(bad("header extension beyond its area"));
        }
        let data = first
            .get(at as usize..end as usize)
            .ok_or_else(|| bad("header extension beyond the end of the file"))?;
        let slot = match kind {
            EXT_BACKING_FORMAT => Some(&mut out.backing_format),
            EXT_DATA_FILE => Some(&mut out.data_file),
            _ => None,
        };
        if let Some(slot) = slot {
            // A string, possibly NUL-padded.
            let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            let s = data[..end].to_vec();
            if slot.as_ref().is_some_and(|old| *old != s) {
                return Err(bad("conflicting header extensions"));
            }
            *slot = Some(s);
        }
        at = end.next_multiple_of(8);
    }
    Ok(out)
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
    /// A version 3 header (64 KiB clusters, header_length 104) with `ext` after it and
    /// `name` as backing file at byte 512.
    fn v3(ext: &[u8], name: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[0..4].copy_from_slice(b"QFI\xfb");
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[100..104].copy_from_slice(&104u32.to_be_bytes());
        b[104..104 + ext.len()].copy_from_slice(ext);
        if !name.is_empty() {
            b[8..16].copy_from_slice(&512u64.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b[512..512 + name.len()].copy_from_slice(name);
        }
        b
    }

    fn ext(kind: u32, data: &[u8]) -> Vec<u8> {
        let mut e = kind.to_be_bytes().to_vec();
        e.extend_from_slice(&(data.len() as u32).to_be_bytes());
        e.extend_from_slice(data);
        e.resize(e.len().next_multiple_of(8), 0);
        e
    }

    #[test]
    fn open_header_names_what_the_header_names() {
        let mut e = ext(EXT_BACKING_FORMAT, b"qcow2\0\0\0");
        e.extend(ext(0x1234_5678, b"ignored"));
        e.extend(ext(EXT_DATA_FILE, b"data.bin"));
        e.extend([0u8; 8]);
        let h = parse_open_header(&v3(&e, b"base.qcow2")).unwrap();
        assert_eq!(h.backing_file.as_deref(), Some(&b"base.qcow2"[..]));
        assert_eq!(h.backing_format.as_deref(), Some(&b"qcow2"[..]));
        assert_eq!(h.data_file.as_deref(), Some(&b"data.bin"[..]));
        assert_eq!(h.cluster_bits, 16);
        // No backing name, no extensions.
        let h = parse_open_header(&v3(&[0; 8], b"")).unwrap();
        assert_eq!(
            (h.backing_file, h.backing_format, h.data_file),
            (None, None, None)
        );
    }

    /// Each malformed header is refused with its own reason (and never panics).
    #[test]
    fn open_header_bad_input_table() {
        let good = v3(&[0; 8], b"base");
        let edit = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            b
        };
        let dup = {
            let mut e = ext(EXT_BACKING_FORMAT, b"raw");
            e.extend(ext(EXT_BACKING_FORMAT, b"qcow2"));
            v3(&e, b"base")
        };
        let rows: Vec<(&str, Vec<u8>, &str)> = vec![
            ("no magic", edit(&|b| b[0] = b'X'), "no qcow2 magic"),
            ("version 4", edit(&|b| b[7] = 4), "unsupported version"),
            (
                "cluster_bits 8",
                edit(&|b| b[23] = 8),
                "cluster_bits out of range",
            ),
            (
                "cluster_bits 22",
                edit(&|b| b[23] = 22),
                "cluster_bits out of range",
            ),
            (
                "header_length 100",
                edit(&|b| b[103] = 100),
                "header_length out of range",
            ),
            ("empty file", Vec::new(), "no qcow2 magic"),
            (
                "truncated in header_length",
                good[..102].to_vec(),
                "header_length out of range",
            ),
            (
                "file shorter than its header",
                edit(&|b| {
                    b[103] = 200;
                    b.truncate(150)
                }),
                "shorter than its header",
            ),
            (
                "name of 1024 bytes",
                edit(&|b| b[16..20].copy_from_slice(&1024u32.to_be_bytes())),
                "too long",
            ),
            (
                "name offset past the cluster",
                edit(&|b| b[8..16].copy_from_slice(&(1u64 << 17).to_be_bytes())),
                "too long",
            ),
            (
                "name beyond a short file",
                good[..514].to_vec(),
                "beyond the end",
            ),
            ("name with NUL", edit(&|b| b[513] = 0), "NUL"),
            (
                "extension past the name",
                edit(&|b| b[104..112].copy_from_slice(&[0, 0, 0, 1, 0, 0, 2, 0])),
                "beyond its area",
            ),
            ("conflicting backing formats", dup, "conflicting"),
        ];
        for (what, bytes, why) in rows {
            match parse_open_header(&bytes) {
                Err(ImageError::Format(e)) => {
                    assert!(e.to_string().contains(why), "{what}: {e}")
                }
                other => panic!("{what}: {other:?}"),
            }
        }
    }
}
