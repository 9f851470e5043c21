#!/usr/bin/env bash
# Prints the path of a test VM kernel (bzImage) whose config satisfies its fragment:
# series 6 (default) kernel.config from linux-source-6.12, series 7 (LAZY_EROFS_KERNEL_SERIES=7)
# kernel-7.config from linux-source-7.3.
#   kernel.sh           first match of: $LAZY_EROFS_KERNEL, the cache, the prebuilt kernel in
#                       ../shared/testvm (bzImage, bzImage-7.3), else build and cache it
#   kernel.sh --build   always build (into the cache), ignoring prebuilt kernels
# The cache key is the fragment's hash plus the linux-source version, so editing the
# fragment or upgrading the source package triggers a rebuild.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

force_build=0
case "${1:-}" in
    --build) force_build=1 ;;
    '') ;;
    *) testvm_die "usage: kernel.sh [--build]" ;;
esac

# A kernel is usable when its embedded config satisfies every line of the fragment.
kernel_matches() {
    local image=$1 cfg bad
    cfg=$(mktemp)
    if ! python3 "$TESTVM_DIR/ikconfig.py" "$image" >"$cfg"; then
        rm -f "$cfg"; return 1
    fi
    bad=$(config_mismatches "$cfg")
    rm -f "$cfg"
    if [ -n "$bad" ]; then
        testvm_log "$image does not match kernel.config:"; printf '  %s\n' $bad >&2
        return 1
    fi
}

if [ -n "${LAZY_EROFS_KERNEL:-}" ] && [ $force_build = 0 ]; then
    kernel_matches "$LAZY_EROFS_KERNEL" || testvm_die "LAZY_EROFS_KERNEL=$LAZY_EROFS_KERNEL lacks options the tests need"
    echo "$LAZY_EROFS_KERNEL"; exit 0
fi

src_tar=/usr/src/$KERNEL_SOURCE.tar.xz
src_version=$(dpkg-query -W -f='${Version}' "$KERNEL_SOURCE" 2>/dev/null || echo none)
cached=$LAZY_EROFS_CACHE/kernel/$(fragment_hash)-$src_version/bzImage
if [ $force_build = 0 ]; then
    [ -f "$cached" ] && { echo "$cached"; exit 0; }
    if [ -f "$SHARED_KERNEL" ] && kernel_matches "$SHARED_KERNEL"; then
        echo "$SHARED_KERNEL"; exit 0
    fi
fi

[ -f "$src_tar" ] || testvm_die "$src_tar missing: run packaging/setup.sh (installs $KERNEL_SOURCE)"
build=$LAZY_EROFS_CACHE/kernel-build-$KERNEL_SERIES
tree=$build/$KERNEL_SOURCE
if [ ! -f "$build/.unpacked-$src_version" ]; then
    testvm_log "unpacking $src_tar"
    rm -rf "$build"; mkdir -p "$build"
    tar -C "$build" -xf "$src_tar"
    touch "$build/.unpacked-$src_version"
fi
cd "$tree"
make -s tinyconfig >/dev/null
scripts/kconfig/merge_config.sh -m .config "$KERNEL_FRAGMENT" >/dev/null
make -s olddefconfig
bad=$(config_mismatches .config)
[ -z "$bad" ] || { printf '  %s\n' $bad >&2; testvm_die "kernel.config did not apply (options above were dropped by Kconfig)"; }
jobs=${JOBS:-$(( $(nproc) + 1 ))}
testvm_log "building bzImage with -j$jobs (about 13 min on 2 cores)"
start=$(date +%s)
make -s -j"$jobs" bzImage >"$build/make.log" 2>&1 || { tail -40 "$build/make.log" >&2; testvm_die "kernel build failed (log: $build/make.log)"; }
testvm_log "kernel built in $(( $(date +%s) - start ))s"
mkdir -p "$(dirname "$cached")"
cp arch/x86/boot/bzImage "$cached.tmp" && mv "$cached.tmp" "$cached"
echo "$cached"
