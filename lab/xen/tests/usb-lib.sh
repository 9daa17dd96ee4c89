# The USB section of the SoftDev lab (bash; source after lib/lab.sh, softdev-lib.sh and
# net-lib.sh, for gx and best/ratio; softdev serve must be running). SoftDev's usbif backend
# (softdev-vusb) serves Linux's xen-hcd (built out of tree by build.sh):
#   u1  port 1 = storage(file) (a soft stick: ext4 round trip, dom0 reads the files back),
#       port 2 = keyboard (`softdev type` -> /dev/input/event* in the guest), port 3 hot-plugged
#       and unplugged while the guest runs, port 4 = dom0's real stick (QEMU's usb-storage on
#       EHCI, bound in dom0 by usb-storage) through host(): allowed by a policy(rules=...),
#       blocked by one, and under readonly-storage
#   ud  a soft stick, destroyed mid-transfer while the daemon goes on serving u1
#   uq  QEMU's qusb controller (xl usbctrl), the same real stick through xl usbdev-attach
# Every guest runs guest/usb-agent.sh (net-agent.sh's command loop); dom0 runs commands in it
# with gx. The bench: sequential 1 MiB direct dd through SoftDev's host() passthrough (u1),
# through qusb (uq) and on SoftDev's soft stick over a file (u1), interleaved rounds.
# shellcheck shell=bash

# The CI run's bench is small (its numbers vary by several times from run to run under TCG
# anyway); USB_BENCH_FULL=1 (through run.sh's lab-env) measures 3 rounds of 16 MiB.
if [ "${USB_BENCH_FULL:-0}" = 1 ]; then USB_BENCH_MIB=${USB_BENCH_MIB:-16}; USB_BENCH_ROUNDS=${USB_BENCH_ROUNDS:-3}; fi
USB_BENCH_MIB=${USB_BENCH_MIB:-4}
USB_BENCH_ROUNDS=${USB_BENCH_ROUNDS:-2}
USB_BENCH_BACKENDS=(passthrough qusb soft)
USB_STICK_ID=46f4:0001          # QEMU's usb-storage (run.sh: serial SOFTDEVLAB1)
declare -A USB_BENCH           # USB_BENCH[backend.w|r] = best MB/s

usb_be() { echo "/local/domain/0/backend/softdev-vusb/${NETDOM[$1]}/0"; }
usb_gone() { xs_gone "/local/domain/0/backend/softdev-vusb/$1"; }

# usb_guest NAME [CFG LINE...]: a paused guest running usb-agent.sh (1 vCPU, 128 MiB).
usb_guest() {
  local name=$1; shift
  if [ ! -s /run/usb-agent.gz ]; then
    lab_domu_initrd /run/usb-agent.gz "$G/usb-agent.sh" "$G/net-agent.sh" "$G/ext4.sh" "$G/marker.sh" \
      "$LAB_SHARE/files/evkeys" || return 1
  fi
  lab_domu_config "/run/$name.cfg" "$name" /run/usb-agent.gz "$@"
  if ! timeout 120 xl create -p "/run/$name.cfg" > /run/xl-create.log 2>&1; then
    cat /run/xl-create.log; echo "usb_guest: xl create -p /run/$name.cfg failed" >&2; return 1
  fi
  NETDOM[$name]=$(lab_domid "$name")
  lab_log "$name: domain ${NETDOM[$name]}, paused"
}

