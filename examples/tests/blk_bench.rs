//! `blk_bench` follows `qemu-img bench`'s access pattern: the same command line on two copies of
//! one image leaves the same bytes behind (writes store zeroes, at OFFSET, then STEP further
//! each time, wrapping at the image size). `qemu-img` (Debian's `qemu-utils`) is the oracle.

use std::path::Path;
use std::process::{Command, Output};

const IMAGE: usize = 64 << 10;

fn blk_bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blk_bench"))
        .args(args)
        .output()
        .expect("run blk_bench")
}

fn qemu_img(args: &[&str]) -> Output {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (Debian package qemu-utils) must be installed");
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
    out
}

/// A raw image of `IMAGE` bytes, byte `i` = `(i / 512) as u8 | 1` (never zero).
fn fill(path: &Path) {
    let v: Vec<u8> = (0..IMAGE).map(|i| (i / 512) as u8 | 1).collect();
    std::fs::write(path, v).unwrap();
}

fn raw_bytes(path: &Path, format: &str) -> Vec<u8> {
    if format == "raw" {
        return std::fs::read(path).unwrap();
    }
    let out = path.with_extension("out.raw");
    qemu_img(&[
        "convert",
        "-f",
        format,
        "-O",
        "raw",
        path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    std::fs::read(out).unwrap()
}

#[test]
fn writes_land_where_qemu_img_bench_writes() {
    let dir = tempfile::tempdir().unwrap();
    // (format, engine, cache, extra options): 20 writes of 4 KiB from 4 KiB on, 12 KiB apart,
    // wrapping past the end of the 64 KiB image; depth 1 and 8; a request size that is not the
    // step.
    let cases: &[(&str, &str, &str, &[&str])] = &[
        (
            "raw",
            "sync",
            "writeback",
            &["-c", "20", "-d", "1", "-o", "4096", "-S", "12288"],
        ),
        (
            "raw",
            "io_uring",
            "writeback",
            &["-c", "20", "-d", "8", "-o", "4096", "-S", "12k"],
        ),
        (
            "raw",
            "io_uring",
            "none",
            &["-c", "20", "-d", "8", "-o", "4096", "-S", "12288"],
        ),
        (
            "raw",
            "sync",
            "none",
            &["-c", "7", "-d", "3", "-s", "1024", "-S", "5k"],
        ),
        (
            "qcow2",
            "sync",
            "writeback",
            &["-c", "20", "-d", "4", "-o", "4096", "-S", "12288"],
        ),
    ];
    for (i, (format, engine, cache, extra)) in cases.iter().enumerate() {
        let ours = dir.path().join(format!("{i}.vmkit.raw"));
        let theirs = dir.path().join(format!("{i}.qemu.raw"));
        fill(&ours);
        fill(&theirs);
        let (ours, theirs) = if *format == "qcow2" {
            let (q1, q2) = (ours.with_extension("qcow2"), theirs.with_extension("qcow2"));
            for (r, q) in [(&ours, &q1), (&theirs, &q2)] {
                qemu_img(&[
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    r.to_str().unwrap(),
                    q.to_str().unwrap(),
                ]);
            }
            (q1, q2)
        } else {
            (ours, theirs)
        };
        let mut args: Vec<&str> = vec!["-w", "-f", format, "-t", cache];
        args.extend_from_slice(extra);
        let ours_s = ours.to_str().unwrap();
        let mut mine = args.clone();
        mine.extend(["-i", engine, ours_s]);
        let out = blk_bench(&mine);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "case {i}: {out:?}");
        assert!(stdout.contains(" write requests, "), "case {i}: {stdout}");
        assert!(stdout.contains("Run completed in "), "case {i}: {stdout}");
        assert!(
            stdout.trim_end().ends_with(" requests/s"),
            "case {i}: {stdout}"
        );
        // The same options for qemu-img (its `-i` default, threads, for every case).
        let mut qemu = vec!["bench"];
        qemu.extend(args.iter().copied());
        qemu.push(theirs.to_str().unwrap());
        qemu_img(&qemu);
        let (a, b) = (raw_bytes(&ours, format), raw_bytes(&theirs, format));
        assert_eq!(a.len(), IMAGE);
        let zeroed = a.iter().filter(|&&x| x == 0).count();
        assert!(zeroed > 0, "case {i}: nothing written");
        assert!(
            a == b,
            "case {i}: blk_bench {mine:?} and qemu-img {qemu:?} differ"
        );
    }
}

#[test]
fn reads_every_engine_and_refuses_what_it_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("r.raw");
    fill(&raw);
    let r = raw.to_str().unwrap();
    for (engine, cache) in [
        ("sync", "writeback"),
        ("io_uring", "writeback"),
        ("io_uring", "none"),
    ] {
        let out = blk_bench(&["-c", "100", "-d", "16", "-i", engine, "-t", cache, r]);
        assert!(out.status.success(), "{engine} {cache}: {out:?}");
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(
            s.starts_with(
                "Sending 100 read requests, 4096 bytes each, 16 in parallel (starting at offset 0, step size 4096)"
            ),
            "{s}"
        );
    }
    // Reads leave the image as it was.
    let v: Vec<u8> = (0..IMAGE).map(|i| (i / 512) as u8 | 1).collect();
    assert_eq!(std::fs::read(&raw).unwrap(), v);

    let qcow2 = dir.path().join("q.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        r,
        qcow2.to_str().unwrap(),
    ]);
    let q = qcow2.to_str().unwrap();
    // (arguments, what stderr names): each exits 1 with the reason.
    let refused: &[(&[&str], &str)] = &[
        (&["-f", "qcow2", "-t", "none", q], "no O_DIRECT mode"),
        (&["-s", "1000", r], "multiple of 512"),
        (
            &["-f", "raw", "/nonexistent/x.raw"],
            "cannot open the image",
        ),
        // A qcow2 file opened as raw is just bytes; a raw file opened as qcow2 is refused.
        (&["-f", "qcow2", r], "cannot open the image"),
        // A request that runs past the end of the image fails as in QEMU.
        (&["-c", "2", "-o", "62k", r], "failed: status 1"),
    ];
    for (args, why) in refused {
        let out = blk_bench(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    // Usage errors are clap's: exit 2.
    assert_eq!(blk_bench(&["-d", "0", r]).status.code(), Some(2));
    assert_eq!(blk_bench(&["-i", "native", r]).status.code(), Some(2));
}
