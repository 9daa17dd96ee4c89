#!/bin/bash
# Smoke test of the lab (runs in dom0): the toolstack works, QEMU's Xen device
# model starts, and a PV domU's xen-blkfront reads a marker written in dom0 and
# writes a sector that dom0 reads back, through the kernel's blkback on a loop
# device.
set -uo pipefail
. "${LAB_SHARE:-/mnt/host}/lab/lib/lab.sh"
. "$LAB_SHARE/lab/tests/marker-lib.sh"

lab_check "xl info: Xen 4.17 is running" bash -c 'xl info | grep -Eq "^xen_(major|version) *: 4(\.17)?"'
lab_check "dom0 has the backend devices" test -c /dev/xen/gntdev -a -c /dev/xen/evtchn -a -e /dev/xen/xenbus_backend
lab_check "qemu-system-xen (qdisk peer) runs in dom0" bash -c '/usr/libexec/xen-qemu-system-i386 --version | grep -q "QEMU emulator"'

disk=/run/smoke-disk.img
dd if=/dev/zero of=$disk bs=1M count=16 status=none
loop=$(losetup -f --show $disk)
lab_log "kernel blkback: $disk on $loop"
marker_roundtrip smoke "$disk" "phy:$loop,xvda,w"
losetup -d "$loop"
lab_summary
