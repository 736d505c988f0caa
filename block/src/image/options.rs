//! How an image is opened: the format the caller states, and what the image may make the VMM
//! open besides itself.
//!
//! A disk image is input a stranger (or the guest) could have written. Its bytes must never
//! decide what the VMM does with host files: the format is stated by the caller (never probed
//! on the open path: QEMU's CVE-2008-2004 was a raw disk whose guest wrote a qcow2 header
//! naming a host file), and the files a qcow2 header names — a backing file, an external data
//! file — are opened only as [`BackingPolicy`] and [`OpenOptions::data_file`] allow.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::ImageFormat;

/// Default bound on the layers below an image ([`FollowRules::max_depth`]).
pub const DEFAULT_MAX_BACKING_DEPTH: usize = 64;

/// Largest [`FollowRules::max_depth`] accepted: the layers are opened one after the other
/// (no recursion), but dropping a chain walks it recursively, so the bound keeps that walk far
/// from any thread's stack limit.
pub const MAX_BACKING_DEPTH_LIMIT: usize = 1024;

/// What to do with a qcow2 image whose dirty bit is set (lazy refcounts, left by a crash):
/// its refcounts may be lower than the references, so writing to it as it is could allocate
/// a cluster that is still in use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum DirtyPolicy {
    /// Refuse the open with [`ImageError::Dirty`](super::ImageError::Dirty).
    #[default]
    Refuse,
    /// On a writable open, rebuild the refcounts from the metadata (the references
    /// [`qcow2_check`](super::qcow2_check) computes), clear the dirty bit and open; as
    /// `qemu-img check -r all` does. Read-only opens still refuse: repairing writes the file.
    Repair,
}

/// Where the files of a backing chain that follows the names in the headers may live.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Confinement {
    /// Under the directory of the image that is opened (the default): an image can name its
    /// neighbours and files below them, nothing else.
    #[default]
    ImageDirectory,
    /// Under this directory (symlinks resolved first; `..` or an absolute name leading out of
    /// it is refused).
    Directory(PathBuf),
    /// Anywhere the VMM can open a file: only for images from a trusted source.
    Unconfined,
}

/// Rules for following the backing-file names recorded in qcow2 headers.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FollowRules {
    /// Most layers below the opened image; a deeper chain is refused with
    /// [`ImageError::BackingTooDeep`](super::ImageError::BackingTooDeep). At most
    /// [`MAX_BACKING_DEPTH_LIMIT`].
    pub max_depth: usize,
    /// Where every layer must live.
    pub confinement: Confinement,
    /// The format of a layer whose header records no backing format (the backing-format
    /// header extension); `None` (the default) refuses such a layer with
    /// [`ImageError::BackingFormatMissing`](super::ImageError::BackingFormatMissing), since
    /// the alternative would be guessing it from the file's content.
    pub assume_format: Option<ImageFormat>,
}

impl Default for FollowRules {
    fn default() -> Self {
        Self {
            max_depth: DEFAULT_MAX_BACKING_DEPTH,
            confinement: Confinement::default(),
            assume_format: None,
        }
    }
}

impl FollowRules {
    /// Set [`FollowRules::max_depth`].
    pub fn max_depth(mut self, depth: usize) -> Self {
        self.max_depth = depth;
        self
    }

    /// Confine the chain under `dir` ([`Confinement::Directory`]).
    pub fn confine_to(mut self, dir: impl Into<PathBuf>) -> Self {
        self.confinement = Confinement::Directory(dir.into());
        self
    }

    /// Set [`FollowRules::confinement`].
    pub fn confinement(mut self, confinement: Confinement) -> Self {
        self.confinement = confinement;
        self
    }

    /// Set [`FollowRules::assume_format`].
    pub fn assume_format(mut self, format: Option<ImageFormat>) -> Self {
        self.assume_format = format;
        self
    }
}

/// One backing layer the caller opened itself ([`BackingPolicy::Given`]).
#[derive(Debug)]
pub struct BackingLayer {
    /// The layer's file (only read from).
    pub file: File,
    /// Its format, as the caller knows it.
    pub format: ImageFormat,
}

