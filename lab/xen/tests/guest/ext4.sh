# domU: file system workload on /dev/xvda (busybox sh, runs as /test/run.sh or
# is sourced by one). mkfs.ext4, mount, write a tree of files, sync, unmount,
# fsck.ext4 -fn clean, remount and verify the checksums.
set -e
dev=${LAB_DEV:-/dev/xvda}
mkfs.ext4 -q -F "$dev"
mkdir -p /mnt/t
mount -t ext4 "$dev" /mnt/t
i=0
while [ $i -lt 8 ]; do
  mkdir -p /mnt/t/d$i/sub
  j=0; while [ $j -lt 6 ]; do
    dd if=/dev/urandom of=/mnt/t/d$i/f$j bs=4k count=$((1 + (i * 7 + j * 13) % 40)) 2>/dev/null
    dd if=/dev/urandom of=/mnt/t/d$i/sub/s$j bs=1k count=$((1 + j)) 2>/dev/null
    j=$((j+1))
  done
  i=$((i+1))
done
(cd /mnt/t && find . -type f | sort | xargs sha256sum) > /run/sums
echo "ext4: wrote $(wc -l < /run/sums) files, $(du -sk /mnt/t | cut -f1) KiB"
sync
umount /mnt/t
fsck.ext4 -fn "$dev"
echo "ext4: fsck clean"
mount -t ext4 "$dev" /mnt/t
(cd /mnt/t && sha256sum -c -s /run/sums) || { echo "ext4: checksum mismatch after remount"; exit 1; }
umount /mnt/t
echo "ext4: remount and checksums ok"
