#!/usr/bin/env bash
# SoftDev in the Xen lab (lab/xen/test-softdev.sh): builds softdev in release,
# boots a real Xen 4.17 with a Linux dom0 and domUs under QEMU (TCG) and runs
# the end-to-end tests with Linux's xen-blkfront and the side-by-side
# benchmark against qdisk and blkback. Needs root: lab/xen/build.sh installs
# its apt packages. SOFTDEV_SKIP_LAB=1 skips it (for a quick local run).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${SOFTDEV_SKIP_LAB:-0}" = 1 ]; then
  echo "lab: skipped (SOFTDEV_SKIP_LAB=1)"
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "lab: needs root (apt-get, QEMU); SOFTDEV_SKIP_LAB=1 skips it" >&2; exit 1; }
# Bound the whole run (build, image downloads, QEMU): a hang must fail CI, not
# stall it. QEMU itself is bounded tighter by LAB_TIMEOUT (test-softdev.sh).
# Run alone (not from scripts/test.sh), the release build still needs the -dev packages.
bash scripts/install-deps.sh
limit=${SOFTDEV_LAB_TIMEOUT:-4500}
start=$(date +%s)
rc=0
timeout --foreground -k 30 "$limit" bash lab/xen/test-softdev.sh || rc=$?
if [ $rc = 124 ] || [ $rc = 137 ]; then
  echo "lab: stopped after ${limit}s (SOFTDEV_LAB_TIMEOUT); console tail:" >&2
  tail -n 60 lab/xen/work/console.log 2>/dev/null | tr -d '\r' >&2 || true
fi
echo "lab: exit status $rc after $(( $(date +%s) - start ))s"
exit $rc
