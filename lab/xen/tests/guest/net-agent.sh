# domU side of the network tests (busybox sh, as /test/run.sh): brings the
# network up, then runs the commands dom0 gives it, one at a time, until told
# to stop. dom0 drives everything (gx in tests/net-lib.sh), so one guest serves
# many checks without a boot each.
#   LAB_NET="MAC=ADDR/LEN ..."  interfaces to bring up at boot (found by MAC:
#                               netfront names them in probe order); or
#                               lab_net=MAC=ADDR/LEN,... on the kernel's command line
# Protocol (all under the guest's data/): dom0 writes `cmd` (shell text,
# evaluated here with the functions below) and then `cmd-seq` = N; the agent
# runs it, writes `cmd-out` (the end of its output) and then `cmd-rc-N` (its
# status). `cmd` = exit ends the agent (the runner then reports lab-result).
# busybox sh prefers its own applets, so the real tools are called by path.
. /lab-domu.sh
IP=/usr/bin/ip PING=/usr/bin/ping IPERF=/usr/bin/iperf3 ETHTOOL=/usr/bin/ethtool

# ifname MAC: the interface that has MAC (status 1 if none).
ifname() {
  local d
  for d in /sys/class/net/*; do
    [ "$(cat "$d/address" 2>/dev/null)" = "$1" ] && { echo "${d##*/}"; return 0; }
  done
  return 1
}
# wait_if MAC SECONDS / wait_if_gone MAC SECONDS: until the interface is there / gone
# (polled every 0.5 s: under TCG every process a guest starts is costly, and a busy
# guest slows dom0 and the others).
wait_if() {
  local i=0
  until ifname "$1" > /dev/null; do
    i=$((i+1)); [ $i -gt $(($2*2)) ] && { echo "no interface with $1 after $2 s"; return 1; }
    sleep 0.5
  done
}
wait_if_gone() {
  local i=0
  while ifname "$1" > /dev/null; do
    i=$((i+1)); [ $i -gt $(($2*2)) ] && { echo "the interface with $1 is still there after $2 s"; return 1; }
    sleep 0.5
  done
  echo "the interface with $1 is gone"
}
# net_up MAC ADDR/LEN [MTU]: wait for the interface, bring it up with that address.
net_up() {
  local dev
  wait_if "$1" 60 || return 1
  dev=$(ifname "$1")
  [ -z "${3:-}" ] || $IP link set "$dev" mtu "$3" || return 1
  $IP link set "$dev" up || return 1
  $IP addr replace "$2" dev "$dev" || return 1
  echo "$dev ($1) up: $2 mtu $(cat /sys/class/net/$dev/mtu)"
}
# iperf_server: one iperf3 test (-1) in the background, bounded; returns once it listens.
iperf_server() {
  local i=0
  (timeout 90 $IPERF -s -1 > /run/iperf-s.log 2>&1 &)
  until awk '$2 ~ /:1451$/ && $4 == "0A" { found = 1 } END { exit !found }' /proc/net/tcp /proc/net/tcp6 2>/dev/null; do
    i=$((i+1)); [ $i -gt 60 ] && { echo "iperf3 -s does not listen"; cat /run/iperf-s.log; return 1; }
    sleep 0.25
  done
}
# features MAC: what the guest's netfront has for that interface.
features() {
  local dev
  dev=$(ifname "$1") || { echo "no interface with $1"; return 1; }
  echo "$dev: mtu $(cat /sys/class/net/$dev/mtu), queues: $(ls /sys/class/net/$dev/queues | tr '\n' ' ')"
  $ETHTOOL -k "$dev" | grep -E '^(scatter-gather|tcp-segmentation-offload|generic-segmentation-offload|tx-checksumming|rx-checksumming):'
}

LAB_NET=${LAB_NET:-$(echo "${lab_net:-}" | tr , ' ')}
for spec in $LAB_NET; do
  net_up "${spec%%=*}" "${spec#*=}" || exit 1
done
lab_put net-ready 1
n=0
while :; do
  seq=$(xenstore-read data/cmd-seq 2>/dev/null) || seq=0
  if [ "$seq" = "$n" ]; then
    # Block until dom0 writes the next command (the first event is the watch's own;
    # bounded, in case the write fell between the read above and the watch).
    timeout 5 xenstore-watch -n 2 data/cmd-seq > /dev/null 2>&1
  else
    n=$seq
    cmd=$(xenstore-read -R data/cmd)
    echo "[agent $n] $cmd"
    if [ "$cmd" = exit ]; then lab_put "cmd-rc-$n" 0; break; fi
    ( eval "$cmd" ) > /run/cmd.out 2>&1
    rc=$?
    xenstore-write -R data/cmd-out "$(tail -c 2500 /run/cmd.out)"
    lab_put "cmd-rc-$n" "$rc"
  fi
done
