//! Raw images: disk byte `n` is file byte `n`.

use std::fs::{File, OpenOptions};
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{DiskImage, ImageError, ImageFormat, check_range};

/// Largest zero buffer written at once when the filesystem cannot zero a range itself.
const ZERO_CHUNK: usize = 64 * 1024;

/// A raw image file.
///
/// ```
/// use vmkit_block::image::{DiskImage, RawImage};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.raw");
/// let mut img = RawImage::create(&path, 4096).unwrap();
/// img.write_at(&[0xaa; 512], 0).unwrap();
/// img.discard(0, 4096).unwrap(); // punches a hole: reads zeroes, uses no blocks
/// let mut buf = [1u8; 512];
/// img.read_at(&mut buf, 0).unwrap();
/// assert_eq!(buf, [0u8; 512]);
/// ```
#[derive(Debug)]
pub struct RawImage {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawImage {
    /// Create (or truncate) a sparse raw image of `size` bytes at `path`, opened read-write.
    pub fn create(path: &Path, size: u64) -> Result<Self, ImageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(ImageError::Io)?;
        file.set_len(size).map_err(ImageError::Io)?;
        Ok(Self {
            file,
            size,
            read_only: false,
        })
    }

    /// Open an existing raw image (a regular file or a block device); its size is the file's
    /// length. A FIFO is refused without blocking.
    ///
    /// # Errors
    /// As [`RawImage::from_file`], and [`ImageError::Io`] when the file cannot be opened.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, ImageError> {
        Self::from_file(super::open_top(path, read_only)?, read_only)
    }

    /// Wrap an already opened file: a regular file or a block device, whose size is the disk's.
    ///
    /// # Errors
    /// [`ImageError::NotRegularFile`] for anything else (a FIFO, a directory, a character
    /// device); [`ImageError::Io`] when its size cannot be read.
    pub fn from_file(file: File, read_only: bool) -> Result<Self, ImageError> {
        use std::io::Seek;
        use std::os::unix::fs::FileTypeExt;
        let meta = file.metadata().map_err(ImageError::Io)?;
        let t = meta.file_type();
        let size = if t.is_file() {
            meta.len()
        } else if t.is_block_device() {
            // A block device's st_size is 0: its size is where its end is.
            (&file)
                .seek(std::io::SeekFrom::End(0))
                .map_err(ImageError::Io)?
        } else {
            return Err(ImageError::NotRegularFile {
                path: super::chain::fd_path(&file).unwrap_or_default(),
                kind: super::chain::kind_of(t),
            });
        };
        Ok(Self {
            file,
            size,
            read_only,
        })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<(), ImageError> {
        let zeroes = vec![0u8; ZERO_CHUNK];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZERO_CHUNK as u64) as usize;
            self.file
                .write_all_at(&zeroes[..n], offset)
                .map_err(ImageError::Io)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        super::check_writable(self.read_only, offset, len, self.size)
    }
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file.read_exact_at(buf, offset).map_err(ImageError::Io)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.check_writable(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset).map_err(ImageError::Io)
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(ImageError::Io)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), ImageError> {
        self.check_writable(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            // Filesystems without the mode (or tmpfs for ZERO_RANGE): write the zeroes.
            Err(_) => self.write_zero_bytes(offset, len),
        }
    }

    fn read_vectored(
        &mut self,
        bufs: &mut [IoSliceMut<'_>],
        offset: u64,
    ) -> Result<(), ImageError> {
        check_range(offset, super::total_len(bufs), self.size)?;
        read_vectored_at(&self.file, bufs, offset)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>], offset: u64) -> Result<(), ImageError> {
        self.check_writable(offset, super::total_len(bufs))?;
        write_vectored_at(&self.file, bufs, offset)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}

/// Fill `bufs` from `file` at `offset`: one `pread` for a single buffer (the common 4 KiB
/// request, no iovec import), else `preadv` until done. No bounds check: callers check.
pub(crate) fn read_vectored_at(
    file: &File,
    mut bufs: &mut [IoSliceMut<'_>],
    offset: u64,
) -> Result<(), ImageError> {
    if let [one] = bufs {
        return file.read_exact_at(one, offset).map_err(ImageError::Io);
    }
    let mut left = super::total_len(bufs);
    let mut off = offset;
    while left > 0 {
        let n = transfer(file, bufs.as_ptr().cast(), bufs.len(), off, false)?;
        IoSliceMut::advance_slices(&mut bufs, n);
        off += n as u64;
        left -= n as u64;
    }
    Ok(())
}

/// Store `bufs` in `file` at `offset` (see [`read_vectored_at`]).
pub(crate) fn write_vectored_at(
    file: &File,
    bufs: &[IoSlice<'_>],
    offset: u64,
) -> Result<(), ImageError> {
    if let [one] = bufs {
        return file.write_all_at(one, offset).map_err(ImageError::Io);
    }
    // `advance_slices` shortens the slices in place, so work on a copy of the list (it is
    // short: at most `seg_max` entries).
    let mut owned: Vec<IoSlice<'_>> = bufs.to_vec();
    let mut rest = owned.as_mut_slice();
    let mut left = super::total_len(bufs);
    let mut off = offset;
    while left > 0 {
        let n = transfer(file, rest.as_ptr().cast(), rest.len(), off, true)?;
        IoSlice::advance_slices(&mut rest, n);
        off += n as u64;
        left -= n as u64;
    }
    Ok(())
}

/// One `preadv`/`pwritev` of up to `UIO_MAXIOV` of the `cnt` iovecs at `iov`; returns the bytes
/// moved (never 0: a transfer that stops at the end of the file is an error).
fn transfer(
    file: &File,
    iov: *const libc::iovec,
    cnt: usize,
    offset: u64,
    write: bool,
) -> Result<usize, ImageError> {
    let cnt = cnt.min(libc::UIO_MAXIOV as usize) as libc::c_int;
    let off = libc::off_t::try_from(offset)
        .map_err(|_| ImageError::Io(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    let fd = file.as_raw_fd();
    loop {
        // SAFETY: `iov` points at `cnt` live `IoSlice`/`IoSliceMut`s, which std guarantees to
        // be ABI-compatible with `iovec`; each names memory its owner lent us for this call
        // (mutably, for reads).
        let n = unsafe {
            if write {
                libc::pwritev(fd, iov, cnt, off)
            } else {
                libc::preadv(fd, iov, cnt, off)
            }
        };
        match n {
            0 => return Err(ImageError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            n if n > 0 => return Ok(n as usize),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(ImageError::Io(e));
                }
            }
        }
    }
}
