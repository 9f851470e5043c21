# Shared by the main job (run.sh) and the cold-start benchmark (cold-start.sh): starting
# docker-registry, the lazy-erofs snapshotter and containerd under $work, as root, on a
# kernel with cachefiles ondemand mode. Each start_* leaves its pid in $pids.
pids=()
stop_all() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
}

t0=$(date +%s.%N)
now() { date +%s.%N; }
step() { printf '[%6.2f s] %s\n' "$(awk "BEGIN { print $(now) - $t0 }")" "$*"; }
elapsed_ms() { awk "BEGIN { printf \"%d\", ($(now) - $1) * 1000 }"; }
wait_for() { # wait_for WHAT COMMAND…
    local what=$1
    shift
    for _ in $(seq 1 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "$what did not come up" >&2
    return 1
}
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_registry HOST:PORT [NETNS]: docker-registry storing under $work/registry, its
# access log (one line per request, with bytes sent) in $work/registry-access.log. With
# REGISTRY_REDIRECT=1 it redirects every blob GET to its storage, served by nginx on port
# 5001 of the same address, as hosted registries redirect to S3 or a CDN (which, like
# nginx, keep connections alive between requests).
start_registry() {
    local host=$1 netns=${2:-} middleware=
    mkdir -p "$work/registry"
    if [ -n "${REGISTRY_REDIRECT:-}" ]; then
        local storage=${host%:*}:5001
        start_storage "$storage" "$netns"
        middleware=$(printf 'middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: http://%s' "$storage")
    fi
    cat >"$work/registry.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: $host
$middleware
YML
    ${netns:+ip netns exec "$netns"} docker-registry serve "$work/registry.yml" \
        >>"$work/registry-access.log" 2>>"$work/registry.log" &
    pids+=($!)
    wait_for docker-registry curl -sf "http://$host/v2/"
}

# start_storage HOST:PORT [NETNS]: nginx serving $work/registry read-only, keep-alive on,
# everything it writes under $work/nginx (the host's root is read-only in the test VM).
start_storage() {
    local listen=$1 netns=${2:-} dir=$work/nginx
    mkdir -p "$dir"
    cat >"$dir/nginx.conf" <<CONF
daemon off;
user root;
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 256; }
http {
    access_log $dir/access.log;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    sendfile on;
    keepalive_timeout 300s;
    keepalive_requests 100000;
    server {
        listen $listen;
        root $work/registry;
        location / { limit_except GET { deny all; } }
    }
}
CONF
    ${netns:+ip netns exec "$netns"} nginx -e "$dir/error.log" -c "$dir/nginx.conf" &
    pids+=($!)
    wait_for nginx curl -s -o /dev/null "http://$listen/"
}

# Bytes the registry sent in answer to blob GETs so far.
registry_blob_bytes() {
    awk '/"GET [^"]*\/blobs\/sha256:/ { split($0, q, "\""); split(q[3], f, " "); s += f[2] } END { print s + 0 }' \
        "$work/registry-access.log"
}

# start_snapshotter INSECURE_HOST: root $work/snapshotter, socket $work/snapshotter.sock.
start_snapshotter() {
    cat >"$work/snapshotter.toml" <<TOML
[snapshotter]
root = "$work/snapshotter"
address = "$work/snapshotter.sock"
fscache_tag = "lazy-erofs-demo"
[registry]
insecure_hosts = ["$1"]
${snapshotter_toml:-}
TOML
    # snapshotter_toml: more tables (e.g. [fetch]); snapshotter_log: its RUST_LOG.
    RUST_LOG=${snapshotter_log:-${RUST_LOG:-info}} \
        "$bin/lazy-erofs-snapshotter" --config "$work/snapshotter.toml" 2>>"$work/snapshotter.log" &
    snapshotter_pid=$!
    pids+=($!)
    wait_for snapshotter test -S "$work/snapshotter.sock"
    wait_for fetcher test -s "$work/snapshotter/fetcher/fetcher.pid"
}

# containerd with lazy-erofs as a proxy snapshotter, socket $work/containerd.sock.
start_containerd() {
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
    containerd --config "$work/containerd.toml" 2>>"$work/containerd.log" &
    containerd_pid=$!
    pids+=($!)
    wait_for containerd ctr version
}
ctr() { command ctr --address "$work/containerd.sock" "$@"; }
