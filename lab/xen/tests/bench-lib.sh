# The side-by-side benchmark (bash; source after lib/lab.sh and softdev-lib.sh):
# one domU workload through SoftDev's `file` device, QEMU's qdisk and the
# kernel's blkback, one backend at a time, each backing file in dom0's tmpfs
# /run so that no backend has a faster disk. The workload (guest/seq-dd.sh then
# guest/rand-read.sh): sequential 1 MiB O_DIRECT writes then reads of
# BENCH_MIB MiB with GNU dd, then BENCH_RANDOM_READS random 4 KiB O_DIRECT
# reads at queue depth 1 (randread.c).
# shellcheck shell=bash

BENCH_MIB=${BENCH_MIB:-64}
BENCH_RANDOM_READS=${BENCH_RANDOM_READS:-2000}
declare -A BENCH

# bench_one NAME: run the workload with backend NAME (softdev, qdisk or
# blkback); stores the rates in BENCH[NAME.seq-write] etc.
bench_one() {
  local name=$1 img=/run/bench-$1.img guest=bench-$1 loop="" rc=0 domid key disk=()
  new_image "$img" $((BENCH_MIB + 16))
  guest_script /run/bench-run.sh "LAB_MIB=$BENCH_MIB sh /test/seq-dd.sh" \
    "LAB_RANDOM_READS=$BENCH_RANDOM_READS sh /test/rand-read.sh"
  lab_domu_initrd /run/bench.gz /run/bench-run.sh "$G/seq-dd.sh" "$G/rand-read.sh" "$RANDREAD"
  case $name in
    qdisk) disk=("disk = ['format=raw, vdev=xvda, access=rw, backendtype=qdisk, target=$img']") ;;
    blkback) loop=$(losetup -f --show "$img") && disk=("disk = ['phy:$loop,xvda,w']") ;;
  esac
  lab_domu_config /run/bench.cfg "$guest" /run/bench.gz "${disk[@]}"
  lab_domu_create /run/bench.cfg || { lab_check "bench $name: xl create" false; return 1; }
  domid=$(lab_domid "$guest")
  if [ "$name" = softdev ]; then
    sd attach "$guest" block xvda "file(path=$img)" || lab_check "bench softdev: attach" false
  fi
  xl unpause "$guest"
  lab_domu_wait "$guest" 400 || rc=$?
  for key in seq-write seq-read rand-read; do
    BENCH[$name.$key]=$(xenstore-read "/local/domain/$domid/data/$key" 2>/dev/null || echo "")
  done
  lab_check "bench $name: the workload ran in the guest" test "$rc" = 0
  xl destroy "$guest" || true
  [ -z "$loop" ] || losetup -d "$loop"
  rm -f "$img"
}

# mbps RATE: dd's "84.7 MB/s" (or kB/s, GB/s) as a number of MB/s; the
# random-read line "N iops, R MB/s" gives R.
mbps() {
  awk -v s="$1" 'BEGIN {
    n = split(s, w, " ")
    for (i = 2; i <= n; i++) if (w[i] ~ /^[kMG]B\/s$/) {
      f = (w[i] == "kB/s") ? 0.001 : (w[i] == "GB/s") ? 1000 : 1
      printf "%.1f", w[i-1] * f; exit }
    printf "-" }'
}
iops() { awk -v s="$1" 'BEGIN { n = split(s, w, /[ ,]+/); for (i = 2; i <= n; i++) if (w[i] == "iops") { print w[i-1]; exit } print "-" }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else printf "-" }'; }

# bench_table: the results and SoftDev's ratios to the two peers.
bench_table() {
  local b col sw sr rr
  echo "==== side by side: ${BENCH_MIB} MiB sequential 1 MiB O_DIRECT (GNU dd), ${BENCH_RANDOM_READS} random 4 KiB O_DIRECT reads at QD1; backing files in dom0 tmpfs ===="
  printf '%-10s %16s %16s %18s %16s\n' backend "seq-write MB/s" "seq-read MB/s" "rand-read 4k iops" "rand-read MB/s"
  for b in softdev qdisk blkback; do
    printf '%-10s %16s %16s %18s %16s\n' "$b" "$(mbps "${BENCH[$b.seq-write]}")" "$(mbps "${BENCH[$b.seq-read]}")" \
      "$(iops "${BENCH[$b.rand-read]}")" "$(mbps "${BENCH[$b.rand-read]}")"
  done
  for b in qdisk blkback; do
    sw=$(ratio "$(mbps "${BENCH[softdev.seq-write]}")" "$(mbps "${BENCH[$b.seq-write]}")")
    sr=$(ratio "$(mbps "${BENCH[softdev.seq-read]}")" "$(mbps "${BENCH[$b.seq-read]}")")
    rr=$(ratio "$(iops "${BENCH[softdev.rand-read]}")" "$(iops "${BENCH[$b.rand-read]}")")
    col="softdev/$b"
    printf '%-10s %16s %16s %18s %16s\n' "$col" "${sw}x" "${sr}x" "${rr}x" ""
  done
}

# bench_all: the three backends, then the table; every backend must report.
bench_all() {
  local b
  for b in softdev qdisk blkback; do bench_one "$b"; done
  bench_table
  for b in softdev qdisk blkback; do
    lab_check "bench $b: sequential and random rates reported" \
      test -n "${BENCH[$b.seq-write]}" -a -n "${BENCH[$b.seq-read]}" -a -n "${BENCH[$b.rand-read]}"
  done
}
