//! Disk images behind one trait: [`DiskImage`].
//!
//! * [`raw::RawImage`] — a plain file, byte `n` of the disk is byte `n` of the file. Discard
//!   punches holes (`fallocate(FALLOC_FL_PUNCH_HOLE)`), so a sparse file stays sparse.
//! * [`qcow2::Qcow2Image`] — QEMU's copy-on-write format (L1/L2 tables, refcounts, zero and
//!   zlib-compressed clusters, backing-file chains), through the `imago` crate.
//!
//! [`open`] (and [`open_file`]) open an image in the format the caller states in
//! [`OpenOptions`]: an image's bytes never choose its format, and the files a qcow2 header
//! names are opened only as [`BackingPolicy`] and [`OpenOptions::data_file`] allow. Tools that
//! must guess a format have [`probe_format`], which opens nothing else.

mod chain;
mod options;
pub mod qcow2;
pub mod qcow2_check;
mod qcow2_guard;
mod qcow2_header;
pub mod raw;

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use options::{
    BackingLayer, BackingPolicy, Confinement, DEFAULT_MAX_BACKING_DEPTH, DirtyPolicy, FollowRules,
    MAX_BACKING_DEPTH_LIMIT, OpenOptions,
};
pub use qcow2::Qcow2Image;
pub use raw::RawImage;

