#!/usr/bin/env bash
# Runs every test: formatting, lints, unit and integration tests on the host, then the
# privileged_vm_* tests inside the test VM. Installs what it needs first (root).
# Fails on the first failing stage. Caches live under $LAZY_EROFS_CACHE
# (default ~/.cache/lazy-erofs): cargo's target dir, the kernel, the initramfs.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

t0=$(date +%s)
stage() { printf '\n=== %s (%ss elapsed)\n' "$*" $(( $(date +%s) - t0 )); }

stage "setup"
bash packaging/setup.sh

stage "cargo fmt --check"
cargo fmt --all -- --check

stage "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

stage "fuzz target builds"
cargo check --manifest-path ondemand/fuzz/Cargo.toml --target-dir "$LAZY_EROFS_CACHE/fuzz-check"

stage "host tests"
cargo nextest run --workspace --locked

stage "host tests as root (privileged_host_*)"
cargo nextest run --workspace --locked --profile host-root

stage "containerd's snapshotter conformance suite (host, root)"
cargo build --workspace --locked --bin lazy-erofs-snapshotter
bash packaging/conformance.sh "$CARGO_TARGET_DIR/debug/lazy-erofs-snapshotter" -v -run TestLazyErofsConformance |
    grep -v -E "^=== (RUN|PAUSE|CONT)"

stage "test VM: kernel and initramfs"
kernel=$(packaging/testvm/kernel.sh)
echo "kernel: $kernel"

stage "test VM: run.sh contract"
LAZY_EROFS_KERNEL=$kernel bash packaging/testvm/selftest.sh

stage "test VM: privileged_vm_* tests"
archive=$LAZY_EROFS_CACHE/vm-tests.tar.zst
cargo nextest archive --workspace --locked --archive-file "$archive"
# Extracted on the scratch disk: the guest's /tmp is RAM. About 30 min under TCG.
packaging/testvm/run.sh --timeout 3000 --kernel "$kernel" -- bash -c 'mkdir -p /scratch/nextest-archive && exec "$@"' - \
    cargo nextest run --profile vm --archive-file "$archive" --workspace-remap "$checkout" \
    --extract-to /scratch/nextest-archive

stage "test VM with systemd as PID 1: the packaged unit restarted under readers"
packaging/testvm/run.sh --init systemd --kernel "$kernel" -- bash -c 'mkdir -p /scratch/nextest-archive && exec "$@"' - \
    cargo nextest run --profile vm-systemd --archive-file "$archive" --workspace-remap "$checkout" \
    --extract-to /scratch/nextest-archive

stage "test VM 7.3 (no fscache): the fanotify backend's tests on that kernel"
kernel7=$(LAZY_EROFS_KERNEL_SERIES=7 packaging/testvm/kernel.sh)
echo "kernel: $kernel7"
packaging/testvm/run.sh --kernel-series 7 --kernel "$kernel7" -- bash -c 'mkdir -p /scratch/nextest-archive && exec "$@"' - \
    cargo nextest run --profile vm7 --archive-file "$archive" --workspace-remap "$checkout" \
    --extract-to /scratch/nextest-archive

stage "test VM 7.3 with systemd as PID 1: the fanotify backend restarted under readers"
packaging/testvm/run.sh --init systemd --kernel-series 7 --kernel "$kernel7" -- bash -c 'mkdir -p /scratch/nextest-archive && exec "$@"' - \
    cargo nextest run --profile vm7-systemd --archive-file "$archive" --workspace-remap "$checkout" \
    --extract-to /scratch/nextest-archive

stage "all tests passed"
