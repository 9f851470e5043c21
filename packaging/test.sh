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
# The test binaries are archived and unpacked on the host, outside the target dir (so a
# build beside a VM run cannot swap them), and the guest runs them from there over the
# read-only share: unpacking in the guest took 5-9 min per boot under emulation.
archive=$LAZY_EROFS_CACHE/vm-tests.tar.zst
tests=$LAZY_EROFS_CACHE/vm-tests
cargo nextest archive --workspace --locked --zstd-level 1 --archive-file "$archive"
rm -rf "$tests" && mkdir -p "$tests" && tar --zstd -xf "$archive" -C "$tests"
vm_nextest() { # run.sh options... -- nextest profile
    local opts=()
    while [ "$1" != -- ]; do opts+=("$1"); shift; done
    packaging/testvm/run.sh "${opts[@]}" -- cargo nextest run --profile "$2" \
        --binaries-metadata "$tests/target/nextest/binaries-metadata.json" \
        --cargo-metadata "$tests/target/nextest/cargo-metadata.json" \
        --target-dir-remap "$tests/target" --workspace-remap "$checkout"
}
vm_nextest --timeout 3000 --kernel "$kernel" -- vm

stage "test VM with systemd as PID 1: the packaged unit restarted under readers"
vm_nextest --init systemd --kernel "$kernel" -- vm-systemd

stage "test VM 7.3 (no fscache): the fanotify backend's tests on that kernel"
kernel7=$(LAZY_EROFS_KERNEL_SERIES=7 packaging/testvm/kernel.sh)
echo "kernel: $kernel7"
vm_nextest --kernel-series 7 --kernel "$kernel7" -- vm7

stage "test VM 7.3 with systemd as PID 1: the fanotify backend restarted under readers"
vm_nextest --init systemd --kernel-series 7 --kernel "$kernel7" -- vm7-systemd

stage "all tests passed"
