# dom0 helpers for tests of `softdev serve` (bash; source after lib/lab.sh).
# The program is the one run.sh --bin put into the share (test-softdev.sh does).
# shellcheck shell=bash

SOFTDEV=${SOFTDEV:-$LAB_SHARE/bin/softdev}
SOFTDEV_LOG=${SOFTDEV_LOG:-/run/softdev-serve.log}
SOFTDEV_PID=

# sd ARGS...: run a softdev command against Xen, bounded (a stuck xenstore
# must fail the test, not hang it).
sd() { timeout 60 "$SOFTDEV" "$@" --hypervisor xen; }

# sd_start: start `softdev serve` in the background, logging to SOFTDEV_LOG;
# fails unless it is still running 2 s later. It also makes the test stop the
# daemon when it exits, however it exits (trap EXIT, see sd_cleanup).
sd_start() {
  trap sd_cleanup EXIT
  "$SOFTDEV" serve --hypervisor xen 2>> "$SOFTDEV_LOG" &
  SOFTDEV_PID=$!
  sleep 2
  kill -0 "$SOFTDEV_PID" 2>/dev/null
}

# sd_cleanup: the EXIT trap. A daemon left running holds the test's stdout, the
# pipe dom0's init reads to its end before it powers off, so a test that ends
# early (a failed check that exits, an unbound variable, a signal) would leave
# the lab waiting out QEMU's whole timeout. Stops it (sd_stop: SIGKILL after
# 30 s) and shows its log, then kills any other background job of the test (it
# holds the same pipe). The test's exit status stays what it was.
sd_cleanup() {
  local job
  if [ -n "$SOFTDEV_PID" ] && kill -0 "$SOFTDEV_PID" 2>/dev/null; then
    echo "the test ended with softdev serve still running: stopping it"
    sd_stop
    echo "==== softdev serve log ===="
    cat "$SOFTDEV_LOG"
  fi
  for job in $(jobs -pr); do kill -KILL "$job" 2>/dev/null; done
  return 0
}

# sd_alive: the daemon still runs and its log shows no crash.
sd_alive() {
  kill -0 "$SOFTDEV_PID" 2>/dev/null || { echo "softdev serve is not running" >&2; return 1; }
  ! sd_crashed
}
sd_crashed() { grep -Eq 'Fatal error|Segmentation fault|Illegal instruction|Current stack trace|Aborted' "$SOFTDEV_LOG"; }

# sd_stop: SIGTERM, then wait up to 30 s for a clean exit (status 0). Once it
# returns there is no daemon (SOFTDEV_PID is emptied: its number may be reused).
sd_stop() {
  local i=0 rc pid=$SOFTDEV_PID
  SOFTDEV_PID=
  kill -TERM "$pid" 2>/dev/null || return 1
  while kill -0 "$pid" 2>/dev/null; do
    i=$((i+1)); if [ $i -gt 300 ]; then echo "softdev serve ignored SIGTERM for 30 s" >&2; kill -KILL "$pid"; wait "$pid"; return 1; fi
    sleep 0.1
  done
  wait "$pid"; rc=$?
  [ "$rc" = 0 ] || echo "softdev serve exited with status $rc" >&2
  [ "$rc" = 0 ]
}

# wait_until SECONDS COMMAND...: poll COMMAND every 0.5 s until it succeeds.
wait_until() {
  local limit=$1 i=0; shift
  until "$@"; do i=$((i+1)); [ $i -gt $((limit*2)) ] && return 1; sleep 0.5; done
}

# xs_is PATH VALUE: the xenstore node PATH holds VALUE.
xs_is() { [ "$(xenstore-read "$1" 2>/dev/null)" = "$2" ]; }
# xs_at_least PATH N: the node holds a number >= N.
xs_at_least() { local v; v=$(xenstore-read "$1" 2>/dev/null) && [ "$v" -ge "$2" ]; }
# xs_gone PATH: the node does not exist.
xs_gone() { ! xenstore-exists "$1" 2>/dev/null; }

# new_image PATH MIB [MARKER]: a zeroed image in dom0's tmpfs, with MARKER at
# sector 0 (and in PATH.marker, for the guest's /test).
new_image() {
  dd if=/dev/zero of="$1" bs=1M count="$2" status=none
  if [ $# -ge 3 ]; then
    printf '%s' "$3" | dd of="$1" conv=notrunc status=none
    printf '%s' "$3" > "$1.marker"
  fi
}

# sector8_is IMAGE MARKER: dom0 reads what the guest's marker.sh wrote.
sector8_is() { [ "$(dd if="$1" bs=512 skip=8 count=1 status=none | tr -d '\000')" = "DOMU-WROTE-$2" ]; }

# guest_script OUT LINE...: a guest /test/run.sh made of the given lines.
guest_script() { local out=$1; shift; { echo "set -e"; printf '%s\n' "$@"; } > "$out"; }

# domain_gone ID...: Xen has freed the domains (no zombie kept by mapped grants).
domain_gone() {
  local d ids; ids=$(xl list 2>/dev/null | awk 'NR>1 {print $2}')
  for d in "$@"; do ! grep -qx "$d" <<<"$ids" || return 1; done
}
# backends_gone ID...: the daemon removed its backend nodes of these guests.
backends_gone() { local d; for d in "$@"; do xs_gone "/local/domain/0/backend/softdev-vbd/$d" || return 1; done; }

# print_features NAME DOMID VDEV DEVID: what the guest's blkfront negotiated,
# from its frontend nodes, and what its block layer uses (features.sh).
print_features() {
  local name=$1 domid=$2 vdev=$3 id=$4 fe be
  fe=/local/domain/$domid/device/vbd/$id
  be=$(xenstore-read "$fe/backend" 2>/dev/null)
  echo "features $name $vdev (frontend $fe):" \
    "ring-page-order=$(xenstore-read "$fe/ring-page-order" 2>/dev/null || echo '0 (node absent)')" \
    "feature-persistent=$(xenstore-read "$fe/feature-persistent" 2>/dev/null || echo '0 (node absent)')" \
    "multi-queue-num-queues=$(xenstore-read "$fe/multi-queue-num-queues" 2>/dev/null || echo '1 (node absent)')" \
    "protocol=$(xenstore-read "$fe/protocol" 2>/dev/null || echo '?')"
  echo "features $name $vdev (backend offer): max-ring-page-order=$(xenstore-read "$be/max-ring-page-order" 2>/dev/null)" \
    "feature-max-indirect-segments=$(xenstore-read "$be/feature-max-indirect-segments" 2>/dev/null)" \
    "multi-queue-max-queues=$(xenstore-read "$be/multi-queue-max-queues" 2>/dev/null)" \
    "feature-persistent=$(xenstore-read "$be/feature-persistent" 2>/dev/null)"
  echo "features $name $vdev (guest block layer): $(xenstore-read "/local/domain/$domid/data/features-$vdev" 2>/dev/null || echo '?')"
}
