//! The bookkeeping of the check: bounded reads of the image file, a per-cluster count map, and
//! sweeps over (possibly overlapping, possibly repeated) tables that read every table byte once.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::Referrer;
use crate::image::ImageError;

/// Bytes read per chunk when streaming tables.
const CHUNK: usize = 256 * 1024;

/// The image file, read at most `len` bytes deep: bytes past the end read as zeroes, as QEMU's
/// block layer zero-fills reads beyond the end of a file.
pub(super) struct Src<'a> {
    pub file: &'a File,
    pub len: u64,
}

impl Src<'_> {
    /// Fill `buf` from `pos`; the part beyond the end of the file is zeroes.
    pub fn read(&self, buf: &mut [u8], pos: u64) -> Result<(), ImageError> {
        let n = (buf.len() as u64).min(self.len.saturating_sub(pos)) as usize;
        let (inside, beyond) = buf.split_at_mut(n);
        if !inside.is_empty() {
            self.file
                .read_exact_at(inside, pos)
                .map_err(ImageError::Io)?;
        }
        beyond.fill(0);
        Ok(())
    }
}

/// Refcount entry `i` of a refcount block held in `b` (qcow2 specification, "Refcount
/// blocks": entries of `1 << order` bits; sub-byte entries fill each byte from its least
/// significant bit, as QEMU reads them; wider entries are big-endian).
pub(super) fn refcount_entry(b: &[u8], i: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    let bit = i.saturating_mul(bits);
    let byte = usize::try_from(bit / 8).unwrap_or(usize::MAX);
    if bits < 8 {
        let v = b.get(byte).copied().unwrap_or(0);
        return u64::from(v >> (bit % 8)) & ((1 << bits) - 1);
    }
    let n = (bits / 8) as usize;
    let mut w = [0u8; 8];
    if let Some(s) = b.get(byte..byte.saturating_add(n)) {
        w[8 - n..].copy_from_slice(s);
    }
    u64::from_be_bytes(w)
}

/// Per-cluster counts, saturating at `max` (QEMU keeps its computed counts in an array of the
/// image's own refcount width and counts one corruption per increment that would overflow it).
/// Two bytes a cluster; counts from `u16::MAX` up live in a side map.
pub(super) struct RefMap {
    small: Vec<u16>,
    big: HashMap<u64, u64>,
    /// Who first referenced each cluster (`Option<Referrer>` is one byte).
    who: Vec<Option<Referrer>>,
    len: u64,
    max: u64,
}

const BIG: u16 = u16::MAX;

// The referrer map stays one byte a cluster.
const _: () = assert!(std::mem::size_of::<Option<Referrer>>() == 1);

impl RefMap {
    /// A map of `len` clusters with room for `cap` (`cap >= len`), counts saturating at `max`.
    pub fn new(len: u64, cap: u64, max: u64, track_referrers: bool) -> Self {
        let cap = usize::try_from(cap).unwrap_or(0);
        Self {
            small: vec![0; cap],
            big: HashMap::new(),
            who: if track_referrers {
                vec![None; cap]
            } else {
                Vec::new()
            },
            len,
            max,
        }
    }

    /// Clusters covered (grows when a reference lands just past the end of the file).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The count of cluster `k` (0 outside the map).
    pub fn get(&self, k: u64) -> u64 {
        let Some(&v) = usize::try_from(k).ok().and_then(|i| self.small.get(i)) else {
            return 0;
        };
        if v == BIG {
            self.big.get(&k).copied().unwrap_or(0)
        } else {
            u64::from(v)
        }
    }

    /// Set cluster `k` (ignored outside the capacity).
    pub fn set(&mut self, k: u64, v: u64) {
        let Some(slot) = usize::try_from(k).ok().and_then(|i| self.small.get_mut(i)) else {
            return;
        };
        if v >= u64::from(BIG) {
            *slot = BIG;
            self.big.insert(k, v);
        } else {
            *slot = v as u16;
            self.big.remove(&k);
        }
        self.len = self.len.max(k + 1);
    }

    /// Who first referenced cluster `k`.
    pub fn referrer(&self, k: u64) -> Option<Referrer> {
        usize::try_from(k)
            .ok()
            .and_then(|i| self.who.get(i).copied())?
    }

