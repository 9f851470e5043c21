#!/bin/sh
# Runs the command run.sh left in the control share, its output on the virtio console
# (run.sh's stdout), records the exit code and powers the VM off. Run by stage 2 itself,
# or, with --init systemd, by lazy-erofs-vm-command.service once the system is up.
ctl=/run/testvm
echo "$(cut -d' ' -f1 /proc/uptime)" >$ctl/started
out=/dev/hvc0
[ -c $out ] || out=/dev/console
# Raw: no \n -> \r\n translation, so the host gets the bytes the command wrote. The
# console stays open on fd 9 so the setting holds (a tty resets on its last close).
exec 9<>$out
stty raw -echo <&9 2>/dev/null
# Through a pipe, not the console tty: programs then write plain output, as under CI.
{ /bin/bash $ctl/cmd.sh </dev/null 9>&- 2>&1; echo $? >$ctl/exit_code; } | cat >&9
sync
umount $ctl
echo o >/proc/sysrq-trigger
sleep 5
