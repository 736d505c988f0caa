//! qcow2 images (QEMU copy-on-write, versions 2 and 3) through the `imago` crate.
//!
//! imago (by a QEMU block-layer maintainer) implements the format: header, L1/L2 tables, refcount
//! tables and blocks, cluster allocation, zero clusters, zlib-compressed clusters and backing
//! chains. Built with its `sync` feature it is plain synchronous code, which is what
//! [`DiskImage`] needs; this module only maps its calls onto the trait.

use std::io::{IoSlice, IoSliceMut};
use std::path::Path;

use imago::Mapping;
use imago::file::File as ImagoFile;
use imago::io_buffers::{IoVector, IoVectorMut};
use imago::qcow2::Qcow2;
use imago::storage::StorageCreateOptions;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder,
    PermissiveImplicitOpenGate,
};

use super::qcow2_check::{self, CheckReport};
use super::{DiskImage, ImageError, ImageFormat, check_range};

/// Default qcow2 cluster size, as `qemu-img create` uses.
pub const DEFAULT_CLUSTER_SIZE: usize = 64 * 1024;

/// A qcow2 image, with its backing chain opened.
///
/// ```
/// use vmkit_block::image::{DiskImage, Qcow2Image};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.qcow2");
/// Qcow2Image::create(&path, 1 << 20, None).unwrap();
/// let mut img = Qcow2Image::open(&path, false).unwrap();
/// img.write_at(&[7u8; 4096], 65536).unwrap();
/// img.flush().unwrap();
/// let mut buf = [0u8; 4096];
/// img.read_at(&mut buf, 65536).unwrap();
/// assert_eq!(buf, [7u8; 4096]);
/// ```
pub struct Qcow2Image {
    access: FormatAccess<ImagoFile>,
    size: u64,
    read_only: bool,
    /// Our own handle on the image file, for data I/O on clusters the image already owns;
    /// `None` when the image keeps its data in an external data file.
    data: Option<std::fs::File>,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl Qcow2Image {
    /// Create a qcow2 image of `size` bytes at `path` (overwriting any file there).
    ///
    /// `backing` names a backing file (and its format) that is written into the header; a
    /// relative name is relative to the new image's directory, as in `qemu-img create -b`.
    pub fn create(
        path: &Path,
        size: u64,
        backing: Option<(&str, ImageFormat)>,
    ) -> Result<(), ImageError> {
        use imago::Storage;
        let file = ImagoFile::create_open(
            StorageCreateOptions::new()
                .filename(path)
                .overwrite(true)
                .size(0),
        )
        .map_err(ImageError::Io)?;
        let mut builder = Qcow2::<ImagoFile>::create_builder(file)
            .size(size)
            .cluster_size(DEFAULT_CLUSTER_SIZE);
        if let Some((name, format)) = backing {
            let fmt = match format {
                ImageFormat::Raw => "raw",
                ImageFormat::Qcow2 => "qcow2",
            };
            builder = builder.backing(name.to_string(), fmt.to_string());
        }
        builder.create().map_err(ImageError::Io)
    }

    /// Open a qcow2 image and its backing chain (backing files are opened read-only).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, ImageError> {
        let qcow2 = Qcow2::<ImagoFile>::builder_path(path)
            .write(!read_only)
            .open(PermissiveImplicitOpenGate::default())
            .map_err(ImageError::Format)?;
        Self::wrap(qcow2, path, read_only)
    }

