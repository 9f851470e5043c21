#!/usr/bin/env bash
# The main job: a lazily pulled Debian + python3 container with a fetcher killed under
# it (packaging/demo/run.sh). On a kernel with cachefiles ondemand mode it runs here;
# on one without (most distribution kernels) it boots the test VM and runs there.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

bash packaging/setup.sh
cargo build --release --locked --bins
bin=$CARGO_TARGET_DIR/release
echo "=== Debian layers (debootstrap + packages + python3; cached after the first run)"
layers=$(bash packaging/testdata/debian-layers.sh)

echo "=== this machine: lazy-erofs check"
if "$bin/lazy-erofs" check; then
    echo "=== this kernel has ondemand mode with failover: running here"
    bash packaging/demo/run.sh "$bin" "$layers" /var/tmp/lazy-erofs-demo
    exit 0
fi
echo
echo "=== no lazy pulling on this kernel: in the test VM"
packaging/testvm/run.sh -- bash -c '"$1" check --scratch-dir /scratch && bash "$2" "$3" "$4" /scratch' - \
    "$bin/lazy-erofs" "$PWD/packaging/demo/run.sh" "$bin" "$layers"
