#!/bin/bash
# Run the Xen lab: build it if needed, boot Xen + dom0 under QEMU (TCG), run a
# dom0 test script and report.
#
#   lab/xen/run.sh                    run the built-in smoke test (tests/smoke.sh)
#   lab/xen/run.sh --test SCRIPT      run SCRIPT in dom0 instead
#   lab/xen/run.sh --bin PROGRAM      put PROGRAM and its shared libraries into
#                                     the share; dom0 runs it as /mnt/host/bin/NAME
#                                     (repeatable; see lab_share_binary in lib/host.sh)
#   lab/xen/run.sh --file PATH        copy a file or folder to /mnt/host/files/ (repeatable)
#   lab/xen/run.sh --keep-share ...   do not empty work/share first
# Environment: LAB_WORK (work folder), LAB_TIMEOUT (seconds for the whole QEMU
# run, default 580), LAB_VERBOSE=1 (stream the serial console while running),
# LAB_USB=1 (give dom0 the USB controller and stick of the USB section; test-softdev.sh
# sets it unless told LAB_USB=0), LAB_USB_STICK_MIB (the size of that stick, default 32).
# LAB_USB and the tests' knobs (USB_BENCH_*, NET_BENCH_ROUNDS, NET_IPERF_SECONDS) reach dom0's
# test through the share (lab-env, sourced by lib/lab.sh).
#
# Exit status: 0 if the lab came up and the dom0 test exited 0; otherwise
# non-zero, after printing what was checked and the end of the console log.
set -euo pipefail

LAB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORK=${LAB_WORK:-$LAB/work}
export LAB_WORK=$WORK
# shellcheck source=lib/host.sh
. "$LAB/lib/host.sh"

TEST=$LAB/tests/smoke.sh
KEEP_SHARE=0
BINS=()
FILES=()
while [ $# -gt 0 ]; do
  case $1 in
    --test) [ $# -ge 2 ] || lab_die "--test needs a script"; TEST=$2; shift 2 ;;
    --bin) [ $# -ge 2 ] || lab_die "--bin needs a program"; BINS+=("$2"); shift 2 ;;
    --file) [ $# -ge 2 ] || lab_die "--file needs a path"; FILES+=("$2"); shift 2 ;;
    --keep-share) KEEP_SHARE=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) lab_die "unknown argument $1 (see --help)" ;;
  esac
done
[ -f "$TEST" ] || lab_die "no test script $TEST"

T0=$(date +%s)
"$LAB/build.sh" || lab_die "build failed"
TB=$(date +%s)

IMG=$WORK/img
SHARE=$WORK/share
if [ $KEEP_SHARE = 0 ]; then rm -rf "$SHARE"; fi
mkdir -p "$SHARE/lab/img" "$SHARE/lab/lib"
rm -f "$SHARE"/dom0-test.{rc,log} "$SHARE/dom0-init.log"
rm -rf "$SHARE/xen-logs"
cp "$IMG/vmlinuz" "$IMG/domU-initrd.gz" "$SHARE/lab/img/"
cp "$LAB"/lib/lab.sh "$SHARE/lab/lib/"
cp "$LAB/domU/lab-domu.sh" "$SHARE/lab/lib/"
cp -a "$LAB/tests" "$SHARE/lab/"
cp "$TEST" "$SHARE/dom0-test.sh"
for b in "${BINS[@]}"; do lab_share_binary "$SHARE" "$b"; lab_say "shared program $b as /mnt/host/bin/$(basename "$b")"; done
for f in "${FILES[@]}"; do mkdir -p "$SHARE/files"; cp -a "$f" "$SHARE/files/" || lab_die "cannot copy $f"; done
: > "$SHARE/lab-env"
for v in LAB_USB USB_BENCH_FULL USB_BENCH_ROUNDS USB_BENCH_MIB USB_BENCH_ONLY NET_BENCH_ROUNDS NET_IPERF_SECONDS; do
  if [ -n "${!v:-}" ]; then printf '%s=%q\n' "$v" "${!v}" >> "$SHARE/lab-env"; fi
done