/// The qcow2 header magic, `QFI\xfb` (qcow2 specification, "Header").
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Errors of disk image operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The host file operation failed.
    #[error("image I/O failed")]
    Io(#[source] std::io::Error),
    /// The access does not fit inside the disk.
    #[error("access at {offset:#x}+{len:#x} is beyond the disk size {size:#x}")]
    OutOfRange {
        /// First byte of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// The disk size.
        size: u64,
    },
    /// A write-class operation on an image opened read-only.
    #[error("image is read-only")]
    ReadOnly,
    /// The image file is not a valid image of its format.
    #[error("invalid image")]
    Format(#[source] std::io::Error),
    /// A checked open ([`open_checked`], [`Qcow2Image::open_checked`]) found the image's
    /// metadata inconsistent: writing to it could overwrite metadata or shared clusters.
    #[error(
        "qcow2 metadata inconsistent: {} corruptions, {} check errors",
        .0.corruptions,
        .0.check_errors
    )]
    Inconsistent(Box<qcow2_check::CheckReport>),
    /// The qcow2 image is encrypted (`crypt_method` 1, AES, or 2, LUKS): vmkit has no key
    /// handling, and reading ciphertext as data (or storing plaintext in an encrypted image)
    /// is never right.
    #[error("qcow2 image is encrypted (crypt_method {method}), which is not supported")]
    Encrypted {
        /// The header's `crypt_method`.
        method: u32,
    },
    /// The qcow2 image needs incompatible features vmkit does not implement (those other
    /// than the dirty bit and the external data file).
    #[error("qcow2 image uses unsupported incompatible features {bits:#x}")]
    UnsupportedFeatures {
        /// The unsupported `incompatible_features` bits.
        bits: u64,
    },
    /// The qcow2 image's dirty bit is set (lazy refcounts, not cleaned after a crash).
    #[error(
        "qcow2 image is dirty: repair it by opening it writable with DirtyPolicy::Repair \
         (or `qemu-img check -r all`)"
    )]
    Dirty,
    /// A writable open found metadata where writing through it could destroy the image.
    #[error("qcow2 {what} at {offset:#x} is {why}: refusing to open writable")]
    UnsafeLayout {
        /// Which structure.
        what: &'static str,
        /// Its offset in the file.
        offset: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A data write would have landed on a metadata cluster; nothing was written.
    #[error("refused a data write onto metadata at {host_offset:#x}")]
    MetadataOverlap {
        /// The metadata cluster's offset in the file.
        host_offset: u64,
    },
    /// The image names a backing file and the policy is [`BackingPolicy::Deny`].
    #[error("image names backing file {name:?}, and backing files are refused")]
    BackingRefused {
        /// The name in the header.
        name: PathBuf,
    },
    /// A backing layer's format is not recorded in the header naming it, and the caller
    /// stated none ([`FollowRules::assume_format`]).
    #[error("backing file {name:?} has no recorded format, and none was stated")]
    BackingFormatMissing {
        /// The name in the header.
        name: PathBuf,
    },
    /// A header records a backing format vmkit does not open.
    #[error("backing file {name:?} has unsupported format {format:?}")]
    BackingFormatUnsupported {
        /// The name in the header.
        name: PathBuf,
        /// The recorded format.
        format: String,
    },
    /// A layer handed over ([`BackingPolicy::Given`]) has another format than the header
    /// naming it records.
    #[error("backing file {name:?} is recorded in another format than the given {given:?}")]
    BackingFormatMismatch {
        /// The name in the header.
        name: PathBuf,
        /// The format the caller gave.
        given: ImageFormat,
    },
    /// A backing name resolves outside the confinement root.
    #[error("backing file {name:?} lies outside {root:?}")]
    BackingOutsideRoot {
        /// The name in the header.
        name: PathBuf,
        /// The confinement root.
        root: PathBuf,
    },
    /// The chain reaches a file it already holds (same device and inode).
    #[error("backing chain loops at {name:?}")]
    BackingLoop {
        /// The name that closes the loop.
        name: PathBuf,
    },
    /// The chain has more layers than allowed.
    #[error("backing chain deeper than {max} layers")]
    BackingTooDeep {
        /// The bound.
        max: usize,
    },
    /// A backing file named by a header could not be opened.
    #[error("cannot open backing file {name:?}")]
    BackingOpen {
        /// The name in the header.
        name: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The chain needs a layer beyond those handed over ([`BackingPolicy::Given`]).
    #[error("backing file {name:?} is needed, and no more layers were given")]
    BackingLayerMissing {
        /// The name in the header.
        name: PathBuf,
    },
    /// More layers were handed over than the chain has.
    #[error("{given} backing layers given, the chain has {used}")]
    BackingLayersUnused {
        /// Layers given.
        given: usize,
        /// Layers the chain used.
        used: usize,
    },
    /// A layer (or a named data file) is not a regular file.
    #[error("{path:?} is a {kind}, not a regular file")]
    NotRegularFile {
        /// The file.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// The image keeps its data in an external data file the caller did not name.
    #[error("image needs external data file {name:?}, which was not allowed")]
    DataFileRefused {
        /// The name in the header's extension, if any.
        name: Option<PathBuf>,
    },
    /// A data file was named for an image that has none.
    #[error("a data file was named, and the image has no external data file")]
    DataFileUnexpected,
}

/// Which on-disk format an image uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageFormat {
    /// Plain bytes.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

/// A virtual disk: a byte-addressed store of fixed size.
///
/// All offsets are in bytes. Implementations check bounds themselves and return
/// [`ImageError::OutOfRange`]; callers (the virtio-blk parser) check them earlier too.
pub trait DiskImage: Send {
    /// Disk size in bytes.
    fn size(&self) -> u64;
    /// Whether the image was opened read-only.
    fn read_only(&self) -> bool;
    /// The on-disk format.
    fn format(&self) -> ImageFormat;
    /// Fill `buf` with the disk's bytes at `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError>;
    /// Store `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError>;
    /// Make every completed write durable (metadata caches written, then `fdatasync`).
    fn flush(&mut self) -> Result<(), ImageError>;
    /// Release the storage of `len` bytes at `offset`; afterwards they read as zeroes.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), ImageError>;
    /// Make `len` bytes at `offset` read as zeroes; `unmap` allows releasing their storage.
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), ImageError>;
    /// Fill `bufs`, in order, with the disk's bytes from `offset` on (one request's scattered
    /// guest buffers). The default reads buffer by buffer; formats override it to move the
    /// data in one vectored operation, without a bounce buffer.
    fn read_vectored(
        &mut self,
        bufs: &mut [IoSliceMut<'_>],
        offset: u64,
    ) -> Result<(), ImageError> {
        let mut off = offset;
        for b in bufs {
            self.read_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Store `bufs`, in order, at `offset` (see [`DiskImage::read_vectored`]).
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>], offset: u64) -> Result<(), ImageError> {
        let mut off = offset;
        for b in bufs {
            self.write_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// A file descriptor whose byte `n` is disk byte `n`, if the format has one (raw only).
    /// Engines such as io_uring use it to submit I/O directly.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

impl<T: DiskImage + ?Sized> DiskImage for Box<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn format(&self) -> ImageFormat {
        (**self).format()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        (**self).write_at(buf, offset)
    }
    fn flush(&mut self) -> Result<(), ImageError> {
        (**self).flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        (**self).discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), ImageError> {
        (**self).write_zeroes(offset, len, unmap)
    }
    fn read_vectored(
        &mut self,
        bufs: &mut [IoSliceMut<'_>],
        offset: u64,
    ) -> Result<(), ImageError> {
        (**self).read_vectored(bufs, offset)
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>], offset: u64) -> Result<(), ImageError> {
        (**self).write_vectored(bufs, offset)
    }
    fn raw_fd(&self) -> Option<RawFd> {
        (**self).raw_fd()
    }
}

/// Total bytes of a buffer list.
pub(crate) fn total_len(bufs: &[impl std::ops::Deref<Target = [u8]>]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// Check that `offset..offset+len` lies inside a disk of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<(), ImageError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ImageError::OutOfRange { offset, len, size }),
    }
}

/// Check that a write of `offset..offset+len` is allowed: the image is writable and the range
/// lies inside a disk of `size` bytes.
pub(crate) fn check_writable(
    read_only: bool,
    offset: u64,
    len: u64,
    size: u64,
) -> Result<(), ImageError> {
    if read_only {
        return Err(ImageError::ReadOnly);
    }
    check_range(offset, len, size)
}

/// Guess the format of the image at `path` from its first bytes (the qcow2 magic
/// `QFI\xfb`), opening nothing else. **For tools only** (an image inspector, `qemu-img info`
/// style): a VMM must state the format it serves, because a guest on a raw disk can write a
/// qcow2 header into its first sector, and a probed format would then open whatever file that
/// header names (QEMU's CVE-2008-2004).
///
/// # Errors
/// [`ImageError::Io`] when the file cannot be opened or read.
pub fn probe_format(path: &Path) -> Result<ImageFormat, ImageError> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(ImageError::Io)?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match f.read(&mut magic[got..]).map_err(ImageError::Io)? {
            0 => break,
            n => got += n,
        }
    }
    Ok(if got == magic.len() && magic == QCOW2_MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// Open the file at `path` as the top of an image: a regular file or a block device (a VMM
/// serves both), never a FIFO (opened without blocking, then refused), directory or other
/// device.
pub(crate) fn open_top(path: &Path, read_only: bool) -> Result<std::fs::File, ImageError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(ImageError::Io)?;
    let t = file.metadata().map_err(ImageError::Io)?.file_type();
    use std::os::unix::fs::FileTypeExt;
    if !(t.is_file() || t.is_block_device()) {
        return Err(ImageError::NotRegularFile {
            path: path.to_path_buf(),
            kind: chain::kind_of(t),
        });
    }
    // Back to blocking I/O: O_NONBLOCK only kept the open itself from waiting.
    // SAFETY: F_SETFL on a file descriptor this function owns; no memory is passed.
    let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GETFL) };
    if flags >= 0 {
        // SAFETY: as above.
        unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&file),
                libc::F_SETFL,
                flags & !libc::O_NONBLOCK,
            )
        };
    }
    Ok(file)
}

