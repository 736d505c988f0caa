//! QEMU's firmware configuration interface (fw_cfg), the x86 I/O-port variant, as firmware and
//! test kernels expect it (QEMU `docs/specs/fw_cfg.rst`):
//!
//! * the **selector** register at port 0x510 ([`FW_CFG_PORT_SEL`]): a 16-bit write selects an
//!   item and rewinds its read offset;
//! * the **data** register at 0x511 ([`FW_CFG_PORT_DATA`]): each 8-bit read returns the next
//!   byte of the selected item, 0 past its end or for an unknown item;
//! * items: the signature `"QEMU"` ([`FW_CFG_SIGNATURE`]), the interface ID ([`FW_CFG_ID`]),
//!   RAM size, CPU counts ([`FW_CFG_NB_CPUS`], [`FW_CFG_MAX_CPUS`]), the kernel command line
//!   ([`FW_CFG_CMDLINE_SIZE`], [`FW_CFG_CMDLINE_DATA`]) and named files listed in the file
//!   directory ([`FW_CFG_FILE_DIR`], big-endian, 64-byte entries) from [`FW_CFG_FILE_FIRST`] on,
//!   in the order they were added (QEMU sorts its directory by name; firmware looks files up
//!   by name, so only a guest that assumes the order would notice).
//!
//! **The DMA interface (port 0x514) is refused:** [`FW_CFG_ID`] reads 1 (traditional interface
//! only; bit 1, DMA, clear), so a guest that honours the spec never touches it, and the device
//! claims only the two ports above — a VMM leaves 0x514..0x51c unclaimed (reads all-ones). DMA
//! would let the guest make the VMM write guest memory at guest-chosen addresses; nothing here
//! needs that speed.
//!
//! Every item is read-only (writes to the data register are ignored, as in QEMU since 2.4) and
//! owned by the device, so a guest read can never reach outside an item. Accesses the interface
//! does not define (wrong widths, reads of the selector) are counted in [`FwCfgStats`] and
//! answered with all-ones.
//!
//! ```
//! use vmkit_devices::MutBusDevice;
//! use vmkit_devices::fw_cfg::{FW_CFG_NB_CPUS, FwCfg, FwCfgConfig};
//!
//! let mut fw = FwCfg::new(&FwCfgConfig { nb_cpus: 2, max_cpus: 4, ram_size: 64 << 20, cmdline: "quiet".into() });
//! fw.write(0, &FW_CFG_NB_CPUS.to_le_bytes()); // out 0x510, ax
//! let mut b = [0u8; 1];
//! fw.read(1, &mut b); // in al, 0x511
//! assert_eq!(b[0], 2);
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::MutBusDevice;

/// The selector port (x86).
pub const FW_CFG_PORT_SEL: u16 = 0x510;
/// The data port (x86).
pub const FW_CFG_PORT_DATA: u16 = 0x511;
/// Ports the device claims from [`FW_CFG_PORT_SEL`] (the DMA registers are not among them).
pub const FW_CFG_PORT_COUNT: u64 = 2;

/// Item: the signature `"QEMU"`.
pub const FW_CFG_SIGNATURE: u16 = 0x00;
/// Item: interface ID, a little-endian u32 of feature bits.
pub const FW_CFG_ID: u16 = 0x01;
/// Item: RAM size in bytes, little-endian u64.
pub const FW_CFG_RAM_SIZE: u16 = 0x03;
/// Item: vCPUs present at boot, little-endian u16.
pub const FW_CFG_NB_CPUS: u16 = 0x05;
/// Item: maximum vCPUs, little-endian u16.
pub const FW_CFG_MAX_CPUS: u16 = 0x0f;
/// Item: command-line size including the NUL, little-endian u32.
pub const FW_CFG_CMDLINE_SIZE: u16 = 0x14;
/// Item: the command line, NUL-terminated.
pub const FW_CFG_CMDLINE_DATA: u16 = 0x15;
/// Item: the file directory.
pub const FW_CFG_FILE_DIR: u16 = 0x19;
/// First file item.
pub const FW_CFG_FILE_FIRST: u16 = 0x20;
/// [`FW_CFG_ID`] bit 0: the traditional (I/O port) interface.
pub const FW_CFG_VERSION: u32 = 1 << 0;
/// [`FW_CFG_ID`] bit 1: the DMA interface (never set here).
pub const FW_CFG_VERSION_DMA: u32 = 1 << 1;
/// Longest file name (the directory's `name[56]` holds it with its NUL).
pub const FW_CFG_MAX_NAME: usize = 55;
/// Most files a device holds (keeps the directory small; QEMU's default is 0x20 slots).
pub const FW_CFG_MAX_FILES: usize = 256;

