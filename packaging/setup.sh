#!/usr/bin/env bash
# Installs every system package the build, the tests and the test VM need on Debian 12.
# Idempotent: a second run changes nothing. Never upgrades libc6: trixie is pinned low
# and only named single packages are taken from it, each checked with a dry run first.
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { log "must run as root (apt)"; exit 1; }
. /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] || log "warning: written for Debian 12 (bookworm), this is ${PRETTY_NAME:-unknown}"

export DEBIAN_FRONTEND=noninteractive
sources=/etc/apt/sources.list.d/lazy-erofs.sources
pins=/etc/apt/preferences.d/lazy-erofs
want_sources='Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports trixie trixie-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
'
# trixie and trixie-backports below bookworm's 500 so nothing moves there unless named;
# bookworm-backports stays at its usual 100.
want_pins='Package: *
Pin: release n=trixie
Pin-Priority: 50

Package: *
Pin: release n=trixie-backports
Pin-Priority: 50
'
changed=0
# $(...) drops trailing newlines on both sides, so equal files compare equal.
if [ "$(cat "$sources" 2>/dev/null)" != "$(printf '%s' "$want_sources")" ]; then
    printf '%s' "$want_sources" >"$sources"; changed=1
fi
if [ "$(cat "$pins" 2>/dev/null)" != "$(printf '%s' "$want_pins")" ]; then
    printf '%s' "$want_pins" >"$pins"; changed=1
fi
stamp=/var/lib/apt/lists/.lazy-erofs-updated
if [ $changed = 1 ] || [ ! -e "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440 2>/dev/null)" ]; then
    log "apt-get update"
    apt-get update -qq
    touch "$stamp"
fi

# Backports packages are installed with -t so their dependencies come from backports too
# (built against bookworm's libc); trixie packages are named singly as name/trixie.
# Every dry run is checked for libc6/systemd moves before anything is installed.
default_packages=(
    # build: protobuf for tonic's codegen, C toolchain for -sys crates
    build-essential pkg-config protobuf-compiler
    # test VM: initramfs, guest scratch fs, reference EROFS tools
    busybox-static cpio e2fsprogs erofs-utils
    # kernel build (linux-source-6.12 comes from bookworm-security)
    linux-source-6.12 flex bison bc libelf-dev libssl-dev xz-utils
    # containers and a real registry
    runc docker-registry debootstrap skopeo apache2-utils
    # containerd's snapshotter conformance suite (GOPATH mode, offline)
    golang-go golang-github-containerd-containerd-dev
    # tools the tests use
    python3 curl jq util-linux kmod iproute2 psmisc procps
    # the benchmark's blob storage behind a redirecting registry
    nginx
)
# QEMU 10 (matches the qemu-utils that Debian 12 images carry from backports)
backports_packages=(qemu-system-x86)
# containerd 1.7.24 (bookworm has 1.6), named singly: its dependencies stay bookworm's;
# the 7.x test VM kernel's source (a tarball; its dependencies are bookworm's)
trixie_packages=(containerd/trixie linux-source-7.3/trixie-backports)

missing_of() {
    local spec name
    for spec in "$@"; do
        name=${spec%%/*}
        dpkg-query -W -f='${Status}' "$name" 2>/dev/null | grep -q 'install ok installed' || printf '%s\n' "$name"
    done
}

install_group() {
    local release=$1; shift
    local -a missing=()
    local spec
    for spec in "$@"; do
        [ -n "$(missing_of "$spec")" ] && missing+=("$spec")
    done
    [ ${#missing[@]} = 0 ] && return 0
    local -a args=(--no-install-recommends)
    [ -n "$release" ] && args+=(-t "$release")
    log "installing${release:+ from $release}: ${missing[*]}"
    local plan
    plan=$(apt-get install -s "${args[@]}" "${missing[@]}")
    # bookworm point releases of these are fine; a trixie (Debian 13+) one is not.
    if grep -E '^Inst (libc6|libc-bin|systemd|libsystemd0) .*Debian:(1[3-9]|[2-9][0-9])' <<<"$plan"; then
        log "refusing: this install would move libc6 or systemd to a newer Debian (see lines above)"
        exit 1
    fi
    local aptlog
    aptlog=$(mktemp)
    if ! apt-get install -y -qq "${args[@]}" "${missing[@]}" >"$aptlog" 2>&1; then
        tail -n 40 "$aptlog" >&2; rm -f "$aptlog"
        log "apt-get install failed"; exit 1
    fi
    rm -f "$aptlog"
}

libc_before=$(dpkg-query -W -f='${Version}' libc6)
install_group "" "${default_packages[@]}"
install_group bookworm-backports "${backports_packages[@]}"
install_group "" "${trixie_packages[@]}"
libc_after=$(dpkg-query -W -f='${Version}' libc6)
case "$libc_after" in
    *deb12*|2.36-*) ;;
    *) log "libc6 left bookworm: $libc_before -> $libc_after"; exit 1 ;;
esac
log "all packages present (libc6 $libc_after)"