    /// Add `n` references to cluster `k`; returns how many of them overflowed the maximum.
    pub fn add(&mut self, k: u64, n: u64, who: Referrer) -> u64 {
        let cur = self.get(k);
        let new = cur.saturating_add(n);
        if let Some(w) = usize::try_from(k).ok().and_then(|i| self.who.get_mut(i))
            && w.is_none()
        {
            *w = Some(who);
        }
        if new > self.max {
            self.set(k, self.max);
            new - self.max
        } else {
            self.set(k, new);
            0
        }
    }
}

/// Coverage segments of a set of byte ranges `[start, end)` with multiplicities: every byte
/// covered by at least one range appears in exactly one segment, with the summed multiplicity.
/// Tables repeated or overlapping (a hostile image can point a million L1 entries at one L2
/// table) are thus read once, and their entries counted with their multiplicity.
pub(super) struct Sweep {
    segs: Vec<(u64, u64, u64)>,
    seg: usize,
    pos: u64,
}

impl Sweep {
    /// Segments of `runs` (`(start, end, multiplicity)`), clipped to `limit`.
    pub fn new(runs: impl IntoIterator<Item = (u64, u64, u64)>, limit: u64) -> Self {
        let mut ev: Vec<(u64, bool, u64)> = Vec::new();
        for (s, e, m) in runs {
            let e = e.min(limit);
            if s < e && m > 0 {
                ev.push((s, true, m));
                ev.push((e, false, m));
            }
        }
        ev.sort_unstable_by_key(|&(p, _, _)| p);
        let mut segs = Vec::new();
        let mut cov: u128 = 0;
        let mut prev = 0u64;
        for (p, start, m) in ev {
            if p > prev && cov > 0 {
                let c = u64::try_from(cov).unwrap_or(u64::MAX);
                match segs.last_mut() {
                    Some((_, e, lc)) if *e == prev && *lc == c => *e = p,
                    _ => segs.push((prev, p, c)),
                }
            }
            prev = p;
            if start {
                cov += u128::from(m);
            } else {
                cov = cov.saturating_sub(u128::from(m));
            }
        }
        let pos = segs.first().map_or(0, |s| s.0);
        Self { segs, seg: 0, pos }
    }

    /// The next chunk: fills `buf` (resized, at most [`CHUNK`] bytes) from the file and returns
    /// its file offset and multiplicity, or `None` when every segment is done.
    pub fn next(
        &mut self,
        src: &Src<'_>,
        buf: &mut Vec<u8>,
    ) -> Result<Option<(u64, u64)>, ImageError> {
        let Some(&(_, end, mult)) = self.segs.get(self.seg) else {
            return Ok(None);
        };
        let n = (end - self.pos).min(CHUNK as u64) as usize;
        buf.resize(n, 0);
        src.read(buf, self.pos)?;
        let at = self.pos;
        self.pos += n as u64;
        if self.pos >= end {
            self.seg += 1;
            self.pos = self.segs.get(self.seg).map_or(0, |s| s.0);
        }
        Ok(Some((at, mult)))
    }
}

/// Cluster ranges referenced by whole tables (header, L1 tables, refcount table, snapshot
/// table, bitmap directory and tables), collected and applied in one sweep: 65,536 snapshots
/// may each name an L1 table spanning the whole file.
#[derive(Default)]
pub(super) struct Regions(Vec<(u64, u64, Referrer)>);

impl Regions {
    /// Clusters `first..=last` are referenced once by `who`.
    pub fn push(&mut self, first: u64, last: u64, who: Referrer) {
        self.0.push((first, last, who));
    }

    /// Add every collected reference to `map`; returns the overflowing references and the
    /// first cluster that overflowed.
    pub fn apply(self, map: &mut RefMap) -> (u64, Option<(u64, Referrer)>) {
        let mut ev: Vec<(u64, i8, Referrer)> = Vec::with_capacity(self.0.len() * 2);
        for (f, l, who) in self.0 {
            ev.push((f, 1, who));
            ev.push((l.saturating_add(1), -1, who));
        }
        ev.sort_unstable_by_key(|&(p, d, _)| (p, d));
        let (mut cov, mut prev, mut who, mut over) = (0u64, 0u64, Referrer::Header, 0u64);
        let mut first_over = None;
        for (p, d, w) in ev {
            if cov > 0 {
                for k in prev..p {
                    let o = map.add(k, cov, who);
                    if o > 0 {
                        over += o;
                        first_over.get_or_insert((k, who));
                    }
                }
            }
            prev = p;
            if d > 0 {
                cov += 1;
                who = w;
            } else {
                cov = cov.saturating_sub(1);
            }
        }
        (over, first_over)
    }
}
