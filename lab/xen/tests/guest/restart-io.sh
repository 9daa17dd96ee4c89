# domU side of a daemon restart under I/O (busybox sh, as /test/run.sh): writes a
# different 1 MiB pattern at a different place of xvda each round with O_DIRECT,
# reads it back and compares, publishing data/io-rounds, until dom0 writes
# data/stop (meanwhile dom0 kills `softdev serve` with SIGKILL and starts it
# again). Then xvdb, idle all along, must still read its marker and take a
# write, and the kernel must have logged no block error. data/restart-io says
# ok, or what went wrong.
. /lab-domu.sh
fail() { echo "restart-io: $*"; lab_put restart-io "$*"; exit 1; }
n=0
while [ -z "$(lab_get data/stop 2>/dev/null)" ]; do
  n=$((n+1))
  at=$((n % 24))
  yes "round $n of restart-io" | head -c 1048576 > /tmp/pattern
  dd if=/tmp/pattern of=/dev/xvda bs=1M count=1 seek=$at oflag=direct 2>/dev/null || fail "round $n: the write failed"
  dd if=/dev/xvda of=/tmp/back bs=1M count=1 skip=$at iflag=direct 2>/dev/null || fail "round $n: the read failed"
  cmp -s /tmp/pattern /tmp/back || fail "round $n: read back other data than written"
  lab_put io-rounds $n
done
echo "restart-io: $n rounds written and verified"
LAB_DEV=/dev/xvdb LAB_MARKER=/test/marker sh /test/marker.sh || fail "the idle disk xvdb"
if dmesg | grep -Ei 'illegal number of responses|blk_update_request|I/O error|Buffer I/O|kernel BUG|vbd.*error'; then
  fail "the kernel logged a block error"
fi
lab_put restart-io ok
