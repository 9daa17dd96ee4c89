# domU side of the USB tests (busybox sh, as /test/run.sh): loads the USB frontend and class
# drivers, then runs net-agent.sh's command loop (no network: dom0 drives it with gx, see
# tests/usb-lib.sh) with the helpers below. The guest's only USB bus is its xen-hcd (usb1),
# so the device on port P is 1-P.
for m in xen-hcd usb-storage sd_mod usbhid hid-generic evdev; do
  modprobe "$m" || echo "[usb-agent] modprobe $m failed"
done
DD=/usr/bin/dd

# usb_disk P: the sd name of the stick on port P (empty if none yet).
usb_disk() {
  local b
  for b in /sys/bus/usb/devices/1-$1:1.0/host*/target*/*/block/*; do
    [ -e "$b" ] && { echo "${b##*/}"; return 0; }
  done
  return 1
}
# wait_disk P SECONDS: until the stick on port P has a block device with a size.
wait_disk() {
  local i=0 d
  until d=$(usb_disk "$1") && [ -b "/dev/$d" ] && [ "$(cat /sys/block/$d/size 2>/dev/null)" -gt 0 ] 2>/dev/null; do
    i=$((i+1)); [ $i -gt $(($2*2)) ] && { echo "no disk on port $1 after $2 s"; ls /sys/bus/usb/devices/; return 1; }
    sleep 0.5
  done
  echo "port $1: /dev/$d, $(cat /sys/block/$d/size) sectors, $(cat /sys/bus/usb/devices/1-$1/speed 2>/dev/null) Mbit/s," \
    "$(cat /sys/bus/usb/devices/1-$1/idVendor 2>/dev/null):$(cat /sys/bus/usb/devices/1-$1/idProduct 2>/dev/null)" \
    "\"$(cat /sys/bus/usb/devices/1-$1/product 2>/dev/null)\""
}
# wait_gone P SECONDS: until no device is on port P.
wait_gone() {
  local i=0
  while [ -e "/sys/bus/usb/devices/1-$1" ]; do
    i=$((i+1)); [ $i -gt $(($2*2)) ] && { echo "a device is still on port $1 after $2 s"; return 1; }
    sleep 0.5
  done
  echo "port $1: no device"
}
# no_device P SECONDS: no device comes on port P within SECONDS.
no_device() {
  local i=0
  while [ $i -lt $(($2*2)) ]; do
    [ -e "/sys/bus/usb/devices/1-$1" ] && { echo "a device came on port $1: $(cat /sys/bus/usb/devices/1-$1/product 2>/dev/null)"; return 1; }
    i=$((i+1)); sleep 0.5
  done
  echo "port $1: no device in $2 s"
}
# kbd_event P: the evdev node of the keyboard on port P.
kbd_event() {
  local e
  for e in /sys/bus/usb/devices/1-$1:1.0/*/input/input*/event*; do [ -e "$e" ] && { echo "/dev/input/${e##*/}"; return 0; }; done
  return 1
}
wait_kbd() {
  local i=0
  until e=$(kbd_event "$1") && [ -c "$e" ]; do
    i=$((i+1)); [ $i -gt $(($2*2)) ] && { echo "no keyboard on port $1 after $2 s"; ls /sys/bus/usb/devices/; return 1; }
    sleep 0.5
  done
  echo "port $1: keyboard $e ($(cat /sys/bus/usb/devices/1-$1/product 2>/dev/null))"
}
# kbd_reader P: starts evkeys on the keyboard of port P (in the background, 60 s) and returns
# once it has the evdev node open, so that nothing typed after is missed.
kbd_reader() {
  local i=0 e
  e=$(kbd_event "$1") || { echo "no keyboard on port $1"; return 1; }
  rm -f /run/keys /run/keys.ready /run/keys.rc
  (sh -c "/test/evkeys $e 60 /run/keys.ready > /run/keys 2>&1; echo \$? > /run/keys.rc" &)
  until [ -e /run/keys.ready ]; do
    i=$((i+1)); [ $i -gt 60 ] && { echo "evkeys did not open $e in 30 s"; return 1; }
    sleep 0.5
  done
  echo "evkeys reads $e"
}
# kbd_text: waits (at most 70 s) until evkeys has ended, then prints what it read.
kbd_text() {
  local i=0
  until [ -e /run/keys.rc ]; do i=$((i+1)); [ $i -gt 140 ] && break; sleep 0.5; done
  cat /run/keys
  [ "$(cat /run/keys.rc 2>/dev/null)" = 0 ]
}
# dd_rate ARGS...: GNU dd; prints its rate in MB/s (a number), fails with dd's output.
dd_rate() {
  local out
  out=$($DD "$@" 2>&1) || { echo "dd $*: $out"; return 1; }
  echo "$out" | tail -n 1 | awk '{ for (i = 1; i <= NF; i++) if ($i == "copied,") { printf "%.1f\n", $1 / $(i+1) / 1000000; exit } }'
}
# seq_rates P MIB: MIB MiB of 1 MiB direct writes then reads on port P's stick: "W R" (MB/s).
seq_rates() {
  local d w r
  d=$(usb_disk "$1") || { echo "no disk on port $1"; return 1; }
  w=$(dd_rate if=/dev/zero of=/dev/$d bs=1M count="$2" oflag=direct conv=fsync) || { echo "$w"; return 1; }
  r=$(dd_rate if=/dev/$d of=/dev/null bs=1M count="$2" iflag=direct) || { echo "$r"; return 1; }
  echo "rates $w $r"
}
# busy_io P: direct writes and reads on port P's stick without end (until the guest goes).
busy_io() {
  local d n=0
  d=$(usb_disk "$1") || return 1
  while :; do
    $DD if=/dev/zero of=/dev/$d bs=64k count=16 oflag=direct 2>/dev/null || return 1
    $DD if=/dev/$d of=/dev/null bs=64k count=16 iflag=direct 2>/dev/null || return 1
    n=$((n+1)); lab_put io-rounds "$n"
  done
}

. /test/net-agent.sh
