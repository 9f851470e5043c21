#!/usr/bin/env bash
# Cold-start benchmark, as root on a kernel with either lazy backend (cachefiles ondemand
# mode, or fanotify pre-content events: the snapshotter picks one): the Debian +
# python3 image served by docker-registry in a network namespace behind a veth pair
# (shaped with tc netem per profile); containerd's overlayfs snapshotter with
# `ctr image pull` against lazy-erofs with `lazy-erofs pull`, same containerd, same
# registry. Cold start = pull + create + run until python's output; warm = run again.
# Lazy settings (SETTINGS="…"): on, off (readahead), nogap (readahead, but not of the
# chunks between two near reads), startup, eager (the start-up image,
# its regions behind the mounts or not), chunkN (the plain image converted in N KiB
# chunks, fetched in units of one chunk). REGISTRY_REDIRECT=1: the registry redirects
# blob GETs to its storage (see lib.sh); bytes are then counted as they leave the
# registry's namespace. REPEAT=N runs the settings N times, in passes of alternating
# direction (on nogap nogap on …), and prints each setting's medians
# (`cold_start_median`): identical runs in one VM run differed by up to a fifth.
# Usage: cold-start.sh BIN_DIR LAYERS_DIR WORK_DIR
set -euo pipefail
bin=$1 layers=$2 work=$3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
mkdir -p "$work"
work=$(mktemp -d "$work/bench.XXXXXX")
. "$here/lib.sh"
netns=lazy-erofs-bench
cleanup() {
    stop_all
    ip netns del "$netns" 2>/dev/null || true
    ip link del lzb0 2>/dev/null || true
}
trap cleanup EXIT

ip netns add "$netns"
ip link add lzb0 type veth peer name lzb1
ip link set lzb1 netns "$netns"
ip addr add 10.231.0.1/24 dev lzb0
ip link set lzb0 up
ip netns exec "$netns" ip addr add 10.231.0.2/24 dev lzb1
ip netns exec "$netns" ip link set lzb1 up
ip netns exec "$netns" ip link set lo up
host=10.231.0.2:5000
start_registry "$host" "$netns"
plain=$host/bench/python:gzip
lazy=$host/bench/python:lazy

python3 "$here/oci-layout.py" --gzip --ref "$plain" "$work/layout" '["python3"]' \
    "$layers/base.tar" "$layers/packages.tar" "$layers/python.tar"
"$bin/lazy-erofs" convert "oci:$work/layout" "$lazy" --insecure "$host" >"$work/convert.log" 2>&1 ||
    { cat "$work/convert.log" >&2; exit 1; }
