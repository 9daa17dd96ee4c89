#!/usr/bin/env bash
# The `ids | crypt | file` section of tests/softdev.sh alone (section 5,
# ids-lib.sh), with its own daemon, for working on it:
#   SOFTDEV_LAB_TEST=lab/xen/tests/softdev-ids.sh lab/xen/test-softdev.sh
# (test-softdev.sh then runs tests/ids-host.sh on what it left in the share).
set -uo pipefail
. "${LAB_SHARE:-/mnt/host}/lab/lib/lab.sh"
. "$LAB_SHARE/lab/tests/softdev-lib.sh"
. "$LAB_SHARE/lab/tests/ids-lib.sh"
G=$LAB_SHARE/lab/tests/guest
T0=$(date +%s)
lab_check "softdev serve starts (--hypervisor xen)" sd_start || { cat "$SOFTDEV_LOG"; lab_summary; exit 1; }
ids_all
lab_log "ids section done in $(( $(date +%s) - T0 ))s"
lab_check "the daemon is still running after the guest (no crash in its log)" sd_alive
lab_check "softdev serve stops cleanly on SIGTERM (exit status 0)" sd_stop
echo "==== softdev serve log ===="
cat "$SOFTDEV_LOG"
lab_summary
