#!/usr/bin/env bash
# Minimise the committed seed corpora with `cargo fuzz cmin` (nightly), optionally merging in
# the inputs a longer run grew, so the committed seeds keep the coverage and stay small.
#
# Usage: fuzz/cmin.sh [-a DIR]... [TARGET]...
#   TARGET   targets to minimise (default: every fuzz_targets/*.rs)
#   -a DIR   also offer DIR/<target>/* as candidates, e.g. -a /tmp/vmkit-fuzz.XXXX/corpus after
#            `VMKIT_FUZZ_WORK=/tmp/vmkit-fuzz.XXXX fuzz/timed.sh` (repeatable)
#
# Files are kept in two kinds:
#   * named seeds (any name that is not 40 hex digits): written by the common crate's seed
#     generators and checked byte for byte by its tests, or regression inputs of fixed
#     findings (regress-*). They are always kept as they are.
#   * libFuzzer inputs (named by their SHA-1): replaced by what `cargo fuzz cmin` keeps of the
#     whole set (named seeds, current inputs and candidates), minus copies of named seeds.
#     Coverage is edges only unless VMKIT_CMIN_COUNTERS=1 (then hit counts too).
# Then review `git status fuzz/corpus` and commit; `cargo test --manifest-path fuzz/Cargo.toml`
# replays every kept input on stable.
set -euo pipefail
cd "$(dirname "$0")"

extra=()
while getopts "a:" o; do
    case $o in
    a) extra+=("$OPTARG") ;;
    *) sed -n '2,/^set /p' "$0" | sed '$d' >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in fuzz_targets/*.rs; do
        t=${f##*/}
        targets+=("${t%.rs}")
    done
fi

# Edge coverage only by default (libFuzzer -use_counters=0): hit-count buckets would keep
# several inputs per edge, ten times the files for little more reach.
if [ -n "${VMKIT_CMIN_COUNTERS:-}" ]; then counters=(-use_counters=1); else counters=(-use_counters=0); fi

is_hash() { [[ ${1##*/} =~ ^[0-9a-f]{40}$ ]]; }

for t in "${targets[@]}"; do
    dir="corpus/$t"
    mkdir -p "$dir"
    tmp=$(mktemp -d /tmp/vmkit-cmin.XXXXXX)
    for f in "$dir"/*; do [ -f "$f" ] && cp "$f" "$tmp/"; done
    for d in "${extra[@]}"; do
        [ -d "$d/$t" ] && find "$d/$t" -maxdepth 1 -type f -exec cp {} "$tmp/" \;
    done
    before=$(find "$dir" -type f | wc -l)
    offered=$(find "$tmp" -type f | wc -l)
    cargo +nightly fuzz cmin "$t" "$tmp" -- "${counters[@]}" >"$tmp.log" 2>&1 || {
        tail -20 "$tmp.log"
        echo "cmin of $t failed (log: $tmp.log); corpus/$t left as it was" >&2
        exit 1
    }
    # The named seeds' hashes: a kept input equal to one of them is not copied again.
    named=$(for f in "$dir"/*; do
        [ -f "$f" ] && ! is_hash "$f" && sha1sum <"$f" | cut -d' ' -f1
    done | sort -u)
    for f in "$dir"/*; do
        if [ -f "$f" ] && is_hash "$f"; then rm "$f"; fi
    done
    for f in "$tmp"/*; do
        [ -f "$f" ] || continue
        h=$(sha1sum <"$f" | cut -d' ' -f1)
        grep -qx "$h" <<<"$named" || cp "$f" "$dir/$h"
    done
    after=$(find "$dir" -type f | wc -l)
    echo "$t: $before files, $offered offered, $after kept ($(du -sh "$dir" | cut -f1))"
    rm -rf "$tmp" "$tmp.log"
done
