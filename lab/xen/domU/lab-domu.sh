# Helpers for test scripts running inside a lab domU (busybox sh).
# The runner (/init) sources this file; a test script can source it too:
#   . /lab-domu.sh
# Values a test publishes with lab_put appear in dom0 under
# /local/domain/<domid>/data/<key> (the guest may write its own data/ dir).

# lab_put KEY VALUE: publish a value to dom0 through xenstore.
lab_put() { xenstore-write "data/$1" "$2"; }

# lab_get PATH: read a xenstore node (relative paths are under the guest's home).
lab_get() { xenstore-read "$1"; }

# lab_wait_vbds [SECONDS]: wait until every vbd in the guest's xenstore device
# list is Connected (state 4) and its block device exists. Prints the devices.
lab_wait_vbds() {
  local limit=${1:-60} i=0 dev ok
  while :; do
    ok=1
    for dev in $(xenstore-list device/vbd 2>/dev/null); do
      [ "$(xenstore-read device/vbd/$dev/state 2>/dev/null)" = 4 ] || ok=0
    done
    [ $ok = 1 ] && break
    i=$((i+1)); [ $i -gt $((limit*10)) ] && { echo "lab_wait_vbds: not all vbds connected after ${limit}s" >&2; return 1; }
    sleep 0.1
  done
  # The block devices show up right after the frontend connects.
  i=0; while [ "$(ls /sys/block | grep -c '^xvd')" -lt "$(xenstore-list device/vbd 2>/dev/null | wc -l)" ]; do
    i=$((i+1)); [ $i -gt 100 ] && { echo "lab_wait_vbds: block devices missing" >&2; return 1; }
    sleep 0.1
  done
  ls /sys/block | grep '^xvd' || true
}
