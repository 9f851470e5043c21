#!/usr/bin/env bash
# Fuzzes the cachefiles message parser: packaging/fuzz.sh [SECONDS] (default 120).
# Needs cargo-fuzz (installed here if missing); libFuzzer's sanitizer flags need
# nightly features, enabled on the stable toolchain with RUSTC_BOOTSTRAP.
set -euo pipefail
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export LAZY_EROFS_CACHE=${LAZY_EROFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lazy-erofs}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
cd "$checkout/ondemand/fuzz"
CARGO_TARGET_DIR=$LAZY_EROFS_CACHE/fuzz-target RUSTC_BOOTSTRAP=1 \
    cargo fuzz run parse_message -- -max_total_time="${1:-120}"
