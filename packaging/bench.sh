#!/usr/bin/env bash
# Runs the benchmarks (release build) and prints their figures: layer conversion and
# snapshotter call latency and an unshaped cold start on the host, lazy reads and cold
# starts in the test VMs.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash packaging/setup.sh
cargo build --release --locked --bins
echo "=== conversion (host)"
convert_bench=$(cargo bench --locked -p lazy-erofs-image --bench convert --no-run --message-format json 2>/dev/null |
    jq -r 'select(.profile.test == true and .target.name == "convert") | .executable' | tail -n1)
"$convert_bench"
echo "=== snapshotter Prepare/Commit/Remove latency vs overlayfs (host, containerd's Go harness)"
LAZY_EROFS_BENCH=1 bash packaging/conformance.sh "$CARGO_TARGET_DIR/release/lazy-erofs-snapshotter" \
    -run TestProxyLatency -v | grep -v -e '^=== RUN' -e '^--- PASS' -e '^PASS' -e '^ok '
echo "=== lazy reads, fanotify backend (host kernel, registry on loopback)"
fanotify_bench=$(cargo bench --locked -p lazy-erofs-cmd --bench fanotify --no-run --message-format json 2>/dev/null |
    jq -r 'select(.profile.test == true and .target.name == "fanotify") | .executable' | tail -n1)
[ -x "$fanotify_bench" ] || { echo "fanotify bench binary not found" >&2; exit 1; }
"$fanotify_bench"
echo "=== cold start of a python image on the host (fanotify, unshaped: no netem here), medians of 3"
host_work=$(mktemp -d)
PROFILES=unshaped REPEAT=3 bash packaging/demo/cold-start.sh "$CARGO_TARGET_DIR/release" \
    "$(bash packaging/testdata/debian-layers.sh)" "$host_work"
rm -rf "$host_work" # ~300 MB: the registry's blobs and the image layout
echo "=== lazy reads, cachefiles backend (test VM)"
bench=$(cargo bench --locked -p lazy-erofs-cmd --bench ondemand --no-run --message-format json 2>/dev/null |
    jq -r 'select(.profile.test == true and .target.name == "ondemand") | .executable' | tail -n1)
[ -x "$bench" ] || { echo "bench binary not found" >&2; exit 1; }
packaging/testvm/run.sh --mem 6G -- "$bench"
layers=$(bash packaging/testdata/debian-layers.sh)
# Both backends: cachefiles in the 6.12 VM, fanotify in the 7.3 VM (no fscache there).
for series in 6 7; do
    echo "=== cold start of a python image: lazy-erofs vs overlayfs, shaped link (test VM, kernel series $series)"
    # REPEAT=N (default 1) runs each setting N times and prints medians as well.
    packaging/testvm/run.sh --kernel-series "$series" --mem 6G -- env REPEAT="${REPEAT:-1}" \
        bash "$PWD/packaging/demo/cold-start.sh" \
        "$CARGO_TARGET_DIR/release" "$layers" /scratch
done
