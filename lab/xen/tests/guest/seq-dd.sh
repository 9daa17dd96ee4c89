# domU: sequential 1 MiB direct writes then reads of LAB_MIB MiB (default 64)
# on /dev/xvda with GNU dd, called by full path since busybox sh prefers its own
# applets; publishes data/seq-write and data/seq-read (dd's rate, "84.7 MB/s"),
# or data/seq-write-KEY and data/seq-read-KEY with LAB_KEY=KEY.
set -e
dev=${LAB_DEV:-/dev/xvda}
mib=${LAB_MIB:-64}
. /lab-domu.sh
# run_dd ARGS...: run GNU dd, print its rate; fail with dd's output on error.
run_dd() {
  local out
  out=$(/usr/bin/dd "$@" 2>&1) || { echo "dd $*: $out" >&2; return 1; }
  echo "$out" | tail -n 1 | sed -n 's/.* copied, [0-9.]* s, //p'
}
w=$(run_dd if=/dev/zero of="$dev" bs=1M count="$mib" oflag=direct conv=fsync)
r=$(run_dd if="$dev" of=/dev/null bs=1M count="$mib" iflag=direct)
echo "seq-dd ${dev##*/}: ${mib} MiB write ${w:-?}, read ${r:-?}"
[ -n "$w" ] && [ -n "$r" ] || { echo "seq-dd: no rate from dd"; exit 1; }
lab_put "seq-write${LAB_KEY:+-$LAB_KEY}" "$w"
lab_put "seq-read${LAB_KEY:+-$LAB_KEY}" "$r"
