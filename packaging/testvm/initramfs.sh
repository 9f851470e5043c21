#!/usr/bin/env bash
# Prints the path of the stage-1 initramfs (busybox-static + init.stage1), building and
# caching it keyed by the init script and busybox binary.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
busybox=/bin/busybox
# grep reads the whole list: `grep -q` would stop at the match, and busybox, killed by
# SIGPIPE while it still writes, would fail the pipeline (pipefail) now and then.
[ -x "$busybox" ] && "$busybox" --list 2>/dev/null | grep -x switch_root >/dev/null ||
    testvm_die "$busybox (busybox-static) missing: run packaging/setup.sh"
key=$(cat "$TESTVM_DIR/init.stage1" "$busybox" | sha256sum | cut -c1-16)
out=$LAZY_EROFS_CACHE/initramfs/$key.cpio.gz
[ -f "$out" ] && { echo "$out"; exit 0; }
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,host,rw,newroot}
cp "$busybox" "$root/bin/busybox"
install -m 0755 "$TESTVM_DIR/init.stage1" "$root/init"
# The kernel prints nothing from /init unless /dev/console exists before devtmpfs.
mknod "$root/dev/console" c 5 1
mknod "$root/dev/null" c 1 3
mkdir -p "$(dirname "$out")"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 >"$out.tmp")
mv "$out.tmp" "$out"
echo "$out"
