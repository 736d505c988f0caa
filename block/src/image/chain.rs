//! The files below a qcow2 image: found one after the other (a loop, not recursion, so no
//! chain can exhaust a stack), each admitted by the caller's [`BackingPolicy`] before it is
//! opened.
//!
//! A backing-file name is bytes a stranger wrote. Following one safely takes, per layer
//! (QEMU's `-blockdev` chains and Firecracker's jailer reach the same end by never following
//! names, or by a chroot):
//! 1. the name resolved against the directory of the layer that names it, with every symlink
//!    and `..` resolved (`canonicalize`) *before* anything is opened, and refused when it
//!    leaves the confinement root;
//! 2. a regular file only (`stat` before the open, so a FIFO is never opened and cannot
//!    block; `fstat` after it, with the same device and inode, so a swap in between is
//!    caught), opened read-only with `O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`;
//! 3. its format from the naming header's backing-format extension or the caller, never
//!    from its content;
//! 4. a layer seen before (same device and inode) is a loop; more layers than the policy's
//!    depth are refused.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::options::{
    BackingPolicy, Confinement, FollowRules, MAX_BACKING_DEPTH_LIMIT, OpenOptions,
};
use super::qcow2_header::{OpenHeader, read_open_header};
use super::{ImageError, ImageFormat};

/// Incompatible feature bit 0: refcounts may be stale (lazy refcounts).
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;

/// One layer below the image: its file and the format it is read as.
#[derive(Debug)]
pub(crate) struct Layer {
    pub file: File,
    pub format: ImageFormat,
}

/// A file's identity: device and inode.
fn identity(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

/// What kind of non-regular file `t` is, for [`ImageError::NotRegularFile`].
pub(crate) fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_symlink() {
        "symlink"
    } else {
        "regular file"
    }
}

/// The path a file descriptor refers to (`/proc/self/fd/N`), when it has one.
pub(crate) fn fd_path(file: &File) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
        .filter(|p| p.is_absolute())
}

/// Refuse what a qcow2 layer's header asks for that vmkit will not do, before any of its
/// tables is read: encryption, incompatible features other than the dirty bit and the
/// external data file, and (below the top image, which [`super::qcow2`] handles) both of
/// those too.
pub(crate) fn admit_header(h: &OpenHeader, top: bool) -> Result<(), ImageError> {
    if h.crypt_method != 0 {
        return Err(ImageError::Encrypted {
            method: h.crypt_method,
        });
    }
    let allowed = if top {
        INCOMPAT_DIRTY | INCOMPAT_DATA_FILE
    } else {
        0
    };
    if h.incompatible & !allowed & !(INCOMPAT_DIRTY | INCOMPAT_DATA_FILE) != 0 {
        return Err(ImageError::UnsupportedFeatures {
            bits: h.incompatible & !(INCOMPAT_DIRTY | INCOMPAT_DATA_FILE),
        });
    }
    if !top && h.incompatible & INCOMPAT_DIRTY != 0 {
        return Err(ImageError::Dirty);
    }
    if !top && h.incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(ImageError::DataFileRefused {
            name: h.data_file.as_deref().map(path_of),
        });
    }
    Ok(())
}

/// A name from a header as a path.
pub(crate) fn path_of(name: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(name))
}

/// The format a header's backing-format extension records.
fn recorded_format(name: &Path, recorded: &[u8]) -> Result<ImageFormat, ImageError> {
    match recorded {
        b"raw" => Ok(ImageFormat::Raw),
        b"qcow2" => Ok(ImageFormat::Qcow2),
        other => Err(ImageError::BackingFormatUnsupported {
            name: name.to_path_buf(),
            format: String::from_utf8_lossy(other).into_owned(),
        }),
    }
}