    fn wrap(qcow2: Qcow2<ImagoFile>, path: &Path, read_only: bool) -> Result<Self, ImageError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(ImageError::Io)?;
        if !read_only {
            check_refcount_coverage(&file)?;
        }
        let data = (!qcow2.requires_external_data_file()).then_some(file);
        let access = FormatAccess::new(qcow2);
        let size = access.size();
        Ok(Self {
            access,
            size,
            read_only,
            data,
        })
    }

    /// Where `offset..offset+len` lives in the image file, when it is one stretch of clusters
    /// this image owns outright (allocated, not compressed, not shared with a snapshot): imago
    /// reports those as writable raw mappings, which may be read and written directly.
    /// Everything else (unallocated, zero, compressed or backing-file data) returns `None`.
    fn owned_stretch(&self, offset: u64, len: u64) -> Option<(&std::fs::File, u64)> {
        let file = self.data.as_ref()?;
        match self.access.get_mapping(offset, len) {
            Ok((
                Mapping::Raw {
                    offset: host,
                    writable: true,
                    ..
                },
                mapped,
            )) if mapped >= len => Some((file, host)),
            _ => None,
        }
    }

    /// Open a qcow2 image without opening anything it names (backing file, external data
    /// file): for images from untrusted sources, whose header could name any host file.
    /// Unallocated clusters read as zeroes; an image needing an external data file fails.
    pub fn open_standalone(path: &Path, read_only: bool) -> Result<Self, ImageError> {
        use imago::Storage;
        use imago::storage::StorageOpenOptions;
        let file = ImagoFile::open(StorageOpenOptions::new().filename(path).write(!read_only))
            .map_err(ImageError::Io)?;
        let qcow2 = Qcow2::<ImagoFile>::builder(file)
            .backing(None)
            .write(!read_only)
            .open(DenyImplicitOpenGate::default())
            .map_err(ImageError::Format)?;
        Self::wrap(qcow2, path, read_only)
    }

    /// Check the image at `path` as `qemu-img check` does: [`qcow2_check::check`].
    pub fn check(path: &Path) -> Result<CheckReport, ImageError> {
        qcow2_check::check(path)
    }

    /// [`Qcow2Image::open`] after a consistency check ([`qcow2_check::check`]): an image with
    /// corruptions (or refcounts that cannot be read) is refused with
    /// [`ImageError::Inconsistent`], whether opened writable or not; leaks are allowed (they
    /// only waste space).
    ///
    /// imago trusts the refcounts: where they call a referenced cluster free, a write can put
    /// guest data over an L2 table or a refcount block. Use this (or
    /// [`Qcow2Image::open_standalone_checked`]) for images from untrusted sources. The check
    /// reads every L1 and L2 table and every refcount block (no guest data): a fraction of a
    /// second for a fully allocated 1 GiB image (figures in the crate README).
    ///
    /// ```
    /// use vmkit_block::image::{DiskImage, ImageError, Qcow2Image};
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("disk.qcow2");
    /// Qcow2Image::create(&path, 1 << 20, None).unwrap();
    /// let mut img = Qcow2Image::open_checked(&path, false).unwrap();
    /// img.write_at(&[1u8; 512], 0).unwrap();
    /// img.flush().unwrap();
    /// drop(img);
    /// // Zero the refcount table's first entry: the metadata now claims nothing is in use.
    /// use std::os::unix::fs::FileExt;
    /// let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    /// let mut rt = [0u8; 8];
    /// f.read_exact_at(&mut rt, 48).unwrap();
    /// f.write_all_at(&[0u8; 8], u64::from_be_bytes(rt)).unwrap();
    /// assert!(matches!(
    ///     Qcow2Image::open_checked(&path, false),
    ///     Err(ImageError::Inconsistent(r)) if r.corruptions > 0
    /// ));
    /// ```
    pub fn open_checked(path: &Path, read_only: bool) -> Result<Self, ImageError> {
        Self::require_consistent(path)?;
        Self::open(path, read_only)
    }

    /// [`Qcow2Image::open_standalone`] after the consistency check of
    /// [`Qcow2Image::open_checked`]: for untrusted images, opening nothing the image names.
    pub fn open_standalone_checked(path: &Path, read_only: bool) -> Result<Self, ImageError> {
        Self::require_consistent(path)?;
        Self::open_standalone(path, read_only)
    }

    fn require_consistent(path: &Path) -> Result<(), ImageError> {
        let report = qcow2_check::check(path)?;
        if report.is_consistent() {
            Ok(())
        } else {
            Err(ImageError::Inconsistent(Box::new(report)))
        }
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        super::check_writable(self.read_only, offset, len, self.size)
    }
}