/// Errors adding files.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FwCfgError {
    /// A name longer than [`FW_CFG_MAX_NAME`] bytes, or empty.
    #[error("fw_cfg file name of {0} bytes (1..=55 allowed)")]
    BadName(usize),
    /// A file of this name exists.
    #[error("fw_cfg file {0:?} exists")]
    Duplicate(String),
    /// [`FW_CFG_MAX_FILES`] files exist.
    #[error("too many fw_cfg files")]
    TooManyFiles,
    /// Larger than a directory entry's u32 size.
    #[error("fw_cfg file of {0} bytes is too large")]
    TooLarge(usize),
}

/// What the guest may learn about the machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgConfig {
    /// vCPUs at boot ([`FW_CFG_NB_CPUS`]).
    pub nb_cpus: u16,
    /// Maximum vCPUs ([`FW_CFG_MAX_CPUS`]).
    pub max_cpus: u16,
    /// RAM bytes ([`FW_CFG_RAM_SIZE`]).
    pub ram_size: u64,
    /// Kernel command line ([`FW_CFG_CMDLINE_DATA`]).
    pub cmdline: String,
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgStats {
    /// Selector writes.
    pub selects: u64,
    /// Selector writes naming no item (reads then return 0).
    pub unknown_selects: u64,
    /// Data bytes read inside an item.
    pub data_reads: u64,
    /// Data bytes read past an item's end or from an unknown item (answered 0).
    pub reads_past_end: u64,
    /// Writes to the data register (ignored; items are read-only).
    pub data_writes: u64,
    /// Accesses the interface does not define (wrong width or offset, selector reads).
    pub bad_accesses: u64,
}

/// The fw_cfg device. Register it at [`FW_CFG_PORT_SEL`] ([`FW_CFG_PORT_COUNT`] ports) inside a
/// `Mutex` ([`MutBusDevice`]).
#[derive(Debug)]
pub struct FwCfg {
    /// (key, contents), in key order.
    items: Vec<(u16, Vec<u8>)>,
    /// (name, key), in the order added (the directory's order).
    files: Vec<(String, u16)>,
    selected: Option<usize>,
    offset: usize,
    stats: FwCfgStats,
}

impl FwCfg {
    /// A device with the signature, the ID (traditional interface only) and the items of
    /// `config`; no files.
    pub fn new(config: &FwCfgConfig) -> Self {
        let mut cmdline = config.cmdline.as_bytes().to_vec();
        cmdline.push(0);
        let mut fw = Self {
            items: vec![
                (FW_CFG_SIGNATURE, b"QEMU".to_vec()),
                (FW_CFG_ID, FW_CFG_VERSION.to_le_bytes().to_vec()),
                (FW_CFG_RAM_SIZE, config.ram_size.to_le_bytes().to_vec()),
                (FW_CFG_NB_CPUS, config.nb_cpus.to_le_bytes().to_vec()),
                (FW_CFG_MAX_CPUS, config.max_cpus.to_le_bytes().to_vec()),
                (
                    FW_CFG_CMDLINE_SIZE,
                    (cmdline.len() as u32).to_le_bytes().to_vec(),
                ),
                (FW_CFG_CMDLINE_DATA, cmdline),
                (FW_CFG_FILE_DIR, Vec::new()),
            ],
            files: Vec::new(),
            selected: None,
            offset: 0,
            stats: FwCfgStats::default(),
        };
        fw.items.sort_by_key(|(k, _)| *k);
        fw.rebuild_directory();
        fw
    }