# dom0's real stick: its sysfs name (1-1), its block device while dom0's usb-storage holds it.
dom0_stick() {
  local d
  for d in /sys/bus/usb/devices/*; do
    [ "$(cat "$d/idVendor" 2>/dev/null):$(cat "$d/idProduct" 2>/dev/null)" = $USB_STICK_ID ] && { echo "${d##*/}"; return 0; }
  done
  return 1
}
dom0_stick_disk() {
  local s b; s=$(dom0_stick) || return 1
  for b in /sys/bus/usb/devices/$s:1.0/host*/target*/*/block/*; do
    [ -b "/dev/${b##*/}" ] && [ "$(cat "$b/size")" -gt 0 ] && { echo "/dev/${b##*/}"; return 0; }
  done
  return 1
}
dom0_stick_ready() { dom0_stick_disk > /dev/null; }
# dom0_stick_marker MARKER: dom0 writes MARKER at sector 0 of its stick (through usb-storage).
dom0_stick_marker() {
  local dev; dev=$(dom0_stick_disk) || return 1
  echo "  dom0's stick: $(dom0_stick) = $dev, $(blockdev --getsize64 "$dev") bytes"
  dd if=/dev/zero of="$dev" bs=1M count=1 oflag=direct status=none && printf '%s' "$1" | dd of="$dev" conv=notrunc,fsync status=none
}
dom0_stick_sector8() { local dev; dev=$(dom0_stick_disk) || return 1; [ "$(dd if="$dev" bs=512 skip=8 count=1 iflag=direct status=none | tr -d '\000')" = "DOMU-WROTE-$1" ]; }
# (its first 4 MiB: where the guest tried to write; all of it is slow to read through dom0's EHCI under TCG)
dom0_stick_sum() { local dev; dev=$(dom0_stick_disk) || return 1; dd if="$dev" bs=1M count=4 iflag=direct status=none | sha256sum | cut -d' ' -f1; }

# usb_detach NAME PORT: softdev detach of a port, then the guest sees it go.
usb_detach() {
  sd detach "$1" "$2" --class usb > /run/detach.out 2>&1 || { cat /run/detach.out; return 1; }
  gx "$1" "wait_gone $2 60"
}
# port_error NAME PORT TEXT: the daemon refused the port's stack, saying TEXT (its port-error node).
port_error() {
  local e
  wait_until 60 xenstore-exists "$(usb_be "$1")/port-error/$2" || { echo "no port-error/$2 node"; return 1; }
  e=$(xenstore-read "$(usb_be "$1")/port-error/$2")
  echo "  port-error/$2: $e"
  grep -q -- "$3" <<<"$e"
}
# soft_files_match: dom0 mounts u1's soft stick image read-only and finds the files the guest wrote.
soft_files_match() {
  local g h
  g=$(gx u1 "sha256sum < /run/sums") || return 1
  mkdir -p /mnt/usb && mount -t ext4 -o ro,loop,noload /run/usb-soft.img /mnt/usb || return 1
  h=$( (cd /mnt/usb && find . -type f | sort | xargs sha256sum) | sha256sum | cut -d' ' -f1)
  echo "  dom0: $(find /mnt/usb -type f | wc -l) files, digest of their sums $h; the guest's: ${g##* }"
  umount /mnt/usb
  [ -n "$h" ] && grep -q "$h" <<<"$g"
}
# kbd_typed TEXT: dom0 types TEXT + Enter on u1's keyboard (port 2) once the guest's evkeys has
# the evdev node open; the guest's evdev reads TEXT.
kbd_typed() {
  gx u1 "kbd_reader 2" 60 || return 1
  sd type u1 2 "$1\\n" || return 1
  gx u1 "kbd_text" 90 > /run/keys.out
  cat /run/keys.out
  grep -qxF "  [u1] $1" /run/keys.out
}
# host_marker_roundtrip MARKER: u1 reads dom0's marker on port 4 and writes sector 8.
host_marker_roundtrip() {
  gx u1 "wait_disk 4 120" 150 || return 1
  gx u1 "printf '%s' '$1' > /run/hmarker; LAB_DEV=/dev/\$(usb_disk 4) LAB_MARKER=/run/hmarker sh /test/marker.sh" 120
}
host_readonly() {
  gx u1 "wait_disk 4 120" 150 || return 1
  gx u1 "printf '%s' '$1' > /run/hmarker; LAB_DEV=/dev/\$(usb_disk 4) LAB_MARKER=/run/hmarker LAB_READONLY=1 sh /test/marker.sh && ! \$DD if=/dev/zero of=/dev/\$(usb_disk 4) bs=4k count=1 oflag=direct 2>&1" 120
}
usb_destroyed() { wait_until 30 usb_gone "${NETDOM[$1]}" && wait_until 30 domain_gone "${NETDOM[$1]}"; }

