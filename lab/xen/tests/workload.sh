#!/bin/bash
# Guest workloads through the kernel's blkback (a baseline for SoftDev's own
# disk): sequential dd, then the ext4 round trip with fsck and checksums;
# dom0 then checks the guest's file system itself.
set -uo pipefail
. "${LAB_SHARE:-/mnt/host}/lab/lib/lab.sh"
G=$LAB_SHARE/lab/tests/guest

disk=/run/workload.img
dd if=/dev/zero of=$disk bs=1M count=96 status=none
loop=$(losetup -f --show $disk)
# One guest script that runs both workloads (files given to lab_domu_initrd
# land in /test/ beside run.sh).
printf 'set -e\nsh /test/seq-dd.sh\nsh /test/ext4.sh\n' > /run/workload-run.sh
lab_domu_initrd /run/workload-initrd.gz /run/workload-run.sh "$G/ext4.sh" "$G/seq-dd.sh"
lab_domu_config /run/workload.cfg workload /run/workload-initrd.gz "disk = ['phy:$loop,xvda,w']"
lab_domu_create /run/workload.cfg
domid=$(lab_domid workload)
xl unpause workload
rc=0; lab_domu_wait workload 400 || rc=$?
lab_check "blkback: sequential dd, then the ext4 round trip in the guest" test "$rc" = 0
lab_log "blkback: seq write $(xenstore-read /local/domain/$domid/data/seq-write 2>/dev/null), read $(xenstore-read /local/domain/$domid/data/seq-read 2>/dev/null)"
xl destroy workload || true
losetup -d "$loop"
lab_check "dom0: fsck.ext4 -fn is clean on the file system the guest made" fsck.ext4 -fn $disk
lab_summary