impl BackingLayer {
    /// A layer of `format` in `file`.
    pub fn new(file: File, format: ImageFormat) -> Self {
        Self { file, format }
    }
}

/// What an image's backing-file name may make the VMM open. Backing layers are always opened
/// read-only, must be regular files (FIFOs, devices and directories are refused without
/// blocking), and a layer met twice (the same device and inode) is a loop.
#[derive(Debug)]
#[non_exhaustive]
pub enum BackingPolicy {
    /// Refuse any image that names a backing file
    /// ([`ImageError::BackingRefused`](super::ImageError::BackingRefused)).
    Deny,
    /// Follow the names in the headers, under these rules (the default, with
    /// [`FollowRules::default`]).
    Follow(FollowRules),
    /// Open no name at all: the caller hands over every layer below the image, nearest
    /// first, already opened. Each qcow2 layer that names a backing file takes the next one;
    /// a chain that needs more layers than given, or fewer, is refused. For VMMs that never
    /// want a path from an image followed (as QEMU's `-blockdev` with an explicit chain).
    Given(Vec<BackingLayer>),
}

impl Default for BackingPolicy {
    fn default() -> Self {
        Self::Follow(FollowRules::default())
    }
}

/// How to open an image: [`super::open`] and [`super::open_file`] take it.
///
/// ```
/// use vmkit_block::image::{self, BackingPolicy, DiskImage, ImageFormat, OpenOptions};
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("disk.raw");
/// image::RawImage::create(&path, 1 << 20).unwrap();
/// let opts = OpenOptions::new(ImageFormat::Raw).read_only(true);
/// let img = image::open(&path, &opts).unwrap();
/// assert!(img.read_only());
/// // A qcow2 image that must not name any other file:
/// let _strict = OpenOptions::new(ImageFormat::Qcow2).backing(BackingPolicy::Deny);
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct OpenOptions {
    /// The image's format, as the caller knows it.
    pub format: ImageFormat,
    /// Open read-only.
    pub read_only: bool,
    /// What a backing-file name may open.
    pub backing: BackingPolicy,
    /// The external data file a qcow2 image needs, if the caller allows one: opened with the
    /// image's own mode. An image that needs one the caller did not name is refused
    /// ([`ImageError::DataFileRefused`](super::ImageError::DataFileRefused)); the name in the
    /// header is never opened.
    pub data_file: Option<PathBuf>,
    /// Run the full consistency check ([`super::qcow2_check::check`]) before a writable qcow2
    /// open and refuse corrupt images (default: on). Read-only opens skip it: reading cannot
    /// make a corrupt image worse, and reads stay inside the image's own files. The cheaper
    /// layout checks of a writable open ([`ImageError::UnsafeLayout`](super::ImageError::UnsafeLayout))
    /// run regardless.
    pub check_consistency: bool,
    /// What to do with a dirty qcow2 image.
    pub dirty: DirtyPolicy,
}

impl OpenOptions {
    /// Open an image of `format`, writable, with the default backing policy (follow names
    /// under the image's directory, formats as recorded, at most
    /// [`DEFAULT_MAX_BACKING_DEPTH`] layers), no external data file, the consistency check on
    /// and dirty images refused.
    pub fn new(format: ImageFormat) -> Self {
        Self {
            format,
            read_only: false,
            backing: BackingPolicy::default(),
            data_file: None,
            check_consistency: true,
            dirty: DirtyPolicy::default(),
        }
    }

    /// Set [`OpenOptions::read_only`].
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// Set [`OpenOptions::backing`].
    pub fn backing(mut self, backing: BackingPolicy) -> Self {
        self.backing = backing;
        self
    }

    /// Allow the external data file at `path` ([`OpenOptions::data_file`]).
    pub fn data_file(mut self, path: impl AsRef<Path>) -> Self {
        self.data_file = Some(path.as_ref().to_path_buf());
        self
    }

    /// Set [`OpenOptions::check_consistency`].
    pub fn check_consistency(mut self, check: bool) -> Self {
        self.check_consistency = check;
        self
    }

    /// Set [`OpenOptions::dirty`].
    pub fn dirty(mut self, policy: DirtyPolicy) -> Self {
        self.dirty = policy;
        self
    }
}
