#!/usr/bin/env bash
# Timed libFuzzer runs (cargo-fuzz, nightly, address sanitizer) of vmkit's fuzz targets, from the
# committed seed corpora. CI runs it (.ci/run); run it by hand the same way.
#
# Usage: fuzz/timed.sh [TARGET]...     (default: every fuzz_targets/*.rs, so new targets join)
#
# Environment (defaults in brackets):
#   VMKIT_FUZZ_SECONDS   time budget per target, libFuzzer -max_total_time [45]
#   VMKIT_FUZZ_RSS_MB    -rss_limit_mb: an input growing the process beyond it is an OOM [2048]
#   VMKIT_FUZZ_TIMEOUT   -timeout: seconds one input may take before it is a hang [10]
#   VMKIT_FUZZ_WORK      where the corpus copies, logs and artifacts go [a fresh mktemp -d]
#
# Each target fuzzes a copy of corpus/<target>/ in $VMKIT_FUZZ_WORK/corpus/<target>/, so the
# tree stays clean; what it grew there can be merged back with fuzz/cmin.sh -a.
# A crash, timeout, OOM or leak makes the script exit 1 after all targets ran, printing the
# target, the artifact and its bytes (base64, and hex for the first 4 KiB) for each finding.
# Save the base64 as a file and replay it with `cargo +nightly fuzz run <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")"

secs=${VMKIT_FUZZ_SECONDS:-45}
rss=${VMKIT_FUZZ_RSS_MB:-2048}
per_input=${VMKIT_FUZZ_TIMEOUT:-10}
work=${VMKIT_FUZZ_WORK:-$(mktemp -d /tmp/vmkit-fuzz.XXXXXX)}
mkdir -p "$work"

if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in fuzz_targets/*.rs; do
        t=${f##*/}
        targets+=("${t%.rs}")
    done
fi

echo "fuzzing ${#targets[@]} targets for ${secs}s each (rss ${rss} MB, timeout ${per_input}s per input) in $work"
# One ASAN build of every target up front, so the budgets below are spent fuzzing.
cargo +nightly fuzz build

failed=()
summary=()
for t in "${targets[@]}"; do
    corpus="$work/corpus/$t" art="$work/artifacts/$t" log="$work/$t.log"
    mkdir -p "$corpus" "$art"
    if [ -d "corpus/$t" ]; then
        cp -R "corpus/$t/." "$corpus/"
    fi
    seeds=$(find "$corpus" -type f | wc -l)
    printf '\n--- %s: %s seeds, %ss\n' "$t" "$seeds" "$secs"
    start=$(date +%s)
    rc=0
    cargo +nightly fuzz run "$t" "$corpus" -- \
        -max_total_time="$secs" -rss_limit_mb="$rss" -timeout="$per_input" \
        -artifact_prefix="$art/" -print_final_stats=1 >"$log" 2>&1 || rc=$?
    took=$(($(date +%s) - start))
    # libFuzzer's last status line (`#N DONE cov: C ft: F corp: ...`) and final stats.
    status=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$status")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$status")
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    eps=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    peak=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log" | tail -1)
    grown=$(find "$corpus" -type f | wc -l)
    line=$(printf '%-14s %5ss  execs %10s  exec/s %7s  cov %5s  ft %6s  corpus %5s -> %-5s  peak %4s MB' \
        "$t" "$took" "${execs:-?}" "${eps:-?}" "${cov:-?}" "${ft:-?}" "$seeds" "$grown" "${peak:-?}")
    if [ "$rc" -eq 0 ]; then
        summary+=("ok    $line")
        echo "ok: $line"
        continue
    fi
    summary+=("FAIL  $line")
    failed+=("$t")
    echo "FINDING in target $t (exit $rc); libFuzzer said:"
    grep -E -A1 'panicked|ERROR: libFuzzer|ERROR: AddressSanitizer|out-of-memory|timeout after' "$log" | head -20 || true
    tail -40 "$log"
    shopt -s nullglob
    artifacts=("$art"/*)
    shopt -u nullglob
    if [ ${#artifacts[@]} -eq 0 ]; then
        echo "(no artifact written; the log is $log)"
    fi
    for a in "${artifacts[@]}"; do
        echo "reproducer $t/${a##*/} ($(wc -c <"$a") bytes), base64:"
        base64 -w0 "$a"
        echo
        echo "hex (first 4 KiB):"
        head -c 4096 "$a" | od -An -v -tx1 | tr -d ' \n'
        echo
    done
done

printf '\n--- timed fuzzing summary (%ss per target; cov/ft from libFuzzer'"'"'s last status line)\n' "$secs"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FUZZING FAILED for: ${failed[*]} (reproducers above; logs and artifacts in $work)"
    exit 1
fi
