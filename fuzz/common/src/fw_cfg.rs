//! Fuzz the fw_cfg device: guest port accesses (selector and data registers at any offset
//! and width) in any order, against a model of the interface.
//!
//! Input: a stream of ops, each an opcode byte and its arguments — `0` select (u16 key),
//! `1` read n data bytes (n = next byte), `2` write (offset, len, bytes), `3` read (offset,
//! len). Invariants: nothing panics; every data-register byte equals the model's (the selected
//! item's byte at the model's offset, 0 past the end or for unknown keys); undefined accesses
//! read all-ones; the counters add up.

use vmkit_devices::MutBusDevice;
use vmkit_devices::fw_cfg::{FwCfg, FwCfgConfig, FwCfgStats};

fn device() -> FwCfg {
    let mut fw = FwCfg::new(&FwCfgConfig {
        nb_cpus: 2,
        max_cpus: 4,
        ram_size: 128 << 20,
        cmdline: "console=ttyS0 panic=1".into(),
    });
    let _ = fw.add_file("etc/vmkit", b"fuzz".to_vec());
    let _ = fw.add_file("etc/empty", Vec::new());
    fw
}

/// The model: selected key and read offset.
#[derive(Default)]
struct Model {
    key: Option<u16>,
    offset: usize,
    data_reads: u64,
    past_end: u64,
    bad: u64,
}

impl Model {
    fn data_byte(&mut self, fw: &FwCfg) -> u8 {
        match self
            .key
            .and_then(|k| fw.item(k))
            .and_then(|d| d.get(self.offset))
        {
            Some(&b) => {
                self.offset += 1;
                self.data_reads += 1;
                b
            }
            None => {
                self.past_end += 1;
                0
            }
        }
    }
}

fn read(fw: &mut FwCfg, m: &mut Model, offset: u64, len: usize) {
    let mut buf = vec![0x5a; len];
    let want: Vec<u8> = if (offset, len) == (1, 1) {
        vec![m.data_byte(fw)]
    } else {
        m.bad += 1;
        vec![0xff; len]
    };
    fw.read(offset, &mut buf);
    assert_eq!(buf, want, "read at {offset} of {len}");
}

fn write(fw: &mut FwCfg, m: &mut Model, offset: u64, data: &[u8]) {
    match (offset, data) {
        (0, &[lo, hi]) => {
            m.key = Some(u16::from_le_bytes([lo, hi]));
            m.offset = 0;
        }
        (1, &[_]) => {}
        _ => m.bad += 1,
    }
    fw.write(offset, data);
}

/// Run one input.
pub fn run(data: &[u8]) {
    let mut fw = device();
    let mut m = Model::default();
    let mut it = data.iter().copied();
    while let Some(op) = it.next() {
        match op % 4 {
            0 => {
                let key = [it.next().unwrap_or(0), it.next().unwrap_or(0)];
                write(&mut fw, &mut m, 0, &key);
            }
            1 => {
                for _ in 0..it.next().unwrap_or(1) {
                    read(&mut fw, &mut m, 1, 1);
                }
            }
            2 => {
                let offset = u64::from(it.next().unwrap_or(0) % 4);
                let len = usize::from(it.next().unwrap_or(0) % 5);
                let bytes: Vec<u8> = (0..len).map(|_| it.next().unwrap_or(0)).collect();
                write(&mut fw, &mut m, offset, &bytes);
            }
            _ => {
                let offset = u64::from(it.next().unwrap_or(0) % 4);
                let len = usize::from(it.next().unwrap_or(0) % 5);
                read(&mut fw, &mut m, offset, len);
            }
        }
    }
    let s: FwCfgStats = fw.stats();
    assert_eq!(s.data_reads, m.data_reads);
    assert_eq!(s.reads_past_end, m.past_end);
    assert_eq!(s.bad_accesses, m.bad);
}

/// Seeds: the signature, the file directory walked, a file read past its end, an unknown key,
/// and every undefined width.
#[cfg(test)]
fn seeds() -> Vec<(String, Vec<u8>)> {
    vec![
        ("signature".into(), vec![0, 0, 0, 1, 4]),
        (
            "id-and-cpus".into(),
            vec![0, 1, 0, 1, 4, 0, 5, 0, 1, 2, 0, 0x0f, 0, 1, 2],
        ),
        ("file-dir".into(), vec![0, 0x19, 0, 1, 200]),
        (
            "file-past-end".into(),
            vec![0, 0x20, 0, 1, 9, 0, 0x21, 0, 1, 1],
        ),
        ("cmdline".into(), vec![0, 0x14, 0, 1, 4, 0, 0x15, 0, 1, 40]),
        ("unknown-key".into(), vec![0, 0x34, 0x12, 1, 3]),
        (
            "bad-widths".into(),
            vec![
                2, 0, 1, 5, 2, 0, 4, 1, 2, 3, 4, 3, 0, 2, 3, 1, 2, 2, 1, 2, 7, 8, 2, 1, 1, 9,
            ],
        ),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn seed_files_match() {
        crate::check_seed_files("fw_cfg", super::seeds());
    }

    #[test]
    fn replay_corpus() {
        let seeds = crate::corpus("fw_cfg");
        assert!(!seeds.is_empty());
        for s in seeds {
            super::run(&s);
        }
    }
}