# dom0's real USB device: a high-speed usb-storage stick on an EHCI (USB 2.0) controller
# (usbif has no SuperSpeed), backed by a fresh sparse image each run; the USB tests pass it
# through to guests (softdev's host(), QEMU's qusb).
USB=()
if [ "${LAB_USB:-0}" = 1 ]; then
  STICK=$WORK/usb-stick.img
  rm -f "$STICK"; truncate -s "${LAB_USB_STICK_MIB:-32}M" "$STICK"
  USB=(-device usb-ehci,id=ehci -drive "if=none,id=stick,file=$STICK,format=raw,cache=unsafe"
       -device usb-storage,bus=ehci.0,drive=stick,serial=SOFTDEVLAB1)
fi

CONSOLE=$WORK/console.log
TIMEOUT=${LAB_TIMEOUT:-580}
lab_say "booting Xen + dom0 under QEMU (TCG), test $(basename "$TEST"), timeout ${TIMEOUT}s; console: $CONSOLE"
qemu=(timeout --foreground -k 5 "$TIMEOUT" qemu-system-x86_64 -accel tcg -machine q35 -cpu qemu64,+svm
  -smp 2 -m 2048 -nographic -no-reboot -serial mon:stdio -kernel "$IMG/xen"
  -append "console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all dom0_mem=1024M,max:1024M dom0_max_vcpus=2"
  -initrd "$IMG/vmlinuz console=hvc0 earlyprintk=xen rdinit=/init loglevel=6,$IMG/dom0-initrd.gz"
  -virtfs "local,path=$SHARE,mount_tag=host0,security_model=none,id=host0" "${USB[@]}")
set +e
if [ "${LAB_VERBOSE:-0}" = 1 ]; then
  "${qemu[@]}" < /dev/null 2>&1 | tee "$CONSOLE"; qrc=${PIPESTATUS[0]}
else
  "${qemu[@]}" < /dev/null > "$CONSOLE" 2>&1; qrc=$?
fi
set -e
TQ=$(date +%s)

# ------------------------------------------------------------------- report
ok=1
check() { if [ "$1" = ok ]; then echo "  ok   $2"; else echo "  FAIL $2"; ok=0; fi; }
echo "==== dom0 test output ($(basename "$TEST")) ===="
cat "$SHARE/dom0-test.log" 2>/dev/null || echo "(none)"
echo "==== lab checks ===="
if [ $qrc = 0 ]; then check ok "QEMU exited by itself (dom0 powered off)"
elif [ $qrc = 124 ] || [ $qrc = 137 ]; then check fail "QEMU was stopped by the ${TIMEOUT}s timeout"
else check fail "QEMU exited with status $qrc"; fi
grep -q '(XEN) Xen version 4.17' "$CONSOLE" && check ok "Xen 4.17 booted" || check fail "Xen 4.17 booted"
for s in mounts modules share xenstored xenconsoled xen-init-dom0 xl-info lab-images test; do
  # dom0-init.log is saved at power-off; the console has the same lines.
  if grep -q "stage $s ok" "$SHARE/dom0-init.log" "$CONSOLE" 2>/dev/null; then check ok "dom0 stage $s"
  else check fail "dom0 stage $s"; break; fi
done
grep -h '\[dom0-init\] FAILED:' "$CONSOLE" 2>/dev/null | tr -d '\r' | sed 's/^/       /' || true
if [ -f "$SHARE/dom0-test.rc" ]; then
  trc=$(cat "$SHARE/dom0-test.rc")
  [ "$trc" = 0 ] && check ok "dom0 test exited 0" || check fail "dom0 test exited $trc"
else
  check fail "dom0 test ran (no dom0-test.rc in the share)"
fi
echo "times: build $((TB-T0))s, QEMU $((TQ-TB))s, total $((TQ-T0))s"
if [ $ok = 1 ]; then
  echo "lab: PASSED"
  exit 0
fi
echo "==== last 60 console lines ($CONSOLE) ===="
tail -n 60 "$CONSOLE" | tr -d '\r'
echo "lab: FAILED (xl and guest logs: $SHARE/xen-logs)"
exit 1
