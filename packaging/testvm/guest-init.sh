#!/bin/sh
# Stage 2, PID 1 in the guest (overlay root: host root read-only over 9p + tmpfs upper).
# Sets up the guest, runs the command run.sh left in the control share with its output
# on the virtio console (run.sh's stdout), records the exit code, powers off.
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
echo "$(cut -d' ' -f1 /proc/uptime)" >$ctl/started

out=/dev/hvc0
[ -c $out ] || out=/dev/console
# Raw: no \n -> \r\n translation, so the host gets the bytes the command wrote. The
# console stays open on fd 9 so the setting holds (a tty resets on its last close).
exec 9<>$out
stty raw -echo <&9 2>/dev/null
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

# Through a pipe, not the console tty: programs then write plain output, as under CI.
{ /bin/bash $ctl/cmd.sh </dev/null 9>&- 2>&1; echo $? >$ctl/exit_code; } | cat >&9
sync
umount $ctl
echo o >/proc/sysrq-trigger
sleep 5
