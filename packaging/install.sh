#!/usr/bin/env bash
# Installs lazy-erofs on this machine: builds the release binaries, puts them in
# /usr/local/bin, the default config in /etc/lazy-erofs (kept if present), the systemd
# unit, and tells how to register the proxy plugin with containerd.
# Usage: packaging/install.sh [--no-start]
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

start=1
[ "${1:-}" = --no-start ] && start=0

cargo build --release --locked --bins
install -m 0755 "$CARGO_TARGET_DIR/release/lazy-erofs" "$CARGO_TARGET_DIR/release/lazy-erofs-snapshotter" /usr/local/bin/
install -d -m 0700 /etc/lazy-erofs
if [ ! -e /etc/lazy-erofs/config.toml ]; then
    install -m 0600 packaging/config.toml /etc/lazy-erofs/config.toml
else
    echo "keeping /etc/lazy-erofs/config.toml"
fi
install -m 0644 packaging/systemd/lazy-erofs-snapshotter.service /etc/systemd/system/

if ! grep -q 'proxy_plugins.lazy-erofs' /etc/containerd/config.toml 2>/dev/null; then
    echo "register the snapshotter with containerd: append packaging/containerd/proxy-plugin.toml"
    echo "to /etc/containerd/config.toml and restart containerd"
fi
if [ "$start" = 1 ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now lazy-erofs-snapshotter.service
    systemctl --no-pager status lazy-erofs-snapshotter.service | head -5
fi
