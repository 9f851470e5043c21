#!/usr/bin/env bash
# containerd's snapshotter conformance suite against lazy-erofs-snapshotter, through
# containerd's proxy client. GOPATH mode with Debian's Go packages: offline, no modules.
# Usage: conformance.sh SNAPSHOTTER_BINARY [go test args…]   (root: the suite mounts)
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

binary=$(realpath "${1:?usage: conformance.sh SNAPSHOTTER_BINARY [go test args]}")
shift
suite=/usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite
[ -d "$suite" ] || {
    echo "containerd's test suite is missing ($suite): run packaging/setup.sh" >&2
    exit 2
}

gopath=$(mktemp -d)
trap 'rm -rf "$gopath"' EXIT
mkdir -p "$gopath/src/lazyerofs"
ln -s "$checkout/snapshotter/conformance" "$gopath/src/lazyerofs/conformance"
export GO111MODULE=off GOPROXY=off GOPATH="$gopath:/usr/share/gocode"
export GOCACHE="$LAZY_EROFS_CACHE/go-build"
cd "$gopath/src/lazyerofs/conformance"
LAZY_EROFS_SNAPSHOTTER=$binary go test -count=1 "$@" .
