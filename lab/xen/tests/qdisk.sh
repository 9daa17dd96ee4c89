#!/bin/bash
# The same marker round trip through QEMU's user-space disk backend ("qdisk",
# Debian's qemu-system-xen), the peer SoftDev is compared with.
set -uo pipefail
. "${LAB_SHARE:-/mnt/host}/lab/lib/lab.sh"
. "$LAB_SHARE/lab/tests/marker-lib.sh"

disk=/run/qdisk-disk.img
dd if=/dev/zero of=$disk bs=1M count=16 status=none
marker_roundtrip qdisk "$disk" "format=raw, vdev=xvda, access=rw, backendtype=qdisk, target=$disk"
lab_summary
