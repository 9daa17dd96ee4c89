# domU side of the `ids | crypt | file` section (busybox sh, runs as /test/run.sh).
# ext4 on LAB_DEV (default /dev/xvda): /etc/passwd, /boot/vmlinuz and a tree,
# sync; a line appended to /etc/passwd (the ids alerts, lets it through); an
# in-place overwrite of /boot/vmlinuz that must fail (the ids denies it: the
# guest sees an I/O error); umount, fsck.ext4 -fn, remount, checksums (vmlinuz
# as first written: nothing of the denied write landed). /test/ids-marker holds
# the text written into the files, which dom0 must not find in the encrypted
# image. Publishes data/ids-deny = ok once the overwrite failed.
set -e
. /lab-domu.sh
dev=${LAB_DEV:-/dev/xvda}
marker=$(cat /test/ids-marker)
mkfs.ext4 -q -F "$dev"
mkdir -p /mnt/t
mount -t ext4 "$dev" /mnt/t
mkdir -p /mnt/t/etc /mnt/t/boot
printf 'root:x:0:0:root:/root:/bin/sh\n%s-passwd:x:1000:1000::/home:/bin/sh\n' "$marker" > /mnt/t/etc/passwd
dd if=/dev/urandom of=/mnt/t/boot/vmlinuz bs=4k count=24 2>/dev/null
i=0
while [ $i -lt 4 ]; do
  mkdir -p /mnt/t/srv/d$i
  j=0; while [ $j -lt 4 ]; do
    { echo "$marker-tree-$i-$j"; head -c $(( (1 + (i * 5 + j * 3) % 12) * 1024 )) /dev/urandom; } > /mnt/t/srv/d$i/f$j
    j=$((j+1))
  done
  i=$((i+1))
done
sync
echo "$marker-appended:x:1001:1001::/home:/bin/sh" >> /mnt/t/etc/passwd
sync
(cd /mnt/t && find . -type f ! -path './lost+found/*' | sort | xargs sha256sum) > /run/sums
echo "ids: wrote $(wc -l < /run/sums) files, $(du -sk /mnt/t | cut -f1) KiB; appended a line to /etc/passwd"
if /usr/bin/dd if=/dev/urandom of=/mnt/t/boot/vmlinuz bs=4k count=2 seek=1 conv=notrunc,fsync 2> /run/dd.err; then
  echo "ids: the in-place overwrite of /boot/vmlinuz succeeded (the ids should deny it)"; exit 1
fi
echo "ids: the overwrite of /boot/vmlinuz failed as it should: $(tr '\n' ' ' < /run/dd.err)"
lab_put ids-deny ok
umount /mnt/t
fsck.ext4 -fn "$dev"
echo "ids: fsck clean"
mount -t ext4 "$dev" /mnt/t
(cd /mnt/t && sha256sum -c -s /run/sums) || { echo "ids: checksum mismatch after remount"; exit 1; }
grep -q "^$marker-appended:" /mnt/t/etc/passwd || { echo "ids: the appended line is missing"; exit 1; }
umount /mnt/t
echo "ids: remount and checksums ok (vmlinuz unchanged, passwd appended)"
