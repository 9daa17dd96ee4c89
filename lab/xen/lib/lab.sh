# dom0-side helpers for lab tests (bash). A dom0 test script starts with
#   . /mnt/host/lab/lib/lab.sh
# The lab's images are in /run/lab: vmlinuz (PV kernel for guests) and
# domU-initrd.gz (the generic domU runner, see lab/xen/domU/init).
# shellcheck shell=bash

LAB_IMG=${LAB_IMG:-/run/lab}
LAB_SHARE=${LAB_SHARE:-/mnt/host}
# What run.sh passed from the host's environment (LAB_USB, USB_BENCH_*, NET_BENCH_ROUNDS ...).
# shellcheck disable=SC1091
if [ -f "$LAB_SHARE/lab-env" ]; then . "$LAB_SHARE/lab-env"; fi
LAB_PASSED=0
LAB_FAILED=0

lab_log() { echo "[lab $(date +%H:%M:%S)] $*"; }

# lab_check DESCRIPTION COMMAND...: run COMMAND, print PASS/FAIL, count it.
lab_check() {
  local desc=$1; shift
  if "$@"; then echo "PASS: $desc"; LAB_PASSED=$((LAB_PASSED+1)); return 0
  else echo "FAIL: $desc"; LAB_FAILED=$((LAB_FAILED+1)); return 1; fi
}

# lab_summary: print "N passed, N failed"; status is non-zero if any failed
# (or if nothing was checked).
lab_summary() {
  echo "lab: $LAB_PASSED passed, $LAB_FAILED failed"
  [ "$LAB_FAILED" = 0 ] && [ "$LAB_PASSED" -gt 0 ]
}

# lab_domu_initrd OUT SCRIPT [FILE|DIR...]: make a domU initramfs that runs
# SCRIPT (as /test/run.sh, with busybox sh) and holds the given files under
# /test/. It is the lab's domU initrd with one more cpio archive appended (the
# kernel unpacks concatenated archives in order).
lab_domu_initrd() {
  local out=$1 script=$2 tmp; shift 2
  [ -f "$script" ] || { echo "lab_domu_initrd: no script $script" >&2; return 1; }
  tmp=$(mktemp -d /run/lab-initrd.XXXXXX)
  mkdir -p "$tmp/test"
  cp "$script" "$tmp/test/run.sh"
  [ $# -gt 0 ] && cp -a "$@" "$tmp/test/"
  (cd "$tmp" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$tmp.cpio.gz" || return 1
  cat "$LAB_IMG/domU-initrd.gz" "$tmp.cpio.gz" > "$out"
  rm -rf "$tmp" "$tmp.cpio.gz"
}

# lab_domu_config OUT NAME INITRD [LINE...]: write a PV guest config with the
# lab kernel; each LINE is added as is, e.g. "disk = ['phy:/dev/loop0,xvda,w']".
# LAB_DOMU_MEMORY (MiB, default 128), LAB_DOMU_VCPUS (default 1) and
# LAB_DOMU_EXTRA (more kernel arguments, e.g. xen_blkfront.max_ring_page_order=2) apply.
lab_domu_config() {
  local out=$1 name=$2 initrd=$3 line; shift 3
  {
    echo "name = \"$name\""
    echo "type = \"pv\""
    echo "kernel = \"$LAB_IMG/vmlinuz\""
    echo "ramdisk = \"$initrd\""
    echo "extra = \"console=hvc0 rdinit=/init loglevel=4${LAB_DOMU_EXTRA:+ $LAB_DOMU_EXTRA}\""
    echo "memory = ${LAB_DOMU_MEMORY:-128}"
    echo "vcpus = ${LAB_DOMU_VCPUS:-1}"
    echo "on_crash = \"preserve\""
    for line in "$@"; do echo "$line"; done
  } > "$out"
}

# lab_domid NAME: print the domain id of a running guest.
lab_domid() { xl domid "$1" 2>/dev/null; }

# lab_domu_create CFG: create the guest paused (xl create -p), so devices can
# be attached before it runs; prints nothing, fails loudly.
lab_domu_create() {
  local cfg=$1
  if ! xl create -p "$cfg" > /run/xl-create.log 2>&1; then
    cat /run/xl-create.log; echo "lab_domu_create: xl create -p $cfg failed" >&2; return 1
  fi
}

# lab_domu_console_log NAME: the guest's console output so far (xenconsoled
# logs every guest's console to /var/log/xen/console/guest-NAME.log).
lab_domu_console_log() { tr -d '\r' 2>/dev/null < "/var/log/xen/console/guest-$1.log"; }

# lab_domu_wait NAME [SECONDS]: wait for the domU runner's result (xenstore
# data/lab-result), print the guest's console log, return the test's status.
# Returns 124 on timeout and 123 if the domain died or crashed first.
lab_domu_wait() {
  local name=$1 limit=${2:-180} domid rc="" i=0 state
  domid=$(lab_domid "$name") || { echo "lab_domu_wait: no domain $name" >&2; return 123; }
  while :; do
    rc=$(xenstore-read "/local/domain/$domid/data/lab-result" 2>/dev/null) && break
    state=$(xl list "$name" 2>/dev/null | awk 'NR==2 {print $5}')
    if [ -z "$state" ] || [[ $state == *c* ]]; then
      echo "lab_domu_wait: domain $name is gone or crashed (state '$state')" >&2
      lab_domu_console_log "$name" | sed "s/^/[$name] /"; return 123
    fi
    i=$((i+1)); if [ $i -gt $((limit*2)) ]; then
      echo "lab_domu_wait: no result from $name after ${limit}s" >&2
      lab_domu_console_log "$name" | sed "s/^/[$name] /"; return 124
    fi
    sleep 0.5
  done
  sleep 0.2  # let xenconsoled flush the last console lines
  lab_domu_console_log "$name" | sed "s/^/[$name] /"
  return "$rc"
}

# lab_domu_run CFG [SECONDS]: create, unpause, wait, destroy; returns the
# guest test's status. For guests that need devices attached while paused,
# use lab_domu_create, attach, xl unpause, lab_domu_wait, xl destroy.
lab_domu_run() {
  local cfg=$1 limit=${2:-180} name rc=0
  name=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$cfg")
  lab_domu_create "$cfg" || return 1
  xl unpause "$name" || return 1
  lab_domu_wait "$name" "$limit" || rc=$?
  xl destroy "$name" 2>/dev/null || true
  return $rc
}
