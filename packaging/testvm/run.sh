#!/usr/bin/env bash
# Boots the test VM and runs one command in it. Stable entry point: tests, benchmarks and
# outside checks call this; keep its options and exit codes compatible.
usage() {
    cat <<'EOT'
usage: packaging/testvm/run.sh [options] -- CMD [ARGS...]

Boots the test kernel (QEMU, TCG, no network card) with the host root shared read-only
over 9p and runs CMD as root in the checkout (same absolute path as on the host), with
the caller's PATH and HOME. CMD's output streams to stdout.
In the guest: loopback up, cgroup2 at /sys/fs/cgroup, an ext4 scratch disk at /scratch
(also in $LAZY_EROFS_SCRATCH), the root writable in RAM (tmpfs overlay).

options:
  -m, --mem SIZE        guest memory (default 4G)
  -c, --cpus N          guest CPUs (default: host CPUs)
  -t, --timeout SECS    stop the VM after SECS seconds (default 1800)
  -d, --disk SIZE       size of the sparse ext4 scratch disk (default 16G)
  -s, --share DIR       share host DIR read-write at the same path (repeatable)
  -e, --env NAME[=VAL]  pass an environment variable (repeatable); RUST_LOG,
                        RUST_BACKTRACE, CARGO_TARGET_DIR, NEXTEST_* and LAZY_EROFS_*
                        pass on their own
  -k, --kernel PATH     kernel to boot (default: what kernel.sh picks)
      --kernel-series N 6 (default: 6.12, cachefiles ondemand) or 7 (7.3: no fscache;
                        fanotify pre-content, file-backed EROFS); the guest sees
                        LAZY_EROFS_KERNEL_SERIES=N
      --init shell|systemd
                        shell (default): CMD runs as soon as the guest is set up;
                        systemd: Debian's systemd (from the host root) boots as PID 1
                        into a target of its own (basic.target, none of the host's
                        enabled services) and a service runs CMD once it is up
      --console         also stream the kernel console to stderr
      --keep            keep the run directory (console log, scratch disk) and print it

exit status: CMD's exit status; 124 on timeout; 125 when the VM failed
(did not boot, or died before CMD finished). The kernel console is printed on 124/125.
EOT
}
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

mem=4G cpus=$(nproc) timeout=1800 disk=16G kernel= console=0 keep=0 init=shell
shares=() envs=()
while [ $# -gt 0 ]; do
    case "$1" in
        -m|--mem) mem=$2; shift 2 ;;
        -c|--cpus) cpus=$2; shift 2 ;;
        -t|--timeout) timeout=$2; shift 2 ;;
        -d|--disk) disk=$2; shift 2 ;;
        -s|--share) shares+=("$(cd "$2" && pwd)") || testvm_die "no such directory: $2"; shift 2 ;;
        -e|--env) envs+=("$2"); shift 2 ;;
        -k|--kernel) kernel=$2; shift 2 ;;
        --kernel-series) export LAZY_EROFS_KERNEL_SERIES=$2; shift 2 ;;
        --init) init=$2; shift 2
            case "$init" in shell|systemd) ;; *) testvm_die "--init: shell or systemd, not '$init'" ;; esac ;;
        --console) console=1; shift ;;
        --keep) keep=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) usage >&2; exit 2 ;;
    esac
done
[ $# -gt 0 ] || { usage >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || testvm_die "qemu-system-x86_64 missing: run packaging/setup.sh"
[ -n "$kernel" ] || kernel=$("$TESTVM_DIR/kernel.sh")
initrd=$("$TESTVM_DIR/initramfs.sh")

mkdir -p "$LAZY_EROFS_CACHE/vm-runs"
run=$(mktemp -d "$LAZY_EROFS_CACHE/vm-runs/run.XXXXXX")
cleanup() { [ $keep = 1 ] && testvm_log "run directory kept: $run" || rm -rf "$run"; }
trap cleanup EXIT
mkdir "$run/ctl"

# The command, with the caller's environment essentials, as a bash script for the guest.
{
    echo 'set -e'
    printf 'export PATH=%q HOME=%q LAZY_EROFS_SCRATCH=/scratch LAZY_EROFS_IN_VM=1 LAZY_EROFS_KERNEL_SERIES=%q\n' "$PATH" "$HOME" "${LAZY_EROFS_KERNEL_SERIES:-6}"
    for name in $(compgen -e | grep -E '^(RUST_LOG|RUST_BACKTRACE|CARGO_TARGET_DIR|NEXTEST_.*|LAZY_EROFS_.*)$' || true); do
        printf 'export %s=%q\n' "$name" "${!name}"
    done
    for spec in "${envs[@]}"; do
        case "$spec" in
            *=*) printf 'export %s=%q\n' "${spec%%=*}" "${spec#*=}" ;;
            *) printf 'export %s=%q\n' "$spec" "${!spec-}" ;;
        esac
    done
    printf 'cd %q\n' "$CHECKOUT"
    echo 'set +e'
    printf 'exec'; printf ' %q' "$@"; echo
} >"$run/ctl/cmd.sh"

share_args=()
for i in "${!shares[@]}"; do
    echo "share$i ${shares[$i]}" >>"$run/ctl/shares"
    share_args+=(-virtfs "local,path=${shares[$i]},mount_tag=share$i,security_model=none,multidevs=remap")
done

truncate -s "$disk" "$run/scratch.img"
mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$run/scratch.img"

append="console=ttyS0 panic=-1 loglevel=6 lazyerofs.stage2=$TESTVM_DIR/guest-init.sh lazyerofs.init=$init"
: >"$run/console.log"
tail_pid=
if [ $console = 1 ]; then tail -f "$run/console.log" >&2 & tail_pid=$!; fi

start=$(date +%s.%N)
set +e
timeout --foreground -k 10 "$timeout" qemu-system-x86_64 \
    -accel tcg -cpu max -m "$mem" -smp "$cpus" \
    -display none -monitor none -no-reboot -nic none \
    -serial "file:$run/console.log" \
    -chardev stdio,id=cmdout -device virtio-serial-pci -device virtconsole,chardev=cmdout \
    -kernel "$kernel" -initrd "$initrd" -append "$append" \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs "local,path=$run/ctl,mount_tag=lectl,security_model=none,multidevs=remap" \
    "${share_args[@]}" \
    -drive "file=$run/scratch.img,format=raw,if=virtio,cache=unsafe" \
    -device virtio-rng-pci
qemu_rc=$?
set -e
wall=$(echo "$(date +%s.%N) - $start" | bc)
[ -n "$tail_pid" ] && kill "$tail_pid" 2>/dev/null

show_console() { testvm_log "kernel console (last 60 lines):"; tail -n 60 "$run/console.log" >&2; }
if [ $qemu_rc = 124 ] || [ $qemu_rc = 137 ]; then
    testvm_log "timeout after ${timeout}s"; show_console; exit 124
fi
if [ ! -f "$run/ctl/started" ]; then
    testvm_log "VM did not boot (qemu exit $qemu_rc)"; show_console; exit 125
fi
if [ ! -f "$run/ctl/exit_code" ]; then
    testvm_log "VM died while the command ran (qemu exit $qemu_rc)"; show_console; exit 125
fi
rc=$(cat "$run/ctl/exit_code")
testvm_log "command exit $rc; guest reached the command at $(cat "$run/ctl/started")s uptime; ${wall}s wall"
exit "$rc"
