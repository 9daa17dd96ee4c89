# domU: LAB_RANDOM_READS (default 2000) random 4 KiB O_DIRECT reads of LAB_DEV
# (default /dev/xvda) with /test/randread (built by test-softdev.sh);
# publishes data/rand-read ("N iops, R MB/s"), data/rand-read-KEY with LAB_KEY.
set -e
dev=${LAB_DEV:-/dev/xvda}
. /lab-domu.sh
out=$(/test/randread "$dev" "${LAB_RANDOM_READS:-2000}")
echo "rand-read ${dev##*/}: $out"
lab_put "rand-read${LAB_KEY:+-$LAB_KEY}" "${out#*: }"
