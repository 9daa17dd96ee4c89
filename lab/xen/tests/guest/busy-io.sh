# domU: direct writes and reads on xvda without end (busybox sh, as
# /test/run.sh), for dom0 to destroy the guest mid-I/O. Publishes
# data/io-rounds after each round.
. /lab-domu.sh
n=0
while :; do
  /usr/bin/dd if=/dev/zero of=/dev/xvda bs=64k count=64 oflag=direct 2>/dev/null || echo "busy-io: write failed"
  /usr/bin/dd if=/dev/xvda of=/dev/null bs=64k count=64 iflag=direct 2>/dev/null || echo "busy-io: read failed"
  n=$((n+1))
  lab_put io-rounds $n
done
