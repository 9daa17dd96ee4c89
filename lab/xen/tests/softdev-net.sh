#!/usr/bin/env bash
# The network section of tests/softdev.sh alone (section 3b, net-lib.sh), for
# working on it without the disk sections:
#   SOFTDEV_LAB_TEST=lab/xen/tests/softdev-net.sh lab/xen/test-softdev.sh
set -uo pipefail
. "${LAB_SHARE:-/mnt/host}/lab/lib/lab.sh"
. "$LAB_SHARE/lab/tests/softdev-lib.sh"
. "$LAB_SHARE/lab/tests/bench-lib.sh"
. "$LAB_SHARE/lab/tests/net-lib.sh"
G=$LAB_SHARE/lab/tests/guest
T0=$(date +%s)
# A trace of every command, live in the host's share (work/share/net-trace.log).
if [ "${NET_TRACE:-1}" = 1 ]; then exec 9> "$LAB_SHARE/net-trace.log"; BASH_XTRACEFD=9; PS4='+ ${EPOCHREALTIME} '; set -x; fi
# What runs in dom0, every 15 s (work/share/net-top.log).
if [ "${NET_TRACE:-1}" = 1 ]; then
  ( set +x; while :; do { date; top -bn1 | head -15; xl list; } >> "$LAB_SHARE/net-top.log" 2>&1; sleep 15; done ) 9>&- &
  NET_TOP_PID=$!
fi
lab_check "softdev serve starts (--hypervisor xen)" sd_start || { cat "$SOFTDEV_LOG"; lab_summary; exit 1; }
net_all
lab_log "network section done in $(( $(date +%s) - T0 ))s"
lab_check "the daemon is still running after all guests (no crash in its log)" sd_alive
lab_check "softdev serve stops cleanly on SIGTERM (exit status 0)" sd_stop
echo "==== softdev serve log ===="
cat "$SOFTDEV_LOG"
net_bench_table
[ -z "${NET_TOP_PID:-}" ] || kill "$NET_TOP_PID"
lab_summary
