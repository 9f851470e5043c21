#!/usr/bin/env bash
# The main job's story, on a kernel with cachefiles ondemand mode, as root:
#   docker-registry on loopback, the lazy-erofs snapshotter, containerd with it as a
#   proxy plugin; a Debian + python3 image converted and pushed; `lazy-erofs pull`;
#   `ctr run` of python; a container reading hundreds of files while its fetcher is
#   SIGKILLed; what was fetched. Prints each step with its time.
# Usage: run.sh BIN_DIR LAYERS_DIR WORK_DIR   (WORK_DIR on a disk filesystem, not tmpfs)
set -euo pipefail
bin=$1 layers=$2 work=$3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$work"
work=$(mktemp -d "$work/demo.XXXXXX")
. "$here/lib.sh"
trap stop_all EXIT

host=127.0.0.1:$(free_port)
image=$host/demo/python:3
start_registry "$host"
step "docker-registry serving on $host"

python3 "$here/oci-layout.py" "$work/layout" '["python3"]' \
    "$layers/base.tar" "$layers/packages.tar" "$layers/python.tar"
size=$(du -cb "$layers"/{base,packages,python}.tar | tail -1 | cut -f1)
start=$(date +%s.%N)
"$bin/lazy-erofs" convert "oci:$work/layout" "$image" --insecure "$host" >"$work/convert.log" 2>&1 ||
    { cat "$work/convert.log" >&2; exit 1; }
step "converted and pushed Debian bookworm + python3 ($((size >> 20)) MiB of tar, 3 layers) as $image in $(elapsed_ms "$start") ms"

start_snapshotter "$host"
step "lazy-erofs-snapshotter serving; /dev/cachefiles bound, fetcher pid $(cat "$work/snapshotter/fetcher/fetcher.pid")"

start_containerd
step "containerd $(command ctr --version | awk '{print $3}') serving with lazy-erofs as a proxy snapshotter"

cold=$(date +%s.%N)
"$bin/lazy-erofs" pull --address "$work/containerd.sock" --insecure "$host" "$image" | sed 's/^/    /'
step "lazy-erofs pull: $(elapsed_ms "$cold") ms"
out=$(ctr run --rm --snapshotter lazy-erofs "$image" hello python3 -c \
    "import json, sqlite3, hashlib; print(json.dumps({'sqlite': sqlite3.sqlite_version, 'sha256': hashlib.sha256(b'lazy-erofs').hexdigest()[:16]}))")
step "python3 in the container said $out — $(elapsed_ms "$cold") ms after the pull began"

echo "    registry sent $(( $(registry_blob_bytes) >> 10 )) KiB of layer data so far (image: $(( size >> 10 )) KiB of tar)"

pidfile=$work/snapshotter/fetcher/fetcher.pid
start=$(date +%s.%N)
ctr run --snapshotter lazy-erofs "$image" reader sh -c \
    'find /usr/lib /usr/share -type f -print0 | xargs -0 cat | sha256sum' >"$work/reader.out" 2>&1 &
reader=$!
kills=0
for _ in 1 2 3; do
    sleep 1.5
    kill -0 "$reader" 2>/dev/null || break
    old=$(cat "$pidfile")
    kill -9 "$old" && kills=$((kills + 1))
    step "killed the fetcher (pid $old) while the container reads"
    wait_for "a new fetcher" sh -c "[ \"\$(cat $pidfile)\" != $old ]"
    step "new fetcher pid $(cat "$pidfile") serving (restore written: in-flight reads resumed)"
done
status=0
wait "$reader" || status=$?
ctr tasks rm reader >/dev/null 2>&1 || true
ctr containers rm reader >/dev/null 2>&1 || true
step "reader exited $status after $(elapsed_ms "$start") ms and $kills fetcher kills: $(cut -c1-16 "$work/reader.out")…"
[ "$status" = 0 ] || { echo "demo: the reader failed:"; cat "$work/reader.out"; exit 1; }
if grep -q "Input/output error" "$work/reader.out"; then echo "demo: EIO reached the container" >&2; exit 1; fi
echo "    registry sent $(( $(registry_blob_bytes) >> 10 )) KiB of layer data in all; $(grep -c 'fetcher exited; restarting' "$work/snapshotter.log") fetcher restarts logged"
step "done; logs in $work"