# usb_bench_round R: passthrough (u1 port 4), qusb (uq), soft (u1 port 1), each write then read.
usb_bench_one() {
  local b=$1 g=$2 p=$3 out w r
  out=$(gx "$g" "seq_rates $p $USB_BENCH_MIB" 300) || { echo "$out"; return 1; }
  echo "$out" | sed "s/^/  bench $b: /"
  read -r w r <<<"$(sed -n 's/.*rates //p' <<<"$out")"
  [ -n "$w" ] && [ -n "$r" ] || return 1
  USB_BENCH[$b.w]=$(best "$w" "${USB_BENCH[$b.w]:-}"); USB_BENCH[$b.r]=$(best "$r" "${USB_BENCH[$b.r]:-}")
}
usb_bench_round() {
  local s bus addr
  sd attach u1 usb 4 "host(id=$USB_STICK_ID)" > /dev/null && gx u1 "wait_disk 4 120" 150 > /dev/null \
    && usb_bench_one passthrough u1 4
  usb_detach u1 4 > /dev/null
  s=$(dom0_stick) && bus=$(cat "/sys/bus/usb/devices/$s/busnum") && addr=$(cat "/sys/bus/usb/devices/$s/devnum")
  if timeout 120 xl usbdev-attach uq hostbus="$bus" hostaddr="$addr" controller=0 port=1 > /run/xl-usb.log 2>&1; then
    gx uq "wait_disk 1 120" 150 > /dev/null && usb_bench_one qusb uq 1
    timeout 120 xl usbdev-detach uq 0 1 >> /run/xl-usb.log 2>&1
    gx uq "wait_gone 1 60" > /dev/null
  else
    echo "  bench qusb: xl usbdev-attach uq hostbus=$bus hostaddr=$addr failed: $(cat /run/xl-usb.log)"
  fi
  usb_bench_one soft u1 1
}

usb_bench_table() {
  local b
  echo "==== USB side by side (guests u1 and uq: 1 vCPU, 128 MiB; ${USB_BENCH_MIB} MiB sequential 1 MiB O_DIRECT dd on the raw stick, ${USB_BENCH_ROUNDS} interleaved rounds, best round shown; MB/s) ===="
  printf '%-44s %12s %12s\n' path "write MB/s" "read MB/s"
  printf '%-44s %12s %12s\n' "passthrough: softdev host() -> dom0's stick" "${USB_BENCH[passthrough.w]:--}" "${USB_BENCH[passthrough.r]:--}"
  printf '%-44s %12s %12s\n' "qusb: QEMU usb-host -> dom0's stick" "${USB_BENCH[qusb.w]:--}" "${USB_BENCH[qusb.r]:--}"
  printf '%-44s %12s %12s\n' "soft: softdev storage(file) in dom0 tmpfs" "${USB_BENCH[soft.w]:--}" "${USB_BENCH[soft.r]:--}"
  printf '%-44s %12s %12s\n' "passthrough/qusb" "$(ratio "${USB_BENCH[passthrough.w]:-}" "${USB_BENCH[qusb.w]:-}")" \
    "$(ratio "${USB_BENCH[passthrough.r]:-}" "${USB_BENCH[qusb.r]:-}")"
  printf '%-44s %12s %12s\n' "soft/qusb" "$(ratio "${USB_BENCH[soft.w]:-}" "${USB_BENCH[qusb.w]:-}")" \
    "$(ratio "${USB_BENCH[soft.r]:-}" "${USB_BENCH[qusb.r]:-}")"
}

# Multi-step checks (functions, not subshells: gx numbers its commands in xenstore).
u1_attach() {
  sd attach u1 usb 1 'storage(device="file(path=/run/usb-soft.img)")' --ports 4 && sd attach u1 usb 2 keyboard
}
u1_hotplug() { sd attach u1 usb 3 'storage(device="null(size=8M)")' > /dev/null && gx u1 "wait_disk 3 120" 150; }
# (A daemon that answers attach (usbpolicy's `softdev attach` waits for port-device/N or
# port-error/N) makes attach itself fail with the reason and empties the port again; before that,
# attach succeeded and the reason stayed in port-error/N. Either way the rule must be named.)
u1_blocked() {
  local why="is blocked by rule .*usb-block.rules:2"
  if sd attach u1 usb 4 "policy(rules=/run/usb-block.rules) | host(id=$USB_STICK_ID)" > /run/attach.out 2>&1; then
    port_error u1 4 "$why"
  else
    echo "  attach refused: $(cat /run/attach.out)"
    grep -q -- "$why" /run/attach.out
  fi
}
u1_readonly() { sd attach u1 usb 4 "readonly-storage | host(id=$USB_STICK_ID)" > /dev/null && host_readonly "$1"; }
stick_unchanged() { wait_until 60 dom0_stick_ready && [ "$(dom0_stick_sum)" = "$1" ]; }

