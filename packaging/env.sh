# Sourced by the top-level scripts (main.sh, test.sh, bench.sh): re-runs the caller as
# root if needed, moves to the checkout, and points every cache outside it.
checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$checkout"
[ "$(id -u)" = 0 ] || exec sudo -E bash "$0" "$@"
export LAZY_EROFS_CACHE=${LAZY_EROFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lazy-erofs}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$LAZY_EROFS_CACHE/target}
