#!/usr/bin/env bash
# Fetch a Linux guest kernel for vmkit's Linux boot tests and measurements, at test time
# (never committed): Debian's linux-image-6.12.*-cloud-amd64-unsigned, newest available, from
# the Debian archive with apt-get, as PLATFORM.md describes.
#
#   scripts/fetch-linux-guest.sh OUTDIR
#
# Writes OUTDIR/vmlinuz (the bzImage as shipped), OUTDIR/vmlinux (the uncompressed ELF: the
# bzImage's payload is zstd, starting at the first zstd magic 28 b5 2f fd) and
# OUTDIR/version. Needs root (apt-get) or the packages already cached; installs zstd if missing.
set -euo pipefail
out=${1:?usage: fetch-linux-guest.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -s "$out/vmlinux" ] && [ -s "$out/version" ]; then
    echo "guest kernel already in $out: $(cat "$out/version")"
    exit 0
fi
command -v zstd >/dev/null 2>&1 || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zstd
}
pkg=$(apt-cache search --names-only '^linux-image-6\.12\..*-cloud-amd64-unsigned$' 2>/dev/null \
    | awk '{print $1}' | sort -V | tail -n 1)
if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(apt-cache search --names-only '^linux-image-6\.12\..*-cloud-amd64-unsigned$' \
        | awk '{print $1}' | sort -V | tail -n 1)
fi
[ -n "$pkg" ] || { echo "no linux-image-6.12 cloud package found" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq "$pkg")
dpkg-deb -x "$work"/*.deb "$work/x"
vmlinuz=$(ls "$work"/x/boot/vmlinuz-* | head -n 1)
cp "$vmlinuz" "$out/vmlinuz"
# The payload's zstd frame: the first 28 b5 2f fd after the setup code.
offset=$(LC_ALL=C grep -obUaP '\x28\xb5\x2f\xfd' "$out/vmlinuz" | head -n 1 | cut -d: -f1)
[ -n "$offset" ] || { echo "no zstd payload in $vmlinuz" >&2; exit 1; }
tail -c +"$((offset + 1))" "$out/vmlinuz" | zstd -dq > "$out/vmlinux" 2>/dev/null || true
head -c 4 "$out/vmlinux" | grep -q $'\x7fELF' || { echo "no ELF in $vmlinuz" >&2; exit 1; }
echo "$pkg" > "$out/version"
echo "guest kernel: $pkg -> $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes)"
