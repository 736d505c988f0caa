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
use imago::raw::Raw;
use imago::storage::StorageCreateOptions;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder};

use super::chain;
use super::options::{DirtyPolicy, OpenOptions};
use super::qcow2_check::{self, CheckReport};
use super::qcow2_guard::MetadataMap;
use super::qcow2_header::read_open_header;
use super::{DiskImage, ImageError, ImageFormat, check_range};

/// Default qcow2 cluster size, as `qemu-img create` uses.
pub const DEFAULT_CLUSTER_SIZE: usize = 64 * 1024;

/// A qcow2 image, with its backing chain opened as [`OpenOptions::backing`] allows.
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
    /// The metadata clusters every data write is held against (writable opens only).
    guard: MetadataMap,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("size", &self.size)
            .field("read_only", &self.read_only)
            .finish()
    }
}

fn imago_file(file: std::fs::File) -> Result<ImagoFile, ImageError> {
    ImagoFile::try_from(file).map_err(ImageError::Io)
}

impl Qcow2Image {
    /// Create a qcow2 image of `size` bytes at `path` (overwriting any file there).
    ///
    /// `backing` names a backing file (and its format) that is written into the header; a
    /// relative name is relative to the new image's directory, as in `qemu-img create -b`.
    ///
    /// # Errors
    /// [`ImageError::Io`] when the file cannot be created or written.
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

    /// Open the qcow2 image at `path` with the default [`OpenOptions`] (backing chain followed
    /// under the image's directory, consistency check, dirty images refused), writable unless
    /// `read_only`.
    ///
    /// # Errors
    /// As [`Qcow2Image::open_with`].
    pub fn open(path: &Path, read_only: bool) -> Result<Self, ImageError> {
        Self::open_with(
            path,
            &OpenOptions::new(ImageFormat::Qcow2).read_only(read_only),
        )
    }

    /// Open the qcow2 image at `path` as `opts` say (`opts.format` is not consulted: this
    /// opens qcow2).
    ///
    /// # Errors
    /// [`ImageError::Io`] when the file cannot be opened; otherwise as
    /// [`Qcow2Image::open_file`].
    pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Self, ImageError> {
        Self::open_file(super::open_top(path, opts.read_only)?, opts)
    }

