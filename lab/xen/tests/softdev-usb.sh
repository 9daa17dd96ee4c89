#!/usr/bin/env bash
# The USB section of tests/softdev.sh alone (section 3c, usb-lib.sh), for working on it
# without the disk and network sections:
#   SOFTDEV_LAB_TEST=lab/xen/tests/softdev-usb.sh lab/xen/test-softdev.sh
set -uo pipefail
. "${LAB_SHARE:-/mnt/host}/lab/lib/lab.sh"
. "$LAB_SHARE/lab/tests/softdev-lib.sh"
. "$LAB_SHARE/lab/tests/bench-lib.sh"
. "$LAB_SHARE/lab/tests/net-lib.sh"
. "$LAB_SHARE/lab/tests/usb-lib.sh"
G=$LAB_SHARE/lab/tests/guest
T0=$(date +%s)
# A trace of every command, live in the host's share (work/share/usb-trace.log).
if [ "${USB_TRACE:-1}" = 1 ]; then exec 9> "$LAB_SHARE/usb-trace.log"; BASH_XTRACEFD=9; PS4='+ ${EPOCHREALTIME} '; set -x; fi
lab_check "softdev serve starts (--hypervisor xen)" sd_start || { cat "$SOFTDEV_LOG"; lab_summary; exit 1; }
usb_all
lab_log "USB section done in $(( $(date +%s) - T0 ))s"
lab_check "the daemon is still running after all guests (no crash in its log)" sd_alive
lab_check "softdev serve stops cleanly on SIGTERM (exit status 0)" sd_stop
echo "==== softdev serve log ===="
cat "$SOFTDEV_LOG"
usb_bench_table
lab_summary
