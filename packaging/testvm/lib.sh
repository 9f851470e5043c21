# Shared by the test VM scripts. Source it; it defines paths and small helpers.
TESTVM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$TESTVM_DIR/../.." && pwd)
# Everything expensive (kernel, initramfs, cargo target dir) is cached outside the checkout.
LAZY_EROFS_CACHE=${LAZY_EROFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lazy-erofs}
# Two test kernels: series 6 (linux-source-6.12: cachefiles ondemand) and series 7
# (linux-source-7.3: no fscache; fanotify pre-content, file-backed EROFS, ublk).
KERNEL_SERIES=${LAZY_EROFS_KERNEL_SERIES:-6}
case "$KERNEL_SERIES" in
    6) KERNEL_SOURCE=linux-source-6.12 KERNEL_FRAGMENT=$TESTVM_DIR/kernel.config shared_name=bzImage ;;
    7) KERNEL_SOURCE=linux-source-7.3 KERNEL_FRAGMENT=$TESTVM_DIR/kernel-7.config shared_name=bzImage-7.3 ;;
    *) printf 'testvm: error: unknown kernel series %s (6 or 7)\n' "$KERNEL_SERIES" >&2; exit 1 ;;
esac
SHARED_KERNEL=${LAZY_EROFS_SHARED_KERNEL:-$(cd "$CHECKOUT/.." && pwd)/shared/testvm/$shared_name}

testvm_log() { printf 'testvm: %s\n' "$*" >&2; }
testvm_die() { testvm_log "error: $*"; exit 1; }

# Prints the CONFIG_ lines of the fragment that the given full config does not satisfy.
# "=n" is satisfied by "# ... is not set" or by absence.
config_mismatches() {
    local full=$1 key want have
    while IFS='=' read -r key want; do
        case "$key" in ''|'#'*) continue ;; esac
        have=$(grep -E "^$key=" "$full" | head -n1 | cut -d= -f2-)
        if [ "$want" = n ]; then
            [ -z "$have" ] || [ "$have" = n ] || echo "$key=$want (have $have)"
        elif [ "$have" != "$want" ]; then
            echo "$key=$want (have ${have:-unset})"
        fi
    done <"$KERNEL_FRAGMENT"
}

fragment_hash() { sha256sum "$KERNEL_FRAGMENT" | cut -c1-16; }