/// Open the image at `path` in the format and with the options `opts` state.
///
/// ```
/// use vmkit_block::image::{self, DiskImage, ImageFormat, OpenOptions};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.raw");
/// image::RawImage::create(&path, 1 << 20).unwrap();
/// let mut img = image::open(&path, &OpenOptions::new(ImageFormat::Raw)).unwrap();
/// assert_eq!(img.format(), ImageFormat::Raw);
/// img.write_at(b"hello", 512).unwrap();
/// let mut buf = [0u8; 5];
/// img.read_at(&mut buf, 512).unwrap();
/// assert_eq!(&buf, b"hello");
/// ```
///
/// # Errors
/// [`ImageError::Io`] when the file cannot be opened, [`ImageError::NotRegularFile`] for
/// FIFOs, directories and character devices, and for qcow2 every error of
/// [`Qcow2Image::open_file`].
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn DiskImage>, ImageError> {
    open_file(open_top(path, opts.read_only)?, opts)
}

/// Open the image in `file`, opened by the caller (readable, and writable unless
/// `opts.read_only`), in the format and with the options `opts` state. With
/// [`BackingPolicy::Given`] nothing at all is opened by name.
///
/// # Errors
/// As [`open`].
pub fn open_file(
    file: std::fs::File,
    opts: &OpenOptions,
) -> Result<Box<dyn DiskImage>, ImageError> {
    Ok(match opts.format {
        ImageFormat::Raw => Box::new(RawImage::from_file(file, opts.read_only)?),
        ImageFormat::Qcow2 => Box::new(Qcow2Image::open_file(file, opts)?),
    })
}
