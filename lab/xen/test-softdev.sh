#!/bin/bash
# SoftDev in the Xen lab, in one command: build the release `softdev`, put it
# with its shared libraries (the Swift runtime too) into dom0, and run
# tests/softdev.sh there: `softdev serve` with Linux xen-blkfront guests, then
# the side-by-side benchmark against QEMU's qdisk and the kernel's blkback.
#
#   lab/xen/test-softdev.sh            build, boot, test, report
#   SOFTDEV_BIN=path lab/xen/test-softdev.sh   use that binary (and the
#                                      xen-lab-probe beside it), build nothing
# Environment: LAB_TIMEOUT (seconds for the QEMU run, default 3600),
# SOFTDEV_LAB_TEST (the dom0 script, default tests/softdev.sh; e.g.
# tests/softdev-net.sh for the network section alone), LAB_USB (default 1: dom0
# gets the emulated EHCI controller and stick and the USB section runs; 0 skips
# both), USB_BENCH_FULL=1 (the USB bench's full size), and what run.sh takes
# (LAB_VERBOSE=1 streams the console).
# Exit status: non-zero if the build, the lab or any check in dom0 failed;
# run.sh prints each check and, on failure, the end of the console log.
set -euo pipefail
LAB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$LAB/../.." && pwd)
WORK=${LAB_WORK:-$LAB/work}
. "$LAB/lib/host.sh"

T0=$(date +%s)
if [ -z "${SOFTDEV_BIN:-}" ]; then
  lab_say "building softdev and xen-lab-probe (release)"
  (cd "$ROOT" && swift build -c release) || lab_die "swift build -c release failed"
  SOFTDEV_BIN=$ROOT/.build/release/softdev
fi
# The probe of the Xen implementation's error paths is built beside softdev.
PROBE_BIN=$(dirname "$SOFTDEV_BIN")/xen-lab-probe
[ -x "$SOFTDEV_BIN" ] || lab_die "no softdev binary at $SOFTDEV_BIN"
[ -x "$PROBE_BIN" ] || lab_die "no xen-lab-probe beside it ($PROBE_BIN)"

# The guest's random-read tool: static, so it needs nothing from the domU image.
mkdir -p "$WORK/bin"
CC=$(command -v cc || command -v gcc || command -v clang) || lab_die "no C compiler for randread.c"
"$CC" -static -O2 -Wall -o "$WORK/bin/randread" "$LAB/tests/guest/randread.c" || lab_die "cannot build randread"
# The guest's evdev reader for the USB keyboard check, static as well.
"$CC" -static -O2 -Wall -o "$WORK/bin/evkeys" "$LAB/tests/guest/evkeys.c" || lab_die "cannot build evkeys"
TB=$(date +%s)
lab_say "softdev, randread and evkeys ready in $((TB-T0))s"

rc=0
export LAB_USB=${LAB_USB:-1}
LAB_TIMEOUT=${LAB_TIMEOUT:-3600} "$LAB/run.sh" --test "${SOFTDEV_LAB_TEST:-$LAB/tests/softdev.sh}" \
  --bin "$SOFTDEV_BIN" --bin "$PROBE_BIN" --file "$WORK/bin/randread" --file "$WORK/bin/evkeys" || rc=$?
# The ids | crypt section leaves its LUKS image and key in the share: opened here with qemu-img.
"$LAB/tests/ids-host.sh" "$WORK/share" || { echo "lab: FAILED (host checks of the ids image)"; rc=1; }
exit $rc
