#!/bin/bash
# Smoke test of the lab (runs in dom0): the toolstack works, and a PV domU's
# xen-blkfront reads a marker written in dom0 and writes a sector that dom0
# reads back, through the kernel's blkback on a loop device.
set -uo pipefail
. "${LAB_SHARE:-/mnt/host}/lab/lib/lab.sh"

lab_check "xl info: Xen 4.17 is running" bash -c 'xl info | grep -Eq "^xen_(major|version) *: 4(\.17)?"'
lab_check "dom0 has the backend devices" test -c /dev/xen/gntdev -a -c /dev/xen/evtchn -a -e /dev/xen/xenbus_backend

marker="SOFTDEV-LAB-MARKER-$$-$RANDOM$RANDOM"
disk=/run/smoke-disk.img
dd if=/dev/zero of=$disk bs=1M count=16 status=none
printf '%s' "$marker" | dd of=$disk conv=notrunc status=none
loop=$(losetup -f --show $disk)
lab_log "disk $disk on $loop, marker $marker"

# The guest's test: read the marker at sector 0, write ours at sector 8.
cat > /run/smoke-domU.sh <<GUEST
set -e
got=\$(dd if=/dev/xvda bs=512 count=1 2>/dev/null | tr -d '\\000')
echo "domU read: \$got"
[ "\$got" = "$marker" ] || { echo "marker mismatch"; exit 1; }
printf 'DOMU-WROTE-%s' "$marker" | dd of=/dev/xvda bs=512 seek=8 conv=sync 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
back=\$(dd if=/dev/xvda bs=512 skip=8 count=1 2>/dev/null | tr -d '\\000')
[ "\$back" = "DOMU-WROTE-$marker" ] || { echo "read-back mismatch: \$back"; exit 1; }
. /lab-domu.sh
lab_put smoke-size "\$(cat /sys/block/xvda/size)"
echo "domU smoke ok"
GUEST
lab_domu_initrd /run/smoke-initrd.gz /run/smoke-domU.sh
lab_domu_config /run/smoke.cfg smoke /run/smoke-initrd.gz "disk = ['phy:$loop,xvda,w']"

t0=$(date +%s)
lab_domu_create /run/smoke.cfg
domid=$(lab_domid smoke)
xl unpause smoke
rc=0; lab_domu_wait smoke 240 || rc=$?
size=$(xenstore-read /local/domain/$domid/data/smoke-size 2>/dev/null || echo "?")
lab_log "guest result $rc after $(( $(date +%s) - t0 ))s; guest saw $size sectors"
lab_check "domU test passed (marker read, sector written and read back in the guest)" test "$rc" = 0
lab_check "domU published a value through xenstore (32768 sectors)" test "$size" = 32768
xl destroy smoke || true
losetup -d "$loop"
back=$(dd if=$disk bs=512 skip=8 count=1 status=none | tr -d '\000')
lab_check "dom0 reads the sector the guest wrote" test "$back" = "DOMU-WROTE-$marker"
lab_check "guest is gone after xl destroy" bash -c '! xl domid smoke >/dev/null 2>&1'
lab_summary
