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
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

t0=$(date +%s.%N)
step() { printf '[%6.2f s] %s\n' "$(awk "BEGIN { print $(date +%s.%N) - $t0 }")" "$*"; }
elapsed_ms() { awk "BEGIN { printf \"%d\", ($(date +%s.%N) - $1) * 1000 }"; }
wait_for() { # wait_for WHAT COMMAND…
    local what=$1; shift
    for _ in $(seq 1 300); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "demo: $what did not come up" >&2; return 1
}

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
host=127.0.0.1:$port
image=$host/demo/python:3
cat >"$work/registry.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: $host
YML
docker-registry serve "$work/registry.yml" >"$work/registry-access.log" 2>"$work/registry.log" &
pids+=($!)
wait_for docker-registry curl -sf "http://$host/v2/"
step "docker-registry serving on $host"

python3 "$here/oci-layout.py" "$work/layout" '["python3"]' \
    "$layers/base.tar" "$layers/packages.tar" "$layers/python.tar"
size=$(du -cb "$layers"/{base,packages,python}.tar | tail -1 | cut -f1)
start=$(date +%s.%N)
"$bin/lazy-erofs" convert "oci:$work/layout" "$image" --insecure "$host" >"$work/convert.log" 2>&1 ||
    { cat "$work/convert.log" >&2; exit 1; }
step "converted and pushed Debian bookworm + python3 ($((size >> 20)) MiB of tar, 3 layers) as $image in $(elapsed_ms "$start") ms"

cat >"$work/snapshotter.toml" <<TOML
[snapshotter]
root = "$work/snapshotter"
address = "$work/snapshotter.sock"
fscache_tag = "lazy-erofs-demo"
[registry]
insecure_hosts = ["$host"]
TOML
"$bin/lazy-erofs-snapshotter" --config "$work/snapshotter.toml" 2>"$work/snapshotter.log" &
pids+=($!)
wait_for snapshotter test -S "$work/snapshotter.sock"
wait_for fetcher test -s "$work/snapshotter/fetcher/fetcher.pid"
step "lazy-erofs-snapshotter serving; /dev/cachefiles bound, fetcher pid $(cat "$work/snapshotter/fetcher/fetcher.pid")"

cat >"$work/containerd.toml" <<TOML
version = 2
root = "$work/containerd/root"
state = "$work/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd.sock"
[proxy_plugins]
  [proxy_plugins.lazy-erofs]
    type = "snapshot"
    address = "$work/snapshotter.sock"
TOML
containerd --config "$work/containerd.toml" 2>"$work/containerd.log" &
pids+=($!)
ctr() { command ctr --address "$work/containerd.sock" "$@"; }
wait_for containerd ctr version
step "containerd $(command ctr --version | awk '{print $3}') serving with lazy-erofs as a proxy snapshotter"

cold=$(date +%s.%N)
"$bin/lazy-erofs" pull --address "$work/containerd.sock" --insecure "$host" "$image" | sed 's/^/    /'
step "lazy-erofs pull: $(elapsed_ms "$cold") ms"
out=$(ctr run --rm --snapshotter lazy-erofs "$image" hello python3 -c \
    "import json, sqlite3, hashlib; print(json.dumps({'sqlite': sqlite3.sqlite_version, 'sha256': hashlib.sha256(b'lazy-erofs').hexdigest()[:16]}))")
step "python3 in the container said $out — $(elapsed_ms "$cold") ms after the pull began"

fetched() { # bytes the registry sent for blob GETs
    awk '/"GET [^"]*\/blobs\/sha256:/ { split($0, q, "\""); split(q[3], f, " "); s += f[2] } END { print s + 0 }' \
        "$work/registry-access.log"
}
echo "    registry sent $(( $(fetched) >> 10 )) KiB of layer data so far (image: $(( size >> 10 )) KiB of tar)"

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
echo "    registry sent $(( $(fetched) >> 10 )) KiB of layer data in all; $(grep -c 'fetcher exited; restarting' "$work/snapshotter.log") fetcher restarts logged"
step "done; logs in $work"