/// Open `path` (already canonical) read-only as a backing layer: a regular file, the same
/// one `stat` saw.
fn open_regular(name: &Path, path: &Path) -> Result<File, ImageError> {
    let io = |source| ImageError::BackingOpen {
        name: name.to_path_buf(),
        source,
    };
    let before = std::fs::metadata(path).map_err(io)?;
    if !before.file_type().is_file() {
        return Err(ImageError::NotRegularFile {
            path: path.to_path_buf(),
            kind: kind_of(before.file_type()),
        });
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    let after = file.metadata().map_err(io)?;
    if !after.file_type().is_file() || identity(&after) != identity(&before) {
        return Err(ImageError::NotRegularFile {
            path: path.to_path_buf(),
            kind: kind_of(after.file_type()),
        });
    }
    Ok(file)
}

/// The confinement root of `rules` for an image whose file is `top`.
fn root_of(rules: &FollowRules, top: &File) -> Result<Option<PathBuf>, ImageError> {
    match &rules.confinement {
        Confinement::Unconfined => Ok(None),
        Confinement::Directory(d) => std::fs::canonicalize(d).map(Some).map_err(ImageError::Io),
        Confinement::ImageDirectory => {
            let dir = fd_path(top)
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .ok_or_else(|| {
                    ImageError::Io(std::io::Error::other(
                        "the image file has no directory to confine its backing chain to",
                    ))
                })?;
            Ok(Some(dir))
        }
    }
}

/// Find and open every layer below the qcow2 image in `top` (whose header is `header`),
/// nearest first, as `opts.backing` allows.
pub(crate) fn layers_below(
    top: &File,
    header: &OpenHeader,
    opts: &OpenOptions,
) -> Result<Vec<Layer>, ImageError> {
    let mut layers = Vec::new();
    let Some(first_name) = header.backing_file.as_deref() else {
        if let BackingPolicy::Given(given) = &opts.backing
            && !given.is_empty()
        {
            return Err(ImageError::BackingLayersUnused {
                given: given.len(),
                used: 0,
            });
        }
        return Ok(layers);
    };
    let top_meta = top.metadata().map_err(ImageError::Io)?;
    let mut seen = HashSet::from([identity(&top_meta)]);
    let root = match &opts.backing {
        BackingPolicy::Deny => {
            return Err(ImageError::BackingRefused {
                name: path_of(first_name),
            });
        }
        BackingPolicy::Given(_) => None,
        BackingPolicy::Follow(rules) => root_of(rules, top)?,
    };
    // The layer that names the next one: its directory and its header.
    let mut base_dir = fd_path(top).and_then(|p| p.parent().map(Path::to_path_buf));
    let mut naming: OpenHeader = header.clone();
    while let Some(raw_name) = naming.backing_file.take() {
        let name = path_of(&raw_name);
        let recorded = naming
            .backing_format
            .as_deref()
            .map(|f| recorded_format(&name, f))
            .transpose()?;
        let (file, format) = match &opts.backing {
            BackingPolicy::Deny => {
                return Err(ImageError::BackingRefused { name });
            }
            BackingPolicy::Given(given) => {
                let Some(layer) = given.get(layers.len()) else {
                    return Err(ImageError::BackingLayerMissing { name });
                };
                if recorded.is_some_and(|r| r != layer.format) {
                    return Err(ImageError::BackingFormatMismatch {
                        name,
                        given: layer.format,
                    });
                }
                let meta = layer.file.metadata().map_err(ImageError::Io)?;
                if !meta.file_type().is_file() {
                    return Err(ImageError::NotRegularFile {
                        path: name,
                        kind: kind_of(meta.file_type()),
                    });
                }
                (
                    layer.file.try_clone().map_err(ImageError::Io)?,
                    layer.format,
                )
            }
            BackingPolicy::Follow(rules) => {
                let max = rules.max_depth.min(MAX_BACKING_DEPTH_LIMIT);
                if layers.len() >= max {
                    return Err(ImageError::BackingTooDeep { max });
                }
                let format = recorded
                    .or(rules.assume_format)
                    .ok_or_else(|| ImageError::BackingFormatMissing { name: name.clone() })?;
                let candidate = match (&base_dir, name.is_absolute()) {
                    (_, true) => name.clone(),
                    (Some(dir), false) => dir.join(&name),
                    (None, false) => {
                        return Err(ImageError::BackingOpen {
                            name,
                            source: std::io::Error::other(
                                "a relative name, and the naming image has no directory",
                            ),
                        });
                    }
                };
                let canonical = std::fs::canonicalize(&candidate).map_err(|source| {
                    ImageError::BackingOpen {
                        name: name.clone(),
                        source,
                    }
                })?;
                if let Some(root) = &root
                    && !canonical.starts_with(root)
                {
                    return Err(ImageError::BackingOutsideRoot {
                        name,
                        root: root.clone(),
                    });
                }
                let file = open_regular(&name, &canonical)?;
                base_dir = canonical.parent().map(Path::to_path_buf);
                (file, format)
            }
        };
        let meta = file.metadata().map_err(ImageError::Io)?;
        if !seen.insert(identity(&meta)) {
            return Err(ImageError::BackingLoop { name });
        }
        if format == ImageFormat::Qcow2 {
            naming = read_open_header(&file)?;
            admit_header(&naming, false)?;
        } else {
            naming = OpenHeader::default();
        }
        layers.push(Layer { file, format });
    }
    if let BackingPolicy::Given(given) = &opts.backing
        && given.len() != layers.len()
    {
        return Err(ImageError::BackingLayersUnused {
            given: given.len(),
            used: layers.len(),
        });
    }
    Ok(layers)
}
