# domU side of the marker round trip (busybox sh, runs as /test/run.sh).
# /test/marker holds the marker dom0 wrote at sector 0 of the guest's xvda.
set -e
marker=$(cat /test/marker)
got=$(dd if=/dev/xvda bs=512 count=1 2>/dev/null | tr -d '\000')
echo "domU read: $got"
[ "$got" = "$marker" ] || { echo "marker mismatch: expected $marker"; exit 1; }
printf 'DOMU-WROTE-%s' "$marker" | dd of=/dev/xvda bs=512 seek=8 conv=sync 2>/dev/null
sync
echo 3 > /proc/sys/vm/drop_caches
back=$(dd if=/dev/xvda bs=512 skip=8 count=1 2>/dev/null | tr -d '\000')
[ "$back" = "DOMU-WROTE-$marker" ] || { echo "read-back mismatch: $back"; exit 1; }
. /lab-domu.sh
lab_put disk-sectors "$(cat /sys/block/xvda/size)"
echo "domU marker round trip ok"
