# domU side of the marker round trip (busybox sh, runs as /test/run.sh or is
# called by one). LAB_MARKER (default /test/marker) holds the marker dom0 wrote
# at sector 0 of LAB_DEV (default /dev/xvda); the guest checks it, writes
# DOMU-WROTE-<marker> at sector 8, reads it back uncached and publishes the
# disk's size as data/disk-sectors (data/disk-sectors-<dev> for other disks).
# With LAB_READONLY=1 (a disk attached `softdev attach --readonly`) it checks
# instead that blkfront shows the disk read-only and that a write fails, and
# publishes data/readonly-<dev> = ok.
set -e
dev=${LAB_DEV:-/dev/xvda}
name=${dev##*/}
marker=$(cat "${LAB_MARKER:-/test/marker}")
got=$(dd if="$dev" bs=512 count=1 2>/dev/null | tr -d '\000')
echo "domU read $name: $got"
[ "$got" = "$marker" ] || { echo "marker mismatch on $name: expected $marker"; exit 1; }
. /lab-domu.sh
if [ "${LAB_READONLY:-0}" = 1 ]; then
  ro=$(cat "/sys/block/$name/ro")
  echo "domU $name: /sys/block/$name/ro = $ro"
  [ "$ro" = 1 ] || { echo "$name is writable in the guest: the backend did not say read-only"; exit 1; }
  if printf 'DOMU-WROTE' | dd of="$dev" bs=512 seek=8 conv=sync,fsync 2>/dev/null; then
    echo "a write to read-only $name succeeded"; exit 1
  fi
  lab_put "readonly-$name" ok
  echo "domU read-only check ok on $name"
  exit 0
fi
printf 'DOMU-WROTE-%s' "$marker" | dd of="$dev" bs=512 seek=8 conv=sync 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
back=$(dd if="$dev" bs=512 skip=8 count=1 2>/dev/null | tr -d '\000')
[ "$back" = "DOMU-WROTE-$marker" ] || { echo "read-back mismatch on $name: $back"; exit 1; }
key=disk-sectors; [ "$name" = xvda ] || key=disk-sectors-$name
lab_put "$key" "$(cat /sys/block/$name/size)"
echo "domU marker round trip ok on $name"
