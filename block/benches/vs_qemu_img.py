#!/usr/bin/env python3
"""Requests per second of vmkit-block (the `blk_bench` example) against `qemu-img bench`, on
the same image files, interleaved run by run (so a noisy neighbour hits both alike).

    cargo build --release -p vmkit-examples --bin blk_bench
    python3 block/benches/vs_qemu_img.py [--rounds N] [--dir DIR]

DIR (default /var/tmp) must be on a filesystem that allows O_DIRECT (ext4, xfs, btrfs; not
tmpfs). The script writes a 256 MiB raw image of random bytes there and converts it to a fully
allocated qcow2, runs every cell ROUNDS times per tool (alternating), prints each command line
once, and a markdown table: median (min-max) requests/s per tool and the ratio of medians,
with the min-max of the per-round ratios. Both images are removed at the end.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLK_BENCH = os.path.join(ROOT, "target", "release", "blk_bench")

# (format, cache, qemu aio, vmkit engine, depth, write, count)
# raw: O_DIRECT (-t none) with io_uring in both tools. qcow2: vmkit-block's qcow2 has no
# O_DIRECT mode, so both tools go through the page cache (-t writeback), QEMU with its default
# thread pool and vmkit with its (only) synchronous qcow2 engine.
CELLS = [
    ("raw", "none", "io_uring", "io_uring", 1, False, 4000),
    ("raw", "none", "io_uring", "io_uring", 1, True, 3000),
    ("raw", "none", "io_uring", "io_uring", 32, False, 40000),
    ("raw", "none", "io_uring", "io_uring", 32, True, 20000),
    ("qcow2", "writeback", "threads", "sync", 1, False, 40000),
    ("qcow2", "writeback", "threads", "sync", 1, True, 40000),
    ("qcow2", "writeback", "threads", "sync", 32, False, 100000),
    ("qcow2", "writeback", "threads", "sync", 32, True, 60000),
]

DONE = re.compile(r"Run completed in ([0-9.]+) seconds")


def commands(image, fmt, cache, qaio, engine, depth, write, count):
    common = ["-c", str(count), "-d", str(depth), "-s", "4096", "-f", fmt, "-t", cache]
    if write:
        common.append("-w")
    qemu = ["qemu-img", "bench"] + common + ["-i", qaio, image]
    vmkit = [BLK_BENCH] + common + ["-i", engine, image]
    return qemu, vmkit


def rate(cmd, count):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    m = DONE.search(out)
    if not m:
        sys.exit(f"no result from {' '.join(cmd)}:\n{out}")
    return count / float(m.group(1))


def spread(v):
    return statistics.median(v), min(v), max(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dir", default="/var/tmp")
    a = ap.parse_args()
    raw = os.path.join(a.dir, "vs_qemu_img.raw")
    qcow2 = os.path.join(a.dir, "vs_qemu_img.qcow2")
    with open(raw, "wb") as f:
        for _ in range(256):
            f.write(os.urandom(1 << 20))
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
    os.sync()
    rows = []
    try:
        for fmt, cache, qaio, engine, depth, write, count in CELLS:
            image = raw if fmt == "raw" else qcow2
            qemu, vmkit = commands(image, fmt, cache, qaio, engine, depth, write, count)
            print("$", " ".join(qemu), flush=True)
            print("$", " ".join(vmkit), flush=True)
            q, v = [], []
            for _ in range(a.rounds):
                q.append(rate(qemu, count))
                v.append(rate(vmkit, count))
            ratios = [x / y for x, y in zip(v, q)]
            rows.append((fmt, cache, depth, write, spread(q), spread(v), spread(ratios)))
    finally:
        os.remove(raw)
        os.remove(qcow2)
    print()
    print("| image | cache | depth | op | qemu-img bench req/s | blk_bench req/s | vmkit / QEMU |")
    print("|---|---|---|---|---|---|---|")
    for fmt, cache, depth, write, q, v, r in rows:
        print(
            f"| {fmt} | {cache} | {depth} | {'write' if write else 'read'} "
            f"| {q[0]:,.0f} ({q[1]:,.0f}–{q[2]:,.0f}) "
            f"| {v[0]:,.0f} ({v[1]:,.0f}–{v[2]:,.0f}) "
            f"| **{v[0] / q[0]:.2f}×** ({r[1]:.2f}–{r[2]:.2f}) |"
        )


if __name__ == "__main__":
    main()
