#!/usr/bin/env bash
# Builds three real OCI layer tars from Debian, cached outside the checkout:
#   base.tar      debootstrap --variant=minbase bookworm
#   packages.tar  the diff of installing a few packages on top (made with overlayfs:
#                 the upper dir is the layer; overlay whiteouts become OCI .wh. files)
#   python.tar    the diff of installing the full python3 (json, sqlite3, hashlib…) on
#                 top of both
# Prints the directory holding them. Needs root and deb.debian.org.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${LAZY_EROFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lazy-erofs}
key=$(cat "${BASH_SOURCE[0]}" "$here/upper-to-oci.py" | sha256sum | cut -c1-12)
out=$cache/testdata/debian-$key
packages=${DEBIAN_LAYER_PACKAGES:-"python3-minimal sqlite3 curl ca-certificates"}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
python_packages=${DEBIAN_PYTHON_PACKAGES:-"python3"}
[ -f "$out/python.tar" ] && { echo "$out"; exit 0; }
[ "$(id -u)" = 0 ] || { echo "debian-layers.sh: needs root" >&2; exit 1; }
# Test binaries run side by side on a cold cache: one builds, the others wait for it.
mkdir -p "$cache/testdata"
exec 9>"$out.lock"
flock 9
[ -f "$out/python.tar" ] && { echo "$out"; exit 0; }
work=$(mktemp -d "$cache/testdata-work.XXXXXX")
cleanup() {
    for m in "$work/merged/proc" "$work/merged/sys" "$work/merged/dev" "$work/merged" \
        "$work/merged2/proc" "$work/merged2/sys" "$work/merged2/dev" "$work/merged2"; do
        mountpoint -q "$m" && umount -l "$m"
    done
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work"/{base,upper,ovl-work,merged,upper2,ovl-work2,merged2} "$out"
echo "debian-layers: debootstrap minbase bookworm" >&2
debootstrap --variant=minbase bookworm "$work/base" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; exit 1; }
# Reproducible enough for tests; the layer need not be bit-identical across runs.
rm -rf "$work/base/var/cache/apt/archives/"*.deb "$work/base/var/lib/apt/lists/"*
tar --format=pax --xattrs --xattrs-include='*' --numeric-owner -C "$work/base" -cf "$out/base.tar.tmp" .

# install_layer N LOWERDIRS PACKAGES: the diff of installing PACKAGES on LOWERDIRS in DIR's
# upper dir ($work/upperN/ovl-workN/mergedN by suffix).
install_layer() {
    local n=$1 lower=$2 pkgs=$3 merged=$work/merged$1
    echo "debian-layers: installing $pkgs in an overlay" >&2
    mount -t overlay overlay -o "lowerdir=$lower,upperdir=$work/upper$n,workdir=$work/ovl-work$n" "$merged"
    mount -t proc proc "$merged/proc"
    mount -t sysfs sysfs "$merged/sys"
    mount --bind /dev "$merged/dev"
    cp /etc/resolv.conf "$merged/etc/resolv.conf"
    echo "deb $mirror bookworm main" >"$merged/etc/apt/sources.list"
    chroot "$merged" /usr/bin/env DEBIAN_FRONTEND=noninteractive PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $pkgs && apt-get clean && rm -rf /var/lib/apt/lists/*" \
        >"$work/apt$n.log" 2>&1 || { tail -20 "$work/apt$n.log" >&2; exit 1; }
    umount "$merged/dev" "$merged/sys" "$merged/proc" "$merged"
}
install_layer "" "$work/base" "$packages"
# The first diff is a lower of the second while it still has overlayfs whiteouts.
install_layer 2 "$work/upper:$work/base" "$python_packages"
# overlayfs upper → OCI layer: 0/0 char devices → .wh.NAME, opaque dirs → .wh..wh..opq
for n in "" 2; do python3 "$here/upper-to-oci.py" "$work/upper$n"; done
tar --format=pax --xattrs --xattrs-include='*' --numeric-owner -C "$work/upper" -cf "$out/packages.tar.tmp" .
tar --format=pax --xattrs --xattrs-include='*' --numeric-owner -C "$work/upper2" -cf "$out/python.tar.tmp" .
mv "$out/base.tar.tmp" "$out/base.tar"
mv "$out/packages.tar.tmp" "$out/packages.tar"
mv "$out/python.tar.tmp" "$out/python.tar"
echo "$out"
