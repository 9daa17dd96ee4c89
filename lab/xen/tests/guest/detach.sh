# domU side of detach and re-attach while the guest runs (busybox sh, as
# /test/run.sh). Checks /test/marker on xvda, asks dom0 to detach it
# (data/phase = detach-me), waits for the disk to go, says so (phase =
# detached), waits for dom0 to attach another image as xvda and checks its
# marker (/test/marker2).
set -e
. /lab-domu.sh
# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.1 s.
wait_for() {
  local limit=$1 what=$2 i=0; shift 2
  until "$@"; do
    i=$((i+1)); [ $i -gt $((limit*10)) ] && { echo "detach: $what: not after ${limit}s"; return 1; }
    sleep 0.1
  done
}
vbd_connected() { [ -e /sys/block/xvda ] && [ "$(xenstore-read device/vbd/51712/state 2>/dev/null)" = 4 ]; }
LAB_MARKER=/test/marker sh /test/marker.sh
lab_put phase detach-me
wait_for 60 "xvda gone" [ ! -e /sys/block/xvda ]
echo "detach: xvda is gone"
lab_put phase detached
wait_for 120 "xvda back" vbd_connected
echo "detach: xvda is back"
LAB_MARKER=/test/marker2 sh /test/marker.sh