    /// Add a file `name` (e.g. `"etc/e820"`) with `data`; returns its item key.
    ///
    /// # Errors
    /// [`FwCfgError`]: bad or duplicate name, too many files, too large.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        if name.is_empty() || name.len() > FW_CFG_MAX_NAME {
            return Err(FwCfgError::BadName(name.len()));
        }
        if self.files.iter().any(|(n, _)| n == name) {
            return Err(FwCfgError::Duplicate(name.to_string()));
        }
        if self.files.len() >= FW_CFG_MAX_FILES {
            return Err(FwCfgError::TooManyFiles);
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge(data.len()));
        }
        let key = FW_CFG_FILE_FIRST + self.files.len() as u16;
        self.files.push((name.to_string(), key));
        self.items.push((key, data));
        self.items.sort_by_key(|(k, _)| *k);
        self.rebuild_directory();
        Ok(key)
    }

    /// Counters.
    pub fn stats(&self) -> FwCfgStats {
        self.stats
    }

    /// The contents of item `key`.
    pub fn item(&self, key: u16) -> Option<&[u8]> {
        self.index(key).map(|i| self.items[i].1.as_slice())
    }

    fn index(&self, key: u16) -> Option<usize> {
        self.items.binary_search_by_key(&key, |(k, _)| *k).ok()
    }

    /// The directory (spec "File Directory"): a big-endian u32 count, then per file a
    /// big-endian u32 size, u16 select, u16 reserved and a NUL-padded 56-byte name.
    fn rebuild_directory(&mut self) {
        let mut dir = (self.files.len() as u32).to_be_bytes().to_vec();
        for (name, key) in &self.files {
            let size = self.item(*key).map_or(0, |d| d.len() as u32);
            dir.extend_from_slice(&size.to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; FW_CFG_MAX_NAME + 1];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        if let Some(i) = self.index(FW_CFG_FILE_DIR) {
            self.items[i].1 = dir;
        }
    }

    /// A selector write.
    pub fn select(&mut self, key: u16) {
        self.stats.selects += 1;
        self.selected = self.index(key);
        if self.selected.is_none() {
            self.stats.unknown_selects += 1;
        }
        self.offset = 0;
    }

    /// A data-register read: the next byte of the selected item, 0 past its end.
    pub fn read_data(&mut self) -> u8 {
        let byte = self
            .selected
            .and_then(|i| self.items.get(i))
            .and_then(|(_, d)| d.get(self.offset))
            .copied();
        match byte {
            Some(b) => {
                self.stats.data_reads += 1;
                self.offset += 1;
                b
            }
            None => {
                self.stats.reads_past_end += 1;
                0
            }
        }
    }
}

impl MutBusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, data.len()) {
            (1, 1) => data[0] = self.read_data(),
            _ => {
                self.stats.bad_accesses += 1;
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, &[lo, hi]) => self.select(u16::from_le_bytes([lo, hi])),
            (1, &[_]) => self.stats.data_writes += 1,
            _ => self.stats.bad_accesses += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> FwCfg {
        let mut fw = FwCfg::new(&FwCfgConfig {
            nb_cpus: 2,
            max_cpus: 8,
            ram_size: 0x0012_3456_789a,
            cmdline: "console=ttyS0".into(),
        });
        fw.add_file("etc/vmkit", b"hello".to_vec()).unwrap();
        fw.add_file("opt/test", vec![7; 3]).unwrap();
        fw
    }

