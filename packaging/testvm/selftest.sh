#!/usr/bin/env bash
# Checks run.sh's contract: exit codes, output streaming, working directory, writable
# shares, environment passing, timeout (124) and VM failure (125).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
run=$TESTVM_DIR/run.sh
failures=0
expect() { # expect NAME WANT GOT
    if [ "$2" = "$3" ]; then echo "ok   $1"; else echo "FAIL $1: want '$2', got '$3'"; failures=$((failures + 1)); fi
}

share=$(mktemp -d)
trap 'rm -rf "$share"' EXIT
start=$(date +%s.%N)
out=$(LAZY_EROFS_SELFTEST=passed "$run" --share "$share" --env EXTRA=yes -- \
    bash -c 'uname -r; pwd; echo "$LAZY_EROFS_SELFTEST $EXTRA"; findmnt -no FSTYPE /scratch; echo written >'"$share"'/from-guest; exit 7')
rc=$?
wall=$(echo "$(date +%s.%N) - $start" | bc)
expect "command exit code passes through" 7 "$rc"
expect "kernel is 6.12" 6.12 "$(sed -n 1p <<<"$out" | cut -d. -f1,2)"
expect "working directory is the checkout" "$CHECKOUT" "$(sed -n 2p <<<"$out")"
expect "environment passes" "passed yes" "$(sed -n 3p <<<"$out")"
expect "scratch is ext4" ext4 "$(sed -n 4p <<<"$out")"
expect "share is writable" written "$(cat "$share/from-guest" 2>/dev/null)"
echo "     boot + command + power-off: ${wall}s wall"

out=$(LAZY_EROFS_SELFTEST=passed "$run" --init systemd -- \
    bash -c 'cat /proc/1/comm; systemctl is-system-running; pwd; echo "$LAZY_EROFS_SELFTEST"; exit 3')
rc=$?
expect "--init systemd: exit code passes through" 3 "$rc"
expect "--init systemd: PID 1 is systemd" systemd "$(sed -n 1p <<<"$out")"
expect "--init systemd: the system is up" running "$(sed -n 2p <<<"$out")"
expect "--init systemd: working directory is the checkout" "$CHECKOUT" "$(sed -n 3p <<<"$out")"
expect "--init systemd: environment passes" passed "$(sed -n 4p <<<"$out")"

"$run" -- false >/dev/null 2>&1
expect "false exits 1" 1 $?

"$run" --timeout 15 -- sleep 600 >/dev/null 2>&1
expect "timeout exits 124" 124 $?

"$run" --kernel /dev/null -- true >/dev/null 2>&1
expect "unbootable kernel exits 125" 125 $?

[ $failures = 0 ] || { echo "$failures run.sh contract checks failed"; exit 1; }
