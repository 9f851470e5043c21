#!/bin/sh
# Stage 2, PID 1 in the guest (overlay root: host root read-only over 9p + tmpfs upper).
# Sets up the guest, then runs guest-command.sh (the command run.sh left in the control
# share) itself, or, with lazyerofs.init=systemd on the kernel command line, boots
# systemd as PID 1 into lazy-erofs-vm.target, whose service runs it.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
ln -sf pts/ptmx /dev/ptmx
mount -t tmpfs tmpfs /dev/shm
mount -t mqueue mqueue /dev/mqueue
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/lock /run/testvm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 lectl /run/testvm || {
    echo "testvm stage2: control share missing"; echo o >/proc/sysrq-trigger; sleep 5; }
ctl=/run/testvm
here=$(dirname "$0")
out=/dev/hvc0
[ -c $out ] || out=/dev/console
fail() { echo "testvm guest: $*" >$out; echo 125 >$ctl/exit_code; sync; echo o >/proc/sysrq-trigger; sleep 5; }

# Writable host folders, at the same path as on the host.
if [ -f $ctl/shares ]; then
    while read -r tag path; do
        mkdir -p "$path" && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 "$tag" "$path" ||
            fail "cannot mount share $path"
    done <$ctl/shares
fi
# ext4 scratch disk: the cachefiles cache cannot live on tmpfs (bind ondemand: EOPNOTSUPP).
if [ -b /dev/vda ]; then
    mkdir -p /scratch && mount -t ext4 /dev/vda /scratch || fail "cannot mount the scratch disk"
fi
hostname lazy-erofs-vm
echo "127.0.0.1 localhost lazy-erofs-vm" >/etc/hosts
ip link set lo up || fail "cannot bring up loopback"

init=shell
for a in $(cat /proc/cmdline); do
    case "$a" in lazyerofs.init=*) init=${a#lazyerofs.init=} ;; esac
done
[ $init = systemd ] || exec /bin/sh "$here/guest-command.sh"

# systemd from the host root, booted into a target of its own: basic.target and the
# command's service, none of the host's enabled services (containerd, a registry…),
# no timers (apt-daily and friends), no getty. Units go to the RAM overlay's /etc.
units=/etc/systemd/system
cat >$units/lazy-erofs-vm.target <<EOT
[Unit]
Description=lazy-erofs test VM: run the command
Requires=basic.target lazy-erofs-vm-command.service
After=basic.target
AllowIsolate=yes
EOT
cat >$units/lazy-erofs-vm-command.service <<EOT
[Unit]
Description=lazy-erofs test VM command
After=basic.target
[Service]
Type=exec
ExecStart=/bin/sh $here/guest-command.sh
LimitNOFILE=1048576
StandardInput=null
StandardOutput=journal+console
# A command that cannot start must not leave the VM running until the timeout.
ExecStopPost=/bin/sh -c '[ -f $ctl/exit_code ] || { echo 125 >$ctl/exit_code; sync; echo o >/proc/sysrq-trigger; }'
EOT
for unit in timers.target getty.target systemd-timesyncd.service systemd-pstore.service \
    e2scrub_reap.service serial-getty@ttyS0.service; do
    ln -sf /dev/null "$units/$unit"
done
: >/etc/fstab
# Debian's tmpfiles empty /tmp at boot ("D /tmp"): a checkout under /tmp would vanish.
mkdir -p /etc/tmpfiles.d
echo "d /tmp 1777 root root -" >/etc/tmpfiles.d/tmp.conf
exec /lib/systemd/systemd --unit=lazy-erofs-vm.target