start_snapshotter "$host"
start_containerd
backend=$(grep -o 'backend [a-z]*: ' "$work/snapshotter.log" | tail -n1 | cut -d' ' -f2 | tr -d :)
[ -n "$backend" ] || { echo "the snapshotter logged no backend" >&2; exit 1; }
tar -C "$work/layout" -cf "$work/plain.tar" .
ctr image import "$work/plain.tar" >/dev/null
ctr image push --plain-http "$plain" >/dev/null
ctr image rm --sync "$plain" >/dev/null
rm -f "$work/plain.tar"
gzip_bytes=$(du -cb "$work"/layout/blobs/sha256/* | tail -1 | cut -f1)
step "images pushed: $plain (gzip layers) and $lazy; lazy backend: $backend"

python_cmd=(python3 -c "import json, sqlite3, hashlib; print('ready')")
shape() { # shape none | RATE DELAY (one way; RTT is twice)
    for dev in "lzb0" "netns:lzb1"; do
        local cmd=(tc)
        [[ $dev == netns:* ]] && cmd=(ip netns exec "$netns" tc) dev=${dev#netns:}
        "${cmd[@]}" qdisc del dev "$dev" root 2>/dev/null || true
        [ "$1" = none ] || "${cmd[@]}" qdisc add dev "$dev" root netem rate "$1" delay "$2" limit 10000
    done
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# Blob GETs the registry answered so far.
registry_blob_gets() { grep -c '"GET [^"]*/blobs/sha256:' "$work/registry-access.log" || true; }
registry_mode=direct
if [ -n "${REGISTRY_REDIRECT:-}" ]; then
    registry_mode=redirect
    # Its storage sends the bytes: count what left the registry's namespace instead
    # (headers and manifests too).
    registry_blob_bytes() { ip netns exec "$netns" cat /sys/class/net/lzb1/statistics/tx_bytes; }
fi
# run_ms SNAPSHOTTER IMAGE ID: ms until the container's output is back.
run_ms() {
    local start out
    start=$(now)
    out=$(ctr run --rm --snapshotter "$1" "$2" "$3" "${python_cmd[@]}")
    [ "$out" = ready ] || { echo "container said: $out" >&2; return 1; }
    elapsed_ms "$start"
}
reset_node() { # a cold node: no images, no snapshots, no lazy cache
    local pid
    for pid in "$containerd_pid" "$snapshotter_pid"; do
        kill "$pid"
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work/snapshotter" "$work/containerd"
    start_snapshotter "$host"
    start_containerd
}

# The per-READ trace of a log on stdin, summed into one line (ms over all READs; stages
# of concurrent READs overlap).
read_trace() {
    awk -v what="$1" '
        / read_trace: / {
            for (i = 1; i <= NF; i++) {
                if ($i == "read_trace:") { kind = $(i + 1); n[kind]++ }
                if (split($i, kv, "=") == 2 && kv[1] ~ /_us$/) { sum[substr(kv[1], 1, length(kv[1]) - 3)] += kv[2] }
            }
        }
        END {
            line = "read_trace " what " reads=" n["read"] + 0 " units=" n["unit"] + 0 " datas=" n["data"] + 0
            split("total queue wait complete source write range decompress verify", stages, " ")
            for (s = 1; s <= 9; s++) line = line sprintf(" %s_ms=%.1f", stages[s], sum[stages[s]] / 1000)
            print line
        }'
}

# Each profile and setting's median cold start, floor and ratio (each run's own lazy /
# floor) over the `cold_start` lines on stdin, and the ratios in run order.
cold_start_medians() {
    awk '
        function median(list,   v, n, i, j, t) {
            n = split(list, v, ",")
            for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
            return n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2
        }
        function add(list, x) { return list == "" ? x : list "," x }
        {
            for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
            key = "profile=" f["profile"] " setting=" f["setting"] " backend=" f["backend"]
            if (!(key in runs)) order[++keys] = key
            runs[key]++
            lazy[key] = add(lazy[key], f["lazy_ms"]); floor[key] = add(floor[key], f["floor_ms"])
            ratio[key] = add(ratio[key], f["ratio"])
        }
        END {
            for (k = 1; k <= keys; k++) {
                key = order[k]
                printf "cold_start_median %s runs=%d lazy_ms=%d floor_ms=%d ratio=%.2f ratios=%s\n",
                    key, runs[key], median(lazy[key]), median(floor[key]), median(ratio[key]), ratio[key]
            }
        }'
}

# Warm starts, both images on one node: each run once (cold), then runs alternating
# overlayfs and lazy-erofs, the median of each (single runs under TCG vary by ±0.3 s).
# WARM_ONLY=1 stops after this, SKIP_WARM=1 skips it.
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
warm_compare() {
    local runs=${WARM_RUNS:-7} i o=() l=()
    reset_node
    drop_caches
    ctr image pull --plain-http --snapshotter overlayfs "$plain" >/dev/null
    "$bin/lazy-erofs" pull --address "$work/containerd.sock" --insecure "$host" "$lazy" >/dev/null
    run_ms overlayfs "$plain" w-o >/dev/null
    run_ms lazy-erofs "$lazy" w-l >/dev/null
    for i in $(seq 1 "$runs"); do
        o+=("$(run_ms overlayfs "$plain" "w-o-$i")")
        l+=("$(run_ms lazy-erofs "$lazy" "w-l-$i")")
    done
    warm_overlay=$(printf '%s\n' "${o[@]}" | median)
    warm_lazy=$(printf '%s\n' "${l[@]}" | median)
    step "warm starts, alternating: overlayfs ${o[*]} ms; lazy-erofs ${l[*]} ms"
    echo "warm_start runs=$runs lazy_ms=$warm_lazy overlay_ms=$warm_overlay" \
        "ratio=$(awk "BEGIN { printf \"%.2f\", $warm_lazy / $warm_overlay }") backend=$backend"
}
[ "${SKIP_WARM:-0}" = 1 ] || warm_compare
[ "${WARM_ONLY:-0}" = 1 ] && exit 0

# The start-up set: one cold run of the lazy image, then the files it read
# (`record-startup`); the image converted again with them laid out first.
startup=$host/bench/python:startup
reset_node
drop_caches
"$bin/lazy-erofs" pull --address "$work/containerd.sock" --insecure "$host" "$lazy" >/dev/null
run_ms lazy-erofs "$lazy" record >/dev/null
"$bin/lazy-erofs" record-startup --address "$work/snapshotter.sock" --image "$lazy" \
    -o "$work/startup.txt" 2>"$work/record.log" || { cat "$work/record.log" >&2; exit 1; }
recorded=$(grep '^recorded ' "$work/record.log")
read_bytes=$(sed 's/.* read_bytes=\([0-9]*\).*/\1/' <<<"$recorded")
echo "startup_set $recorded"
"$bin/lazy-erofs" convert "oci:$work/layout" "$startup" --insecure "$host" \
    --prefetch "$work/startup.txt" >>"$work/convert.log" 2>&1 ||
    { cat "$work/convert.log" >&2; exit 1; }
step "start-up set: $recorded; pushed $startup"

# lazy_pull IMAGE: `lazy-erofs pull`; prints the ms its manifest and config took (the
# rest of a pull is containerd's unpack and the snapshotter's Prepares).
lazy_pull() {
    local out
    out=$("$bin/lazy-erofs" pull --address "$work/containerd.sock" --insecure "$host" "$1")
    sed -n 's/.*(registry \([0-9]*\) ms, total .*/\1/p' <<<"$out"
}

# chunkN: the plain image converted with N KiB chunks, fetched in units of one chunk.
convert_chunks() { # KIB REF, once per REF
    grep -qx "$2" "$work/converted" 2>/dev/null && return 0
    "$bin/lazy-erofs" convert "oci:$work/layout" "$2" --insecure "$host" --chunk-kib "$1" \
        >>"$work/convert.log" 2>&1 || { cat "$work/convert.log" >&2; exit 1; }
    echo "$2" >>"$work/converted"
}

printf '\n| backend, profile | overlayfs cold | lazy-erofs cold | ratio | overlayfs warm | lazy-erofs warm | floor (all local, page cache dropped) | lazy bytes fetched / image |\n|---|---|---|---|---|---|---|---|\n' >"$work/table.md"
# label|rate|one-way delay (netem on both ends: RTT is twice the delay)|order of the
# lazy runs (readahead on and the start-up image each go first once: the second lazy
# run of a profile often measured slower whatever its setting, though two runs of one
# setting in one VM run differed by a fifth either way; REPEAT=3 for medians). "eager"
# is the start-up image with its regions fetched as each layer opens
# (`startup_yields = false`, as before they gave way to the mounts). SETTINGS="…" runs those settings in every
# profile instead; PROFILES=unshaped|shaped runs only that one.
for profile in "unshaped|||startup eager on off" "100 Mbit/s, 20 ms RTT|100mbit|10ms|eager startup on off"; do
    IFS='|' read -r label rate delay order <<<"$profile"
    case "${PROFILES:-both}:$rate" in unshaped:?* | shaped:) continue ;; esac
    order=${SETTINGS:-$order}
    # Passes alternate direction (A B, B A, A B …): later runs in one VM run measure
    # slower, so each setting's positions even out over two passes.
    order=$(for pass in $(seq 1 "${REPEAT:-1}"); do
        if [ $((pass % 2)) = 1 ]; then printf '%s ' $order; else printf '%s\n' $order | tac | tr '\n' ' '; fi
    done)
    if [ -z "$rate" ]; then shape none; else shape "$rate" "$delay"; fi

    reset_node
    drop_caches
    start=$(now)
    ctr image pull --plain-http --snapshotter overlayfs "$plain" >/dev/null
    run_ms overlayfs "$plain" o-cold >/dev/null
    overlay_cold=$(elapsed_ms "$start")
    overlay_warm=$(run_ms overlayfs "$plain" o-warm)

    # lazy-erofs with readahead off (the fetcher before it read ahead), on, and on with
    # the start-up image (its runs behind the mounts, or eager), each on a cold node,
    # traced (TRACE_LOG: the snapshotter's RUST_LOG); the floor: the same pull + run
    # again with every chunk it needs already in the cache and the page cache dropped.
    for setting in $order; do
        image=$lazy named="readahead $setting"
        case $setting in
        startup) image=$startup named="start-up files first" ;;
        eager) image=$startup named="start-up files first, fetched as layers open" ;;
        chunk*) image=$host/bench/python:$setting named="${setting#chunk} KiB chunks" ;;
        esac
        case $setting in
        off) snapshotter_toml=$(printf '[fetch]\nreadahead = 0\n') ;;
        nogap) snapshotter_toml=$(printf '[fetch]\nreadahead_gap = 0\n') ;;
        eager) snapshotter_toml=$(printf '[fetch]\nstartup_yields = false\n') ;;
        chunk*)
            convert_chunks "${setting#chunk}" "$image"
            snapshotter_toml=$(printf '[fetch]\nunit = %d\n' $((${setting#chunk} * 1024)))
            ;;
        *) snapshotter_toml= ;;
        esac
        snapshotter_log=${TRACE_LOG:-info,read_trace=debug}
        reset_node
        log_from=$(($(wc -l <"$work/snapshotter.log") + 1))
        drop_caches
        before=$(registry_blob_bytes) before_gets=$(registry_blob_gets)
        start=$(now)
        pull_meta_ms=$(lazy_pull "$image")
        pull_ms=$(elapsed_ms "$start")
        run_ms lazy-erofs "$image" "l-cold-$setting" >/dev/null
        lazy_cold=$(elapsed_ms "$start")
        fetched=$(( $(registry_blob_bytes) - before )) gets=$(( $(registry_blob_gets) - before_gets ))
        lazy_warm=$(run_ms lazy-erofs "$image" "l-warm-$setting")
        drop_caches
        start=$(now)
        floor_pull_meta_ms=$(lazy_pull "$image")
        floor_pull_ms=$(elapsed_ms "$start")
        run_ms lazy-erofs "$image" "l-floor-$setting" >/dev/null
        floor=$(elapsed_ms "$start")
        ratio=$(awk "BEGIN { printf \"%.2f\", $overlay_cold / $lazy_cold }")
        slug=$(printf '%s' "$label" | tr -c 'a-zA-Z0-9' '-' | tr -s '-' | sed 's/-$//')
        step "$label, $named: overlayfs cold ${overlay_cold} ms, lazy-erofs cold ${lazy_cold} ms (${ratio}x); warm ${overlay_warm} / ${lazy_warm} ms; floor ${floor} ms; lazy fetched $((fetched >> 10)) KiB of $((gzip_bytes >> 10)) KiB (gzip image)"
        printf '| %s, %s, %s | %d ms | %d ms | %sx | %d ms | %d ms | %d ms | %d / %d KiB |\n' "$backend" "$label" "$named" \
            "$overlay_cold" "$lazy_cold" "$ratio" "$overlay_warm" "$lazy_warm" "$floor" \
            $((fetched >> 10)) $((gzip_bytes >> 10)) >>"$work/table.md"
        echo "cold_start profile=$slug setting=$setting lazy_ms=$lazy_cold floor_ms=$floor" \
            "ratio=$(awk "BEGIN { printf \"%.2f\", $lazy_cold / $floor }")" \
            "overlay_ms=$overlay_cold warm_ms=$lazy_warm overlay_warm_ms=$overlay_warm fetched_bytes=$fetched" \
            "pull_ms=$pull_ms floor_pull_ms=$floor_pull_ms read_bytes=$read_bytes fetched_per_read=$(awk "BEGIN { printf \"%.2f\", $fetched / $read_bytes }")" \
            "pull_meta_ms=$pull_meta_ms floor_pull_meta_ms=$floor_pull_meta_ms registry_gets=$gets" \
            "registry=$registry_mode backend=$backend" | tee -a "$work/cold-start.lines"
        tail -n +"$log_from" "$work/snapshotter.log" | read_trace "backend=$backend profile=$slug setting=$setting"
    done
done
shape none
cat "$work/table.md"
[ "${REPEAT:-1}" -gt 1 ] && cold_start_medians <"$work/cold-start.lines"
true
