# The side-by-side benchmark (bash; source after lib/lab.sh and softdev-lib.sh).
# One domU gets four disks, one per backend, each backed in dom0's tmpfs /run
# so that no backend has a faster disk:
#   xvda  softdev       SoftDev's `file` device
#   xvdb  softdev-null  SoftDev's `null` device: rings, grants and event
#                       channels alone, to tell the transport's cost from the file's
#   xvdc  qdisk         QEMU's user-space backend (qemu-system-xen)
#   xvdd  blkback       the kernel's backend on a loop device
# The guest runs the workload on each disk in turn, BENCH_ROUNDS times
# (interleaved, so that a slow moment of the shared host hits every backend
# alike); the table shows each backend's best round. The workload
# (guest/seq-dd.sh, guest/rand-read.sh): sequential 1 MiB O_DIRECT writes then
# reads of BENCH_MIB MiB with GNU dd, then BENCH_RANDOM_READS random 4 KiB
# O_DIRECT reads at queue depth 1 (guest/randread.c).
# shellcheck shell=bash

BENCH_MIB=${BENCH_MIB:-64}
BENCH_RANDOM_READS=${BENCH_RANDOM_READS:-2000}
BENCH_ROUNDS=${BENCH_ROUNDS:-5}
BENCH_BACKENDS=(softdev softdev-null qdisk blkback)
declare -A BENCH_DEV=([softdev]=xvda [softdev-null]=xvdb [qdisk]=xvdc [blkback]=xvdd)
declare -A BENCH   # BENCH[backend.key] = best value seen

# bench_guest_script OUT: the guest's rounds over the four disks.
bench_guest_script() {
  local r b lines=()
  for r in $(seq 1 "$BENCH_ROUNDS"); do
    for b in "${BENCH_BACKENDS[@]}"; do
      lines+=("LAB_KEY=$b-$r LAB_DEV=/dev/${BENCH_DEV[$b]} LAB_MIB=$BENCH_MIB sh /test/seq-dd.sh"
              "LAB_KEY=$b-$r LAB_DEV=/dev/${BENCH_DEV[$b]} LAB_RANDOM_READS=$BENCH_RANDOM_READS sh /test/rand-read.sh")
    done
  done
  guest_script "$1" "${lines[@]}"
}

# mbps RATE: dd's "84.7 MB/s" (or kB/s, GB/s) as a number of MB/s; the
# random-read line "N iops, R MB/s" gives R.
mbps() {
  awk -v s="$1" 'BEGIN {
    n = split(s, w, /[ ,]+/)
    for (i = 2; i <= n; i++) if (w[i] ~ /^[kMG]B\/s$/) {
      f = (w[i] == "kB/s") ? 0.001 : (w[i] == "GB/s") ? 1000 : 1
      printf "%.1f", w[i-1] * f; exit }
    printf "-" }'
}
iops() { awk -v s="$1" 'BEGIN { n = split(s, w, /[ ,]+/); for (i = 2; i <= n; i++) if (w[i] == "iops") { print w[i-1]; exit } print "-" }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2fx", a / b; else printf "-" }'; }
best() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == "" || b == "-" || (a != "-" && a + 0 >= b + 0)) print a; else print b }'; }

# bench_collect DOMID: the best round of each backend into BENCH, as numbers.
bench_collect() {
  local domid=$1 b r v
  for b in "${BENCH_BACKENDS[@]}"; do
    for r in $(seq 1 "$BENCH_ROUNDS"); do
      v=$(xenstore-read "/local/domain/$domid/data/seq-write-$b-$r" 2>/dev/null); BENCH[$b.sw]=$(best "$(mbps "$v")" "${BENCH[$b.sw]:-}")
      v=$(xenstore-read "/local/domain/$domid/data/seq-read-$b-$r" 2>/dev/null); BENCH[$b.sr]=$(best "$(mbps "$v")" "${BENCH[$b.sr]:-}")
      v=$(xenstore-read "/local/domain/$domid/data/rand-read-$b-$r" 2>/dev/null)
      BENCH[$b.ri]=$(best "$(iops "$v")" "${BENCH[$b.ri]:-}"); BENCH[$b.rm]=$(best "$(mbps "$v")" "${BENCH[$b.rm]:-}")
    done
  done
}

# bench_table: the best rounds and SoftDev's ratios to the two peers.
bench_table() {
  local b
  echo "==== side by side (one guest, ${BENCH_ROUNDS} interleaved rounds, best round shown): ${BENCH_MIB} MiB sequential 1 MiB O_DIRECT (GNU dd), ${BENCH_RANDOM_READS} random 4 KiB O_DIRECT reads at QD1; backing files in dom0 tmpfs ===="
  printf '%-16s %15s %15s %18s %15s\n' backend "seq-write MB/s" "seq-read MB/s" "rand-read 4k iops" "rand-read MB/s"
  for b in "${BENCH_BACKENDS[@]}"; do
    printf '%-16s %15s %15s %18s %15s\n' "$b" "${BENCH[$b.sw]}" "${BENCH[$b.sr]}" "${BENCH[$b.ri]}" "${BENCH[$b.rm]}"
  done
  for b in qdisk blkback; do
    printf '%-16s %15s %15s %18s %15s\n' "softdev/$b" "$(ratio "${BENCH[softdev.sw]}" "${BENCH[$b.sw]}")" \
      "$(ratio "${BENCH[softdev.sr]}" "${BENCH[$b.sr]}")" "$(ratio "${BENCH[softdev.ri]}" "${BENCH[$b.ri]}")" ""
  done
}

# bench_all: the guest, its four disks, the rounds, the table and the checks.
bench_all() {
  local img=/run/bench loop domid rc=0 b
  for b in softdev qdisk blkback; do new_image "$img-$b.img" $((BENCH_MIB + 16)); done
  loop=$(losetup -f --show "$img-blkback.img")
  bench_guest_script /run/bench-run.sh
  lab_domu_initrd /run/bench.gz /run/bench-run.sh "$G/seq-dd.sh" "$G/rand-read.sh" "$RANDREAD"
  LAB_DOMU_MEMORY=256 lab_domu_config /run/bench.cfg bench /run/bench.gz \
    "disk = ['format=raw, vdev=xvdc, access=rw, backendtype=qdisk, target=$img-qdisk.img', 'phy:$loop,xvdd,w']"
  if lab_domu_create /run/bench.cfg; then
    domid=$(lab_domid bench)
    lab_check "bench: softdev attach xvda (file)" sd attach bench block xvda "file(path=$img-softdev.img)"
    lab_check "bench: softdev attach xvdb (null)" sd attach bench block xvdb "null(size=$((BENCH_MIB + 16))M)"
    xl unpause bench
    lab_domu_wait bench 900 || rc=$?
    lab_check "bench: the workload ran on all four disks in the guest" test "$rc" = 0
    bench_collect "$domid"
    xl destroy bench || true
  else
    lab_check "bench: xl create" false
  fi
  losetup -d "$loop"
  rm -f "$img"-*.img
  bench_table
  for b in "${BENCH_BACKENDS[@]}"; do
    lab_check "bench $b: sequential and random rates reported" \
      test "${BENCH[$b.sw]:--}" != - -a "${BENCH[$b.sr]:--}" != - -a "${BENCH[$b.ri]:--}" != -
  done
}