# usb_all: the whole USB section.
usb_all() {
  local t0 d
  lab_log "3c. USB: u1 (soft stick, keyboard, hot-plug, dom0's stick through host() and policies), ud destroyed mid-transfer, qusb bench"
  lab_check "dom0: the emulated stick ($USB_STICK_ID) is on dom0's EHCI, usb-storage gives it a disk" wait_until 60 dom0_stick_ready \
    || { ls /sys/bus/usb/devices/ 2>&1; dmesg | grep -i usb | tail -20; }
  new_image /run/usb-soft.img 16
  new_image /run/usb-ud.img 8
  printf 'allow id %s with-interface 08:06:50\n' $USB_STICK_ID > /run/usb-allow.rules
  printf '# the lab stick may not reach guests\nblock id %s\n' $USB_STICK_ID > /run/usb-block.rules
  usb_guest u1 || { lab_check "u1: xl create -p" false; return 1; }
  local guests="u1 ud uq"
  [ "${USB_BENCH_ONLY:-0}" = 1 ] && guests="u1 uq"
  [ "$guests" = "u1 uq" ] || usb_guest ud || { lab_check "ud: xl create -p" false; return 1; }
  usb_guest uq 'usbctrl = [ "type=qusb,version=2,ports=4" ]' || { lab_check "uq: xl create -p (usbctrl type=qusb)" false; return 1; }
  lab_check "u1: softdev attach u1 usb 1 storage(file) --ports 4, usb 2 keyboard (before unpause)" u1_attach
  [ "$guests" = "u1 uq" ] || lab_check "ud: softdev attach ud usb 1 storage(file)" sd attach ud usb 1 'storage(device="file(path=/run/usb-ud.img)")'
  t0=$(date +%s)
  for d in $guests; do xl unpause $d; done
  for d in $guests; do
    lab_check "$d: the USB agent is up" net_ready $d || lab_domu_console_log $d | sed "s/^/[$d] /"
  done
  lab_log "USB guests ($guests) up $(( $(date +%s) - t0 ))s after unpause"
  lab_check "u1: xen-hcd connected to softdev-vusb (frontend state 4)" wait_until 60 xs_is "/local/domain/${NETDOM[u1]}/device/vusb/0/state" 4

  [ "${USB_BENCH_ONLY:-0}" = 1 ] || usb_checks
  usb_bench
  xl destroy u1; xl destroy uq
  lab_check "u1: destroyed; the daemon removes its controller, Xen frees the domain" usb_destroyed u1
  rm -f /run/usb-soft.img /run/usb-ud.img /run/usb-agent.gz
}

