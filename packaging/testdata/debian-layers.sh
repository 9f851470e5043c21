#!/usr/bin/env bash
# Builds two real OCI layer tars from Debian, cached outside the checkout:
#   base.tar      debootstrap --variant=minbase bookworm
#   packages.tar  the diff of installing a few packages on top (made with overlayfs:
#                 the upper dir is the layer; overlay whiteouts become OCI .wh. files)
# Prints the directory holding them. Needs root and deb.debian.org.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${LAZY_EROFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lazy-erofs}
key=$(cat "${BASH_SOURCE[0]}" "$here/upper-to-oci.py" | sha256sum | cut -c1-12)
out=$cache/testdata/debian-$key
packages=${DEBIAN_LAYER_PACKAGES:-"python3-minimal sqlite3 curl ca-certificates"}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
[ -f "$out/packages.tar" ] && { echo "$out"; exit 0; }
[ "$(id -u)" = 0 ] || { echo "debian-layers.sh: needs root" >&2; exit 1; }
work=$(mktemp -d "$cache/testdata-work.XXXXXX")
cleanup() {
    for m in "$work/merged/proc" "$work/merged/sys" "$work/merged/dev" "$work/merged"; do
        mountpoint -q "$m" && umount -l "$m"
    done
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work"/{base,upper,ovl-work,merged} "$out"
echo "debian-layers: debootstrap minbase bookworm" >&2
debootstrap --variant=minbase bookworm "$work/base" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; exit 1; }
# Reproducible enough for tests; the layer need not be bit-identical across runs.
rm -rf "$work/base/var/cache/apt/archives/"*.deb "$work/base/var/lib/apt/lists/"*
tar --format=pax --xattrs --xattrs-include='*' --numeric-owner -C "$work/base" -cf "$out/base.tar.tmp" .

echo "debian-layers: installing $packages in an overlay" >&2
mount -t overlay overlay -o "lowerdir=$work/base,upperdir=$work/upper,workdir=$work/ovl-work" "$work/merged"
mount -t proc proc "$work/merged/proc"
mount -t sysfs sysfs "$work/merged/sys"
mount --bind /dev "$work/merged/dev"
cp /etc/resolv.conf "$work/merged/etc/resolv.conf"
echo "deb $mirror bookworm main" >"$work/merged/etc/apt/sources.list"
chroot "$work/merged" /usr/bin/env DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $packages && apt-get clean && rm -rf /var/lib/apt/lists/*" \
    >"$work/apt.log" 2>&1 || { tail -20 "$work/apt.log" >&2; exit 1; }
umount "$work/merged/dev" "$work/merged/sys" "$work/merged/proc" "$work/merged"

# overlayfs upper → OCI layer: 0/0 char devices → .wh.NAME, opaque dirs → .wh..wh..opq
python3 "$here/upper-to-oci.py" "$work/upper"
tar --format=pax --xattrs --xattrs-include='*' --numeric-owner -C "$work/upper" -cf "$out/packages.tar.tmp" .
mv "$out/base.tar.tmp" "$out/base.tar"
mv "$out/packages.tar.tmp" "$out/packages.tar"
echo "$out"
