//! What [`check`](super::check) reports.

use serde::{Deserialize, Serialize};

/// Findings kept in a [`CheckReport`]; the counts go on beyond.
pub const MAX_FINDINGS: usize = 64;

/// What referenced a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Referrer {
    /// The header cluster (cluster 0, with the header extensions).
    Header = 1,
    /// An L1 table (the active one or a snapshot's).
    L1Table,
    /// An L2 table, named by an L1 entry.
    L2Table,
    /// A data cluster (standard or zero with an offset), named by an L2 entry.
    Data,
    /// A compressed cluster, named by an L2 entry.
    Compressed,
    /// The refcount table.
    RefcountTable,
    /// A refcount block, named by the refcount table.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table (as a table; its entries count as [`Referrer::L2Table`]).
    SnapshotL1Table,
    /// The persistent bitmap directory.
    BitmapDirectory,
    /// A persistent bitmap's table.
    BitmapTable,
    /// A persistent bitmap's data cluster.
    BitmapData,
    /// The LUKS encryption header.
    EncryptionHeader,
}

/// One problem [`check`](super::check) found. Each is counted in [`CheckReport::corruptions`] (once per
/// table that names it) except [`Finding::Leaked`] (a leak) and
/// [`Finding::UnreadableRefcount`] (a check error).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Finding {
    /// The stored refcount is lower than the references (0 for referenced metadata that the
    /// allocator would hand out again): QEMU's "ERROR cluster N refcount=R reference=C".
    RefcountTooLow {
        /// Cluster index (file offset / cluster size).
        cluster: u64,
        /// The stored refcount.
        refcount: u64,
        /// The references counted.
        references: u64,
        /// What referenced it (first seen).
        referrer: Option<Referrer>,
    },
    /// The stored refcount is higher than the references: a leak (QEMU's "Leaked cluster").
    Leaked {
        /// Cluster index.
        cluster: u64,
        /// The stored refcount.
        refcount: u64,
        /// The references counted.
        references: u64,
    },
    /// More references than the refcount width can hold.
    RefcountOverflow {
        /// Cluster index.
        cluster: u64,
        /// What referenced it.
        referrer: Referrer,
    },
    /// A region reaching a cluster or more past the end of the file.
    BeyondEnd {
        /// First byte.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// What the region is.
        referrer: Referrer,
    },
    /// A table or cluster offset that is not cluster aligned.
    Misaligned {
        /// The offset.
        offset: u64,
        /// What it locates.
        referrer: Referrer,
    },
    /// An entry with reserved bits set; `referrer` is what the entry locates.
    ReservedBits {
        /// The raw entry.
        entry: u64,
        /// What the entry locates ([`Referrer::L2Table`] for an L1 entry, [`Referrer::Data`]
        /// for an L2 entry, [`Referrer::RefcountBlock`], [`Referrer::BitmapData`]).
        referrer: Referrer,
    },
    /// A refcount block referenced more than once (refcount table entry `index`).
    RefcountBlockShared {
        /// Refcount table index.
        index: u64,
        /// The references counted to its cluster.
        references: u64,
    },
    /// `QCOW_OFLAG_COPIED` disagrees with `refcount == 1` in an active L1 or L2 entry.
    CopiedFlag {
        /// The raw entry.
        entry: u64,
        /// The stored refcount of the cluster it locates.
        refcount: u64,
        /// What the entry locates ([`Referrer::L2Table`] or [`Referrer::Data`]).
        referrer: Referrer,
    },
    /// The stored refcount cannot be read: its refcount block is misaligned or lies beyond
    /// the largest offset QEMU reads, 2^63 - 2^30 (a check error, as in QEMU).
    UnreadableRefcount {
        /// Cluster index.
        cluster: u64,
    },
    /// A compressed cluster entry that cannot be valid (COPIED set, an external data file, or
    /// a subcluster bitmap).
    BadCompressedEntry {
        /// The raw entry.
        entry: u64,
    },
    /// An extended L2 entry whose subcluster bitmap contradicts its cluster type.
    BadSubclusterBitmap {
        /// The raw entry.
        entry: u64,
        /// Its bitmap.
        bitmap: u64,
    },
    /// A snapshot whose L1 table is unusable (too large) or whose version 3 table entry lacks
    /// the required extra data, or snapshots in an image with an external data file (`index`
    /// is then the snapshot count).
    BadSnapshot {
        /// Snapshot index.
        index: u64,
    },
    /// The persistent bitmap directory is inconsistent.
    BadBitmapDirectory,
    /// A persistent bitmap table entry that cannot be valid.
    BadBitmapEntry {
        /// The raw entry.
        entry: u64,
    },
}

/// The result of [`check`](super::check): what `qemu-img check --output=json` reports as `corruptions`,
/// `leaks`, `check-errors` and `image-end-offset`, plus the first findings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Problems that put data at risk (see [`Finding`]).
    pub corruptions: u64,
    /// Clusters whose stored refcount exceeds their references (wasted space only).
    pub leaks: u64,
    /// Refcounts that could not be read.
    pub check_errors: u64,
    /// End of the last cluster that is referenced or has a refcount.
    pub image_end_offset: u64,
    /// Cluster size of the image.
    pub cluster_size: u64,
    /// The first [`MAX_FINDINGS`] findings.
    pub findings: Vec<Finding>,
    /// Findings beyond [`MAX_FINDINGS`], not kept.
    pub findings_dropped: u64,
}

impl CheckReport {
    /// Whether the image is safe to write: no corruptions and no check errors (leaks only
    /// waste space).
    pub fn is_consistent(&self) -> bool {
        self.corruptions == 0 && self.check_errors == 0
    }

    pub(super) fn note(&mut self, f: Finding) {
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(f);
        } else {
            self.findings_dropped += 1;
        }
    }

    pub(super) fn corrupt(&mut self, n: u64, f: Finding) {
        self.corruptions = self.corruptions.saturating_add(n);
        self.note(f);
    }
}
