# domU side of the read-only disk (busybox sh, called by /test/run.sh). LAB_DEV
# (default /dev/xvdc) was attached with `softdev attach --readonly`: blkfront
# must show it read-only, reads must return the marker dom0 wrote at sector 0
# (LAB_MARKER), and a write must fail. Publishes data/readonly-<dev> = ok.
set -e
dev=${LAB_DEV:-/dev/xvdc}
name=${dev##*/}
marker=$(cat "${LAB_MARKER:-/test/marker-c}")
got=$(dd if="$dev" bs=512 count=1 2>/dev/null | tr -d '\000')
echo "domU read $name: $got"
[ "$got" = "$marker" ] || { echo "marker mismatch on $name: expected $marker"; exit 1; }
ro=$(cat "/sys/block/$name/ro")
echo "domU $name: /sys/block/$name/ro = $ro"
[ "$ro" = 1 ] || { echo "$name is writable in the guest: the backend did not say read-only"; exit 1; }
if printf 'DOMU-WROTE' | dd of="$dev" bs=512 seek=8 conv=sync,fsync 2>/dev/null; then
  echo "a write to read-only $name succeeded"; exit 1
fi
. /lab-domu.sh
lab_put "readonly-$name" ok
echo "domU read-only check ok on $name"
