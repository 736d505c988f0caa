//! qcow2 images (QEMU copy-on-write, versions 2 and 3) through the `imago` crate.
//!
//! imago (by a QEMU block-layer maintainer) implements the format: header, L1/L2 tables, refcount
//! tables and blocks, cluster allocation, zero clusters, zlib-compressed clusters and backing
//! chains. Built with its `sync` feature it is plain synchronous code, which is what
//! [`DiskImage`] needs; this module only maps its calls onto the trait.

use std::path::Path;

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::storage::StorageCreateOptions;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder,
    PermissiveImplicitOpenGate,
};

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
        let access = FormatAccess::new(qcow2);
        let size = access.size();
        Ok(Self {
            access,
            size,
            read_only,
        })
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
        let access = FormatAccess::new(qcow2);
        let size = access.size();
        Ok(Self {
            access,
            size,
            read_only,
        })
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
        check_range(offset, buf.len() as u64, self.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.access.read(buf, offset).map_err(ImageError::Io)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        self.check_writable(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.access.write(buf, offset).map_err(ImageError::Io)
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
