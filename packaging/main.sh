#!/usr/bin/env bash
# The main job. On a kernel with cachefiles ondemand mode it runs here; on one without
# (most distribution kernels) it boots the test VM and runs there.
# Today the job is the kernel check; it grows into a lazily pulled container.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

bash packaging/setup.sh
cargo build --release --locked --bins
cli=$CARGO_TARGET_DIR/release/lazy-erofs

echo "=== this machine: lazy-erofs check"
if "$cli" check; then
    echo "=== this kernel has ondemand mode with failover: nothing more to do here"
    exit 0
fi
echo
echo "=== no lazy pulling on this kernel; in the test VM: lazy-erofs check"
packaging/testvm/run.sh -- "$cli" check --scratch-dir /scratch