impl DiskImage for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.read_vectored(&mut [IoSliceMut::new(buf)], offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.write_vectored(&[IoSlice::new(buf)], offset)
    }

    fn read_vectored(
        &mut self,
        bufs: &mut [IoSliceMut<'_>],
        offset: u64,
    ) -> Result<(), ImageError> {
        let len = super::total_len(bufs);
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        if let Some((file, host)) = self.owned_stretch(offset, len) {
            return super::raw::read_vectored_at(file, bufs, host);
        }
        let v: Vec<IoSliceMut<'_>> = bufs
            .iter_mut()
            .filter(|b| !b.is_empty())
            .map(|b| IoSliceMut::new(b))
            .collect();
        self.access
            .readv(IoVectorMut::from(v), offset)
            .map_err(ImageError::Io)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>], offset: u64) -> Result<(), ImageError> {
        let len = super::total_len(bufs);
        self.check_writable(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // Overwriting data this image already owns (the common case once a guest has written
        // a cluster) goes straight to the file; anything else through imago's allocating write.
        if let Some((file, host)) = self.owned_stretch(offset, len) {
            return super::raw::write_vectored_at(file, bufs, host);
        }
        let v: Vec<IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).copied().collect();
        self.access
            .writev(IoVector::from(v), offset)
            .map_err(ImageError::Io)
    }

    fn flush(&mut self) -> Result<(), ImageError> {
        if self.read_only {
            return Ok(());
        }
        self.access.flush().map_err(ImageError::Io)?;
        self.access.sync().map_err(ImageError::Io)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        self.write_zeroes(offset, len, true)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), ImageError> {
        self.check_writable(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if unmap {
            self.access.discard_to_zero(offset, len)
        } else {
            self.access.write_zeroes(offset, len)
        }
        .map_err(ImageError::Io)
    }
}

/// Reject, before any write, a qcow2 file whose refcount table leaves part of the file without a
/// refcount block.
///
/// A consistent image has a refcount block for every stretch of the file that holds clusters.
/// When one is missing, imago 0.2.6 allocates it on the next cluster allocation — and allocating
/// the cluster for it can need yet another missing block below it, recursively, once per
/// missing block: on a crafted image deep enough to overflow the stack and abort the process
/// (`Allocator::ensure_rb` → `allocate_clusters` → `ensure_rb`, found by the `qcow2_image` fuzz
/// target). Read-only opens never allocate and skip this check.
///
/// Reads the header fields it needs (qcow2 specification: `cluster_bits` at byte 20,
/// `refcount_table_offset` at 48, `refcount_table_clusters` at 56, version 3's
/// `refcount_order` at 96) and the reftable entries that cover the file.
fn check_refcount_coverage(file: &std::fs::File) -> Result<(), ImageError> {
    use std::os::unix::fs::FileExt;
    let bad = |why: &str| ImageError::Format(std::io::Error::other(why.to_string()));
    let h = super::qcow2_header::HeaderFields::read(file)?;
    let cluster_bits = h.cluster_bits();
    let refcount_order = h.refcount_order();
    if !(9..=21).contains(&cluster_bits) || refcount_order > 6 {
        return Err(bad("qcow2: cluster_bits or refcount_order out of range"));
    }
    // Refcount entries per refblock: cluster_size * 8 / refcount_bits.
    let rb_bits = cluster_bits + 3 - refcount_order;
    let file_len = file.metadata().map_err(ImageError::Io)?.len();
    if file_len == 0 {
        return Ok(());
    }
    let last_cluster = (file_len - 1) >> cluster_bits;
    let needed = (last_cluster >> rb_bits) + 1;
    let rt_entries = h.refcount_table_clusters() << (cluster_bits - 3);
    if needed > rt_entries {
        return Err(bad("qcow2: refcount table too small for the file"));
    }
    let rt_offset = h.refcount_table_offset();
    rt_offset
        .checked_add(needed * 8)
        .ok_or_else(|| bad("qcow2: refcount table offset overflows"))?;
    // The entries, 64 KiB of them at a time.
    let mut chunk = vec![0u8; 64 * 1024];
    let mut done = 0u64;
    while done < needed {
        let n = (needed - done).min(chunk.len() as u64 / 8) as usize;
        let buf = &mut chunk[..n * 8];
        file.read_exact_at(buf, rt_offset + done * 8)
            .map_err(ImageError::Io)?;
        if buf.chunks_exact(8).any(|e| {
            u64::from_be_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]) & !0x1ff == 0
        }) {
            return Err(bad("qcow2: part of the file has no refcount block"));
        }
        done += n as u64;
    }
    Ok(())
}