    fn read_item(fw: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
        fw.write(0, &key.to_le_bytes());
        (0..n)
            .map(|_| {
                let mut b = [0u8];
                fw.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn items_as_qemu_defines_them() {
        let mut fw = device();
        assert_eq!(read_item(&mut fw, FW_CFG_SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut fw, FW_CFG_ID, 4), [1, 0, 0, 0], "no DMA bit");
        assert_eq!(
            read_item(&mut fw, FW_CFG_RAM_SIZE, 8),
            0x0012_3456_789a_u64.to_le_bytes()
        );
        assert_eq!(read_item(&mut fw, FW_CFG_NB_CPUS, 2), [2, 0]);
        assert_eq!(read_item(&mut fw, FW_CFG_MAX_CPUS, 2), [8, 0]);
        assert_eq!(read_item(&mut fw, FW_CFG_CMDLINE_SIZE, 4), [14, 0, 0, 0]);
        assert_eq!(
            read_item(&mut fw, FW_CFG_CMDLINE_DATA, 14),
            b"console=ttyS0\0"
        );
        // The directory: count 2, then (size, select, reserved, name[56]) big-endian.
        let dir = read_item(&mut fw, FW_CFG_FILE_DIR, 4 + 2 * 64);
        assert_eq!(dir[..4], [0, 0, 0, 2]);
        assert_eq!(dir[4..8], [0, 0, 0, 5]);
        assert_eq!(dir[8..10], [0, 0x20]);
        assert_eq!(&dir[12..21], b"etc/vmkit");
        assert_eq!(dir[21], 0);
        assert_eq!(dir[68..72], [0, 0, 0, 3]);
        assert_eq!(dir[72..74], [0, 0x21]);
        assert_eq!(read_item(&mut fw, 0x20, 5), b"hello");
        assert_eq!(read_item(&mut fw, 0x21, 3), [7, 7, 7]);
        assert_eq!(fw.stats().bad_accesses, 0);
    }

    /// Bad input: each guest access with its answer and the counter it moves.
    #[test]
    fn bad_access_table() {
        type Step = fn(&mut FwCfg) -> Vec<u8>;
        let cases: [(&str, Step, &[u8], FwCfgStats); 9] = [
            (
                "unknown selector reads 0",
                |fw| read_item(fw, 0x1234, 2),
                &[0, 0],
                FwCfgStats {
                    selects: 1,
                    unknown_selects: 1,
                    reads_past_end: 2,
                    ..Default::default()
                },
            ),
            (
                "read past the end reads 0",
                |fw| read_item(fw, FW_CFG_NB_CPUS, 3),
                &[2, 0, 0],
                FwCfgStats {
                    selects: 1,
                    data_reads: 2,
                    reads_past_end: 1,
                    ..Default::default()
                },
            ),
            (
                "data read before any select",
                |fw| {
                    let mut b = [9u8];
                    fw.read(1, &mut b);
                    b.to_vec()
                },
                &[0],
                FwCfgStats {
                    reads_past_end: 1,
                    ..Default::default()
                },
            ),
            (
                "data write ignored",
                |fw| {
                    fw.write(0, &FW_CFG_SIGNATURE.to_le_bytes());
                    fw.write(1, b"X");
                    read_item(fw, FW_CFG_SIGNATURE, 1)
                },
                b"Q",
                FwCfgStats {
                    selects: 2,
                    data_writes: 1,
                    data_reads: 1,
                    ..Default::default()
                },
            ),
            (
                "8-bit selector write",
                |fw| {
                    fw.write(0, &[5]);
                    Vec::new()
                },
                &[],
                FwCfgStats {
                    bad_accesses: 1,
                    ..Default::default()
                },
            ),
            (
                "32-bit selector write",
                |fw| {
                    fw.write(0, &[5, 0, 0, 0]);
                    Vec::new()
                },
                &[],
                FwCfgStats {
                    bad_accesses: 1,
                    ..Default::default()
                },
            ),
            (
                "16-bit data read",
                |fw| {
                    fw.write(0, &FW_CFG_SIGNATURE.to_le_bytes());
                    let mut b = [0u8; 2];
                    fw.read(1, &mut b);
                    b.to_vec()
                },
                &[0xff, 0xff],
                FwCfgStats {
                    selects: 1,
                    bad_accesses: 1,
                    ..Default::default()
                },
            ),
            (
                "selector read",
                |fw| {
                    let mut b = [0u8; 2];
                    fw.read(0, &mut b);
                    b.to_vec()
                },
                &[0xff, 0xff],
                FwCfgStats {
                    bad_accesses: 1,
                    ..Default::default()
                },
            ),
            (
                "16-bit data write",
                |fw| {
                    fw.write(1, &[1, 2]);
                    Vec::new()
                },
                &[],
                FwCfgStats {
                    bad_accesses: 1,
                    ..Default::default()
                },
            ),
        ];
        for (name, step, want, stats) in cases {
            let mut fw = device();
            assert_eq!(step(&mut fw), want, "{name}");
            assert_eq!(fw.stats(), stats, "{name}");
        }
    }

    #[test]
    fn add_file_errors() {
        let mut fw = device();
        assert_eq!(fw.add_file("", vec![]), Err(FwCfgError::BadName(0)));
        assert_eq!(
            fw.add_file(&"n".repeat(56), vec![]),
            Err(FwCfgError::BadName(56))
        );
        assert!(fw.add_file(&"n".repeat(55), vec![]).is_ok());
        assert_eq!(
            fw.add_file("etc/vmkit", vec![]),
            Err(FwCfgError::Duplicate("etc/vmkit".into()))
        );
        for i in fw.files.len()..FW_CFG_MAX_FILES {
            fw.add_file(&format!("f{i}"), vec![]).unwrap();
        }
        assert_eq!(
            fw.add_file("one-more", vec![]),
            Err(FwCfgError::TooManyFiles)
        );
        let dir = fw.item(FW_CFG_FILE_DIR).unwrap();
        assert_eq!(dir.len(), 4 + FW_CFG_MAX_FILES * 64);
    }
}