    /// Open the qcow2 image in `file` (opened by the caller, writable unless
    /// `opts.read_only`) as `opts` say. Nothing is written to the file before every check
    /// has passed.
    ///
    /// # Errors
    /// [`ImageError::Format`] for a file that is not a qcow2 image imago opens;
    /// [`ImageError::Encrypted`], [`ImageError::UnsupportedFeatures`],
    /// [`ImageError::Dirty`] for images vmkit does not open; [`ImageError::Inconsistent`]
    /// when the consistency check finds corruption; [`ImageError::UnsafeLayout`] for a
    /// writable open of an image whose metadata lies outside the file or over the header;
    /// the backing-chain errors of [`BackingPolicy`](super::BackingPolicy) and the data-file
    /// errors of [`OpenOptions::data_file`].
    pub fn open_file(file: std::fs::File, opts: &OpenOptions) -> Result<Self, ImageError> {
        let read_only = opts.read_only;
        let mut header = read_open_header(&file)?;
        chain::admit_header(&header, true)?;
        if header.incompatible & chain::INCOMPAT_DIRTY != 0 {
            match opts.dirty {
                DirtyPolicy::Repair if !read_only => {
                    qcow2_check::repair(&file)?;
                    header = read_open_header(&file)?;
                }
                _ => return Err(ImageError::Dirty),
            }
        }
        let needs_data_file = header.incompatible & chain::INCOMPAT_DATA_FILE != 0;
        let data_file = match (&opts.data_file, needs_data_file) {
            (None, true) => {
                return Err(ImageError::DataFileRefused {
                    name: header.data_file.as_deref().map(chain::path_of),
                });
            }
            (Some(_), false) => return Err(ImageError::DataFileUnexpected),
            (Some(p), true) => Some(open_data_file(p, read_only)?),
            (None, false) => None,
        };
        if opts.check_consistency && !read_only {
            let report = qcow2_check::check_file(&file)?;
            if !report.is_consistent() {
                return Err(ImageError::Inconsistent(Box::new(report)));
            }
        }
        // With an external data file, data offsets are offsets in that file: no metadata there.
        let guard = if read_only || needs_data_file {
            MetadataMap::default()
        } else {
            MetadataMap::build(&file)?
        };
        let below = chain::layers_below(&file, &header, opts)?;
        if !read_only && header.autoclear != 0 {
            // imago clears the autoclear bits as it opens an image writable, before it has
            // read the tables: open it read-only first, so a refusal leaves the file as it was.
            let dup = file.try_clone().map_err(ImageError::Io)?;
            let _validated = Qcow2::<ImagoFile>::builder(imago_file(dup)?)
                .backing(None)
                .data_file(None)
                .write(false)
                .open(DenyImplicitOpenGate::default())
                .map_err(ImageError::Format)?;
        }
        // The layers, bottom first, each given the one below it: no name is opened by imago.
        let mut lower: Option<FormatAccess<ImagoFile>> = None;
        for layer in below.into_iter().rev() {
            let f = imago_file(layer.file)?;
            lower = Some(match layer.format {
                ImageFormat::Raw => FormatAccess::new(
                    Raw::builder(f)
                        .write(false)
                        .open(DenyImplicitOpenGate::default())
                        .map_err(ImageError::Format)?,
                ),
                ImageFormat::Qcow2 => FormatAccess::new(
                    Qcow2::<ImagoFile>::builder(f)
                        .backing(lower.take())
                        .data_file(None)
                        .write(false)
                        .open(DenyImplicitOpenGate::default())
                        .map_err(ImageError::Format)?,
                ),
            });
        }
        let own = file.try_clone().map_err(ImageError::Io)?;
        let qcow2 = Qcow2::<ImagoFile>::builder(imago_file(file)?)
            .backing(lower)
            .data_file(data_file.map(imago_file).transpose()?)
            .write(!read_only)
            .open(DenyImplicitOpenGate::default())
            .map_err(ImageError::Format)?;
        let data = (!qcow2.requires_external_data_file()).then_some(own);
        let access = FormatAccess::new(qcow2);
        let size = access.size();
        Ok(Self {
            access,
            size,
            read_only,
            data,
            guard,
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

    /// Check the image at `path` as `qemu-img check` does: [`qcow2_check::check`].
    ///
    /// # Errors
    /// As [`qcow2_check::check`].
    pub fn check(path: &Path) -> Result<CheckReport, ImageError> {
        qcow2_check::check(path)
    }

    fn check_writable(&self, offset: u64, len: u64) -> Result<(), ImageError> {
        super::check_writable(self.read_only, offset, len, self.size)
    }

    /// imago's allocating write (`FormatAccess::writev`), with every host range held against
    /// the metadata map before any byte of it is written.
    fn allocating_write(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<(), ImageError> {
        use imago::StorageExt;
        let v: Vec<IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).copied().collect();
        let mut bufv = IoVector::from(v);
        let mut offset = offset;
        while !bufv.is_empty() {
            let mapping = self
                .access
                .prepare_data_mapping(offset, bufv.len(), true)
                .map_err(ImageError::Io)?;
            let (storage, host, len) = (mapping.storage(), mapping.offset(), mapping.length());
            // Dropping an uncommitted mapping discards it: the refused write leaves no trace.
            self.guard.check_write(host, len)?;
            let (chunk, rest) = bufv.split_at(len);
            bufv = rest;
            offset += len;
            storage.writev(chunk, host).map_err(ImageError::Io)?;
            self.access
                .commit_data_mapping(mapping)
                .map_err(ImageError::Io)?;
        }
        Ok(())
    }
}

/// Open the external data file the caller named, with the image's mode.
fn open_data_file(path: &Path, read_only: bool) -> Result<std::fs::File, ImageError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(ImageError::Io)?;
    let t = f.metadata().map_err(ImageError::Io)?.file_type();
    if !t.is_file() {
        return Err(ImageError::NotRegularFile {
            path: path.to_path_buf(),
            kind: chain::kind_of(t),
        });
    }
    Ok(f)
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
            self.guard.check_write(host, len)?;
            return super::raw::write_vectored_at(file, bufs, host);
        }
        self.allocating_write(bufs, offset)
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
