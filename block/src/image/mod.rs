//! Disk images behind one trait: [`DiskImage`].
//!
//! * [`raw::RawImage`] — a plain file, byte `n` of the disk is byte `n` of the file. Discard
//!   punches holes (`fallocate(FALLOC_FL_PUNCH_HOLE)`), so a sparse file stays sparse.
//! * [`qcow2::Qcow2Image`] — QEMU's copy-on-write format (L1/L2 tables, refcounts, zero and
//!   zlib-compressed clusters, backing-file chains), through the `imago` crate.
//!
//! [`open`] picks the format from the file's first bytes (the qcow2 magic `QFI\xfb`);
//! [`open_checked`] also runs [`qcow2_check::check`] on qcow2 images and refuses corrupt ones.

pub mod qcow2;
pub mod qcow2_check;
mod qcow2_header;
pub mod raw;

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::RawFd;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use qcow2::Qcow2Image;
pub use raw::RawImage;

/// The qcow2 header magic, `QFI\xfb` (qcow2 specification, "Header").
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Errors of disk image operations.
#[derive(Debug, thiserror::Error)]
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

/// Detect the format of the image at `path` from its first bytes.
pub fn detect_format(path: &Path) -> Result<ImageFormat, ImageError> {
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

/// Open the image at `path`, detecting its format (qcow2 backing files are opened too).
///
/// ```
/// use vmkit_block::image::{self, DiskImage, ImageFormat};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.raw");
/// image::RawImage::create(&path, 1 << 20).unwrap();
/// let mut img = image::open(&path, false).unwrap();
/// assert_eq!(img.format(), ImageFormat::Raw);
/// img.write_at(b"hello", 512).unwrap();
/// let mut buf = [0u8; 5];
/// img.read_at(&mut buf, 512).unwrap();
/// assert_eq!(&buf, b"hello");
/// ```
pub fn open(path: &Path, read_only: bool) -> Result<Box<dyn DiskImage>, ImageError> {
    Ok(match detect_format(path)? {
        ImageFormat::Raw => Box::new(RawImage::open(path, read_only)?),
        ImageFormat::Qcow2 => Box::new(Qcow2Image::open(path, read_only)?),
    })
}

/// [`open`], but a qcow2 image is first checked ([`Qcow2Image::open_checked`]) and refused
/// with [`ImageError::Inconsistent`] when its metadata is corrupt. The check reads every L2
/// table (see [`qcow2_check`]); use this for images from untrusted sources.
///
/// ```
/// use vmkit_block::image::{self, DiskImage, Qcow2Image};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.qcow2");
/// Qcow2Image::create(&path, 1 << 20, None).unwrap();
/// let mut img = image::open_checked(&path, false).unwrap();
/// img.write_at(b"hello", 512).unwrap();
/// ```
pub fn open_checked(path: &Path, read_only: bool) -> Result<Box<dyn DiskImage>, ImageError> {
    Ok(match detect_format(path)? {
        ImageFormat::Raw => Box::new(RawImage::open(path, read_only)?),
        ImageFormat::Qcow2 => Box::new(Qcow2Image::open_checked(path, read_only)?),
    })
}