# usb_checks: the soft stick, the keyboard, hot-plug, a guest destroyed mid-transfer, dom0's
# stick through host() under the policies and readonly-storage (u1, ud).
usb_checks() {
  local m sum0
  # ----- the soft stick and the keyboard
  lab_check "u1: the soft stick enumerates (port 1, high speed, a disk)" gx u1 "wait_disk 1 120" 150
  lab_check "u1: ext4 on the soft stick: mkfs, a tree of files, umount, fsck.ext4 -fn clean, remount, sha256" \
    gx u1 "LAB_DEV=/dev/\$(usb_disk 1) sh /test/ext4.sh" 400
  lab_check "dom0: the image holds the guest's files (mount -o ro,loop, the same sha256 sums)" soft_files_match
  lab_check "dom0: fsck.ext4 -fn is clean on the soft stick's image" fsck.ext4 -fn /run/usb-soft.img
  lab_check "u1: the keyboard enumerates (port 2, an evdev node)" gx u1 "wait_kbd 2 120" 150
  lab_check "u1: 'softdev type u1 2' arrives as key events in the guest (evdev)" kbd_typed "hello usb 42"

  # ----- hot-plug and unplug while the guest runs
  lab_check "u1: hot-plug: softdev attach u1 usb 3 storage(null) while it runs; the guest sees the disk" u1_hotplug
  lab_check "u1: unplug: softdev detach u1 3 --class usb; the guest sees it go" usb_detach u1 3

  # ----- a guest destroyed mid-transfer
  lab_check "ud: its soft stick enumerates" gx ud "wait_disk 1 120" 150
  gx ud "(busy_io 1 > /run/busy.out 2>&1 &); echo started" > /dev/null
  lab_check "ud: I/O is running in the guest" wait_until 120 xs_at_least "/local/domain/${NETDOM[ud]}/data/io-rounds" 2
  xl destroy ud
  lab_check "ud: destroyed mid-transfer; the daemon removes its controller, Xen frees the domain" usb_destroyed ud
  lab_check "the daemon survived (running, no crash in its log)" sd_alive
  lab_check "u1: the soft stick still serves (1 MiB direct read)" gx u1 "\$DD if=/dev/\$(usb_disk 1) of=/dev/null bs=1M count=1 iflag=direct 2>&1 | tail -1"

  # ----- dom0's real stick through host(): allowed, blocked, read-only
  m=USB-M-$RANDOM$RANDOM
  lab_check "dom0: writes a marker on its stick (usb-storage)" dom0_stick_marker "$m"
  lab_check "u1: softdev attach u1 usb 4 'policy(rules=allow) | host(id=$USB_STICK_ID)'" \
    sd attach u1 usb 4 "policy(rules=/run/usb-allow.rules) | host(id=$USB_STICK_ID)"
  lab_check "u1: the passed-through stick enumerates; the guest reads dom0's marker, writes sector 8" host_marker_roundtrip "$m"
  lab_check "u1: softdev detach u1 4; the guest sees it go" usb_detach u1 4
  lab_check "dom0: usb-storage has the stick back" wait_until 60 dom0_stick_ready
  lab_check "dom0: sector 8 of its stick holds what the guest wrote" dom0_stick_sector8 "$m"
  lab_check "u1: attach 'policy(rules=block) | host(...)': refused, naming the blocking rule" u1_blocked
  lab_check "u1: the blocked stick never reaches the guest (5 s)" gx u1 "no_device 4 5" 30
  sd detach u1 4 --class usb > /dev/null 2>&1
  lab_check "dom0: usb-storage has the stick (after the refusal)" wait_until 60 dom0_stick_ready
  sum0=$(dom0_stick_sum)
  lab_check "u1: attach 'readonly-storage | host(...)': the guest sees it read-only (marker read), its writes fail" u1_readonly "$m"
  lab_check "u1: softdev detach u1 4 (read-only stick)" usb_detach u1 4
  lab_check "dom0: the stick's sha256 is unchanged after the read-only guest" stick_unchanged "$sum0"
}

# usb_bench: dom0's stick through softdev's host() (u1) and qusb (uq), and the soft stick (u1).
usb_bench() {
  local r
  lab_check "u1: the soft stick is there for the bench" gx u1 "wait_disk 1 120" 150
  lab_check "uq: QEMU's qusb controller connected (xl usbctrl, frontend state 4)" wait_until 60 xs_is "/local/domain/${NETDOM[uq]}/device/vusb/0/state" 4
  # dom0's usb-storage goes: each peer's release would bind it again (a SCSI probe per round).
  rmmod usb_storage 2>/dev/null
  for r in $(seq 1 "$USB_BENCH_ROUNDS"); do usb_bench_round "$r"; done
  lab_check "bench: softdev passthrough measured both ways" test -n "${USB_BENCH[passthrough.w]:-}" -a -n "${USB_BENCH[passthrough.r]:-}"
  lab_check "bench: qusb measured both ways" test -n "${USB_BENCH[qusb.w]:-}" -a -n "${USB_BENCH[qusb.r]:-}"
  lab_check "bench: the soft stick measured both ways" test -n "${USB_BENCH[soft.w]:-}" -a -n "${USB_BENCH[soft.r]:-}"
  lab_check "u1, uq: no USB error in the guests' kernel logs" usb_logs_clean
  for d in u1 uq; do lab_domu_console_log $d | sed "s/^/[$d] /"; done
}

# usb_logs_clean: xen-hcd never failed the protocol, no I/O error on a stick.
USB_BAD='protocol error|backend didn.t release|I/O error|reset high-speed USB device.*failed|device descriptor read.*error'
usb_logs_clean() {
  local d bad=
  for d in u1 uq; do bad+=$(gx $d "dmesg | grep -E '$USB_BAD' | head -5; true" 2>&1); done
  [ -z "$bad" ] || { echo "$bad"; return 1; }
}
