# The network section of the SoftDev lab (bash; source after lib/lab.sh and
# softdev-lib.sh; softdev serve must be running). SoftDev's netif backend
# (softdev-vif) serves Linux's xen-netfront over TAPs and a switch in dom0:
#   n1    2 vCPUs, 256 MiB, vif 0 = pcap | tap(sdn1), 10.99.1.2 <-> dom0 10.99.1.1
#   swa, swb  one vif each on switch(name=lab), 10.99.4.2 and .3, no TAP; swa's
#         frontend has trusted=0 (its netfront copies every tx skb)
# Every guest runs guest/net-agent.sh; dom0 runs commands in it with gx. The
# iperf3 server (-1: one test) runs in the guest, the client in dom0, both
# bounded by timeouts: "dom0->guest" is `iperf3 -c GUEST`, "guest->dom0" the
# same with -R. The bench puts a kernel-netback vif (xl network-attach,
# bridge xenbr0 10.99.2.1) beside n1's SoftDev vif and runs iperf3 through
# each in turn (NET_BENCH_ROUNDS interleaved rounds, best shown).
# shellcheck shell=bash

NET_IPERF_SECONDS=${NET_IPERF_SECONDS:-4}
NET_BENCH_ROUNDS=${NET_BENCH_ROUNDS:-3}
NET_BENCH_BACKENDS=(softdev netback)
declare -A NET_BENCH   # NET_BENCH[backend.dir] = best Mbit/s (dir: tx = guest->dom0, rx = dom0->guest)
declare -A NET_EXTRA   # other measured values for the table (offloads off, UDP packets/s)
declare -A NETDOM      # guest name -> domain id
NET_MAC1=00:16:3e:00:01:01 NET_MAC1B=00:16:3e:00:02:01
NET_MACA=00:16:3e:00:04:01 NET_MACB=00:16:3e:00:04:02
NET_MACG=00:16:3e:00:05:01 NET_GENERATED=20000

# gx NAME CMD [SECONDS]: run CMD in the guest's agent; print its output (prefixed
# [NAME]) and return its status (124 if it did not answer in time).
gx() {
  local name=$1 cmd=$2 limit=${3:-60} d n rc i=0
  d=${NETDOM[$name]}
  n=$(( $(xenstore-read "/local/domain/$d/data/cmd-seq" 2>/dev/null || echo 0) + 1 ))
  xenstore-write -R "/local/domain/$d/data/cmd" "$cmd" && xenstore-write "/local/domain/$d/data/cmd-seq" "$n" || return 1
  until rc=$(xenstore-read "/local/domain/$d/data/cmd-rc-$n" 2>/dev/null); do
    i=$((i+1)); if [ $i -gt $((limit*5)) ]; then echo "gx $name: no answer to '$cmd' after ${limit}s" >&2; return 124; fi
    sleep 0.2
  done
  { xenstore-read -R "/local/domain/$d/data/cmd-out" 2>/dev/null; echo; } | sed "/^$/d; s/^/  [$name] /"
  return "$rc"
}

# net_guest NAME VCPUS MIB LAB_NET [CFG LINE...]: a paused guest running the agent.
# All share one initrd; LAB_NET reaches the agent on the kernel's command line
# (lab_net=..., commas for spaces: the kernel gives init what it does not know
# as environment).
net_guest() {
  local name=$1 vcpus=$2 mib=$3 net=$4; shift 4
  if [ ! -s /run/net-agent.gz ]; then
    guest_script /run/net-agent-run.sh "sh /test/net-agent.sh"
    lab_domu_initrd /run/net-agent.gz /run/net-agent-run.sh "$G/net-agent.sh" || return 1
  fi
  LAB_DOMU_VCPUS=$vcpus LAB_DOMU_MEMORY=$mib LAB_DOMU_EXTRA="lab_net=${net// /,}" \
    lab_domu_config "/run/$name.cfg" "$name" /run/net-agent.gz "$@"
  if ! timeout 120 xl create -p "/run/$name.cfg" > /run/xl-create.log 2>&1; then
    cat /run/xl-create.log; echo "net_guest: xl create -p /run/$name.cfg failed" >&2; return 1
  fi
  NETDOM[$name]=$(lab_domid "$name")
  lab_log "$name: domain ${NETDOM[$name]}, paused"
}

# tap_addr IF ADDR/LEN: once the daemon has made the TAP, give it dom0's address.
tap_addr() { wait_until 60 test -e "/sys/class/net/$1" && ip addr replace "$2" dev "$1" && ip link set "$1" up; }

vif_be() { echo "/local/domain/0/backend/softdev-vif/${NETDOM[$1]}/$2"; }
vif_fe() { echo "/local/domain/${NETDOM[$1]}/device/vif/$2"; }
vifs_gone() { xs_gone "/local/domain/0/backend/softdev-vif/$1"; }

# ping_ok ARGS...: ping from dom0, bounded, printing the summary.
ping_ok() {
  local out rc
  # iputils ping by path: busybox timeout would run its own ping applet (no -M).
  out=$(timeout 30 /usr/bin/ping -c 3 -i 0.2 -W 3 "$@" 2>&1); rc=$?
  grep -E 'packets transmitted|rtt|error|unreachable|too long' <<<"$out" | sed "s/^/  [dom0 ping $*] /"
  [ $rc = 0 ]
}
# gping NAME ARGS...: the same from the guest.
gping() { local name=$1; shift; gx "$name" "timeout 30 \$PING -c 3 -i 0.2 -W 3 $* > /run/ping.out 2>&1; rc=\$?; grep -E 'packets transmitted|rtt|error|unreachable|too long' /run/ping.out; exit \$rc"; }

# iperf_tcp LABEL NAME ADDR [IPERF3 ARGS...]: one iperf3 test, server in the guest,
# client in dom0; prints the summary lines; IPERF_MBPS = the receiver's Mbit/s.
iperf_tcp() {
  local label=$1 name=$2 addr=$3 rc; shift 3
  IPERF_MBPS=
  gx "$name" iperf_server || { echo "iperf $label: no server in $name"; return 1; }
  timeout 60 iperf3 -c "$addr" -f m "$@" > /run/iperf.out 2>&1; rc=$?
  grep -E 'sender|receiver' /run/iperf.out | sed "s/^/iperf $label: /"
  IPERF_MBPS=$(awk '/receiver/ { for (i = 2; i <= NF; i++) if ($i == "Mbits/sec") v = $(i-1) } END { print v }' /run/iperf.out)
  if [ $rc != 0 ] || [ -z "$IPERF_MBPS" ]; then sed "s/^/iperf $label (failed): /" /run/iperf.out; return 1; fi
}

# iperf_udp64 LABEL NAME ADDR [ARGS]: 64-byte UDP datagrams at full speed (-b 0);
# prints the summary and the packets per second the receiver got (UDP_PPS).
iperf_udp64() {
  local label=$1 name=$2 addr=$3 rc; shift 3
  UDP_PPS=
  gx "$name" iperf_server || { echo "iperf $label: no server in $name"; return 1; }
  timeout 60 iperf3 -c "$addr" -f m -u -l 64 -b 0 "$@" > /run/iperf.out 2>&1; rc=$?
  grep -E 'sender|receiver' /run/iperf.out | sed "s/^/iperf $label: /"
  # receiver: "[  5]   0.00-3.00   sec  ...  0.020 ms  LOST/TOTAL (x%)  receiver"
  UDP_PPS=$(awk '/receiver/ { split($3, t, "-"); for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+\/[0-9]+$/) { split($i, l, "/"); if (t[2] > 0) printf "%d", (l[2] - l[1]) / t[2] } }' /run/iperf.out)
  if [ $rc != 0 ] || [ -z "$UDP_PPS" ]; then sed "s/^/iperf $label (failed): /" /run/iperf.out; return 1; fi
  echo "iperf $label: $UDP_PPS packets/s received"
}

# stats_of NAME VIF KEY: a counter of the vif's statistics node ("tx-bytes=..").
stats_of() { xenstore-read "$(vif_be "$1" "$2")/statistics" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$3=//p"; }
# stats_moved NAME VIF TX0 RX0: both byte counters grew by more than 1 MB.
stats_moved() {
  local tx rx
  tx=$(stats_of "$1" "$2" tx-bytes); rx=$(stats_of "$1" "$2" rx-bytes)
  echo "  statistics of $1 vif $2: $(xenstore-read "$(vif_be "$1" "$2")/statistics" 2>/dev/null)"
  [ -n "$tx" ] && [ -n "$rx" ] && [ "$tx" -gt $(( $3 + 1000000 )) ] && [ "$rx" -gt $(( $4 + 1000000 )) ]
}

# NET_BAD: what netfront says when a backend breaks the protocol.
NET_BAD='Disabled for further use|rides the rocket|Missing extra info|Invalid extra type|Bad rx response|rx->offset|Need more slots|Too many slots|Bad GSO type|GSO size must not be zero|too big for wire format|register_netdev err|alloc .* grant refs'
# guest_log_clean NAME: no netfront error in the guest's console log, nor in its
# kernel log (the console shows only errors: loglevel=4).
guest_log_clean() {
  local name=$1 bad
  bad=$(lab_domu_console_log "$name" | grep -E "$NET_BAD")
  if [ -z "$bad" ] && [ -n "${NETDOM[$name]:-}" ]; then
    bad=$(gx "$name" "dmesg | grep -E '$NET_BAD'; true" 2>&1)
  fi
  [ -z "$bad" ] || { echo "$name: $bad"; return 1; }
}

# list_shows NAME VIF TEXT...: `softdev list` has the vif's row, Connected, with each TEXT.
list_shows() {
  local name=$1 vif=$2 row t; shift 2
  row=$(sd list | awk -v n="($name)" -v v="$vif" '$2 == n && $3 == "net" && $4 == v')
  echo "  softdev list: $row"
  grep -q ' Connected  *Connected ' <<<"$row" || return 1
  for t in "$@"; do grep -qF -- "$t" <<<"$row" || return 1; done
}

# pcap_clean FILE: tcpdump reads the capture; ICMP echo both ways and TCP to
# iperf3's port are in it, and no checksum is "incorrect".
pcap_clean() {
  timeout 60 tcpdump -Z root -nn -vv -r "$1" > /run/pcap.txt 2>/run/pcap.err || { cat /run/pcap.err; return 1; }
  echo "  $1: $(grep -c . /run/pcap.txt) lines; ICMP echo request $(grep -c 'ICMP echo request' /run/pcap.txt)," \
    "reply $(grep -c 'ICMP echo reply' /run/pcap.txt), TCP .5201 $(grep -c '\.5201[ :]' /run/pcap.txt)," \
    "incorrect $(grep -c incorrect /run/pcap.txt), cksum correct $(grep -c 'cksum 0x[0-9a-f]* (correct)' /run/pcap.txt)"
  grep -m 3 incorrect /run/pcap.txt | sed 's/^/  /'
  grep -q 'ICMP echo request' /run/pcap.txt && grep -q 'ICMP echo reply' /run/pcap.txt \
    && grep -q '\.5201[ :]' /run/pcap.txt && ! grep -q incorrect /run/pcap.txt
}

net_bench_table() {
  local b
  echo "==== network side by side (guest n1: 2 vCPUs, 256 MiB, MTU 1500; iperf3 TCP ${NET_IPERF_SECONDS} s, ${NET_BENCH_ROUNDS} interleaved rounds, best round shown; Mbit/s) ===="
  printf '%-30s %18s %18s\n' backend "guest->dom0" "dom0->guest"
  for b in "${NET_BENCH_BACKENDS[@]}"; do
    printf '%-30s %18s %18s\n' "$b" "${NET_BENCH[$b.tx]:--}" "${NET_BENCH[$b.rx]:--}"
  done
  printf '%-30s %18s %18s\n' "softdev/netback" "$(ratio "${NET_BENCH[softdev.tx]:-}" "${NET_BENCH[netback.tx]:-}")" \
    "$(ratio "${NET_BENCH[softdev.rx]:-}" "${NET_BENCH[netback.rx]:-}")"
  printf '%-30s %18s %18s\n' "softdev, guest tso/gso/sg off" "${NET_EXTRA[off.tx]:--}" "${NET_EXTRA[off.rx]:--}"
  printf '%-30s %18s %18s\n' "softdev, UDP 64 B packets/s" "${NET_EXTRA[udp.tx]:--}" ""
}

# net_bench_round R: softdev then netback, each both ways.
net_bench_round() {
  local r=$1 b addr dir
  for b in "${NET_BENCH_BACKENDS[@]}"; do
    [ "$b" = netback ] && [ "${NET_NETBACK:-0}" != 1 ] && continue
    addr=10.99.1.2; [ "$b" = netback ] && addr=10.99.2.2
    for dir in tx rx; do
      if iperf_tcp "bench $b $([ $dir = tx ] && echo 'guest->dom0' || echo 'dom0->guest') round $r" n1 "$addr" \
          -t "$NET_IPERF_SECONDS" $([ $dir = tx ] && echo -R); then
        NET_BENCH[$b.$dir]=$(best "$IPERF_MBPS" "${NET_BENCH[$b.$dir]:-}")
      fi
    done
  done
}

# net_netback_up: a kernel-netback vif (devid 1) for n1 on bridge xenbr0, up in the guest.
net_netback_up() {
  ip link show xenbr0 > /dev/null 2>&1 || ip link add name xenbr0 type bridge stp_state 0 forward_delay 0 || return 1
  ip addr replace 10.99.2.1/24 dev xenbr0 && ip link set xenbr0 up || return 1
  timeout 120 xl network-attach n1 devid=1 bridge=xenbr0 mac=$NET_MAC1B || { tail -20 /var/log/xen/xl-n1.log 2>/dev/null; return 1; }
  gx n1 "net_up $NET_MAC1B 10.99.2.2/24" || return 1
  ping_ok 10.99.2.2
}

# Multi-step checks (functions, not subshells: gx numbers its commands in xenstore).
swa_trusted0() { xs_is "$(vif_fe swa 0)/trusted" 0 && xs_is "$(vif_fe swa 0)/state" 4; }
net_gone() { wait_until 30 vifs_gone "${NETDOM[$1]}" && wait_until 30 domain_gone "${NETDOM[$1]}"; }
attach_sw() {
  sd attach swa net 0 'switch(name=lab)' --mac $NET_MACA && xenstore-write "$(vif_fe swa 0)/trusted" 0 \
    && sd attach swb net 0 'switch(name=lab)' --mac $NET_MACB
}
sw_listed() { list_shows swa 0 && list_shows swb 0; }
list_answers() { timeout 60 "$SOFTDEV" list --hypervisor xen > /run/list.net && sed 's/^/  /' /run/list.net; }
n1_features() {
  gx n1 "features $NET_MAC1 > /run/f; cat /run/f; grep -q tx-1 /run/f && grep -q '^scatter-gather: on' /run/f && grep -q '^tcp-segmentation-offload: on' /run/f"
}
n1_pcap_tcp() { iperf_tcp 'n1 pcap dom0->guest' n1 10.99.1.2 -n 4M && iperf_tcp 'n1 pcap guest->dom0' n1 10.99.1.2 -n 4M -R; }
n1_detach() {
  sd detach n1 0 --class net | tee /run/detach.out
  grep -q '^detached 0 from domain [0-9]*$' /run/detach.out
}
n1_reattach() {
  sd attach n1 net 0 'tap(name=sdn1)' --mac $NET_MAC1 || return 1
  tap_addr sdn1 10.99.1.1/24 || return 1
  gx n1 "net_up $NET_MAC1 10.99.1.2/24" || return 1
  wait_until 60 xs_is "$(vif_fe n1 0)/state" 4
}
# n1_generator: a second SoftDev vif (2) on n1 over generator(count=NET_GENERATED):
# netfront's rx path fed by frames made on the vif's ring thread as it posts buffers
# (the on-demand path); the guest's interface and the vif's statistics count them all.
n1_generator() {
  local n
  sd attach n1 net 2 "generator(size=1514, count=$NET_GENERATED, dst=$NET_MACG)" --mac $NET_MACG || return 1
  gx n1 "net_up $NET_MACG 10.99.5.2/24" || return 1
  gx n1 "r=/sys/class/net/\$(ifname $NET_MACG)/statistics/rx_packets; i=0; while [ \$(cat \$r) -lt $NET_GENERATED ] && [ \$i -lt 300 ]; do sleep 0.2; i=\$((i+1)); done; echo rx_packets \$(cat \$r); [ \$(cat \$r) -ge $NET_GENERATED ]" 90 || return 1
  sleep 2.5   # the statistics node is written every 2 s
  n=$(stats_of n1 2 rx-frames)
  echo "  statistics of n1 vif 2: $(xenstore-read "$(vif_be n1 2)/statistics" 2>/dev/null)"
  [ "${n:-0}" = "$NET_GENERATED" ] || return 1
  sd detach n1 2 --class net > /dev/null && wait_until 20 xs_gone "$(vif_be n1 2)" && gx n1 "wait_if_gone $NET_MACG 30"
}
n1_offloads() { gx n1 "dev=\$(ifname $NET_MAC1) && \$ETHTOOL -K \$dev tso $1 gso $1 sg $1 && \$ETHTOOL -k \$dev | grep -E '^(scatter-gather|tcp-segmentation-offload|generic-segmentation-offload):'"; }
n1_iperf_off() {
  n1_offloads off || return 1
  iperf_tcp "n1 offloads off dom0->guest" n1 10.99.1.2 -t 3 && NET_EXTRA[off.rx]=$IPERF_MBPS || return 1
  iperf_tcp "n1 offloads off guest->dom0" n1 10.99.1.2 -t 3 -R && NET_EXTRA[off.tx]=$IPERF_MBPS || return 1
  n1_offloads on
}
n1_mtu() {
  ip link set sdn1 mtu "$1" && gx n1 "\$IP link set \$(ifname $NET_MAC1) mtu $1 && echo mtu $1"
}
n1_jumbo() {
  n1_mtu 9000 || return 1
  ping_ok -s 8972 -M do 10.99.1.2 && gping n1 -s 8972 -M do 10.99.1.1
}
n1_bg_ping() { gx n1 "(timeout 120 \$PING -i 0.2 -W 1 10.99.1.1 > /run/bg-ping.out 2>&1 & echo \$! > /run/bg-ping.pid); sleep 1; tail -1 /run/bg-ping.out"; }

# net_ready NAME: the agent says the network is up (fails at once if it ended).
net_ready() {
  local d=${NETDOM[$1]} i=0
  until xs_is "/local/domain/$d/data/net-ready" 1; do
    xenstore-exists "/local/domain/$d/data/lab-result" 2>/dev/null && { echo "$1: the agent ended"; return 1; }
    i=$((i+1)); [ $i -gt 480 ] && { echo "$1: not ready after 240 s"; return 1; }
    sleep 0.5
  done
}
sw_iperf() {
  gx swb iperf_server || return 1
  gx swa "timeout 60 \$IPERF -c 10.99.4.3 -f m -t 3 ${1:-} > /run/i.out 2>&1; rc=\$?; grep -E 'sender|receiver' /run/i.out | sed 's/^/iperf swa->swb ${1:-}: /'; exit \$rc"
}

# net_all: the whole network section.
net_all() {
  local t0 tx0 rx0 d r
  lab_log "3b. network: n1 (pcap|tap), swa (trusted=0) and swb on a switch, detach/re-attach, destroy mid-transfer, netback bench"
  net_guest n1 2 256 "$NET_MAC1=10.99.1.2/24" || { lab_check "n1: xl create -p" false; return 1; }
  net_guest swa 1 128 "$NET_MACA=10.99.4.2/24" || { lab_check "swa: xl create -p" false; return 1; }
  net_guest swb 1 128 "$NET_MACB=10.99.4.3/24" || { lab_check "swb: xl create -p" false; return 1; }
  lab_check "n1: softdev attach n1 net 0 'pcap(file=/run/n1.pcap) | tap(name=sdn1)' --mac $NET_MAC1" \
    sd attach n1 net 0 'pcap(file=/run/n1.pcap) | tap(name=sdn1)' --mac $NET_MAC1
  lab_check "swa, swb: softdev attach net 0 'switch(name=lab)' each; trusted=0 on swa's frontend (before unpause)" attach_sw
  lab_check "dom0: the daemon made the TAP sdn1; dom0 addresses it" tap_addr sdn1 10.99.1.1/24
  t0=$(date +%s)
  for d in n1 swa swb; do xl unpause $d; done
  for d in n1 swa swb; do
    lab_check "$d: netfront connected, the guest's interface is up (agent ready)" net_ready $d || lab_domu_console_log $d | sed "s/^/[$d] /"
  done
  lab_log "three guests up $(( $(date +%s) - t0 ))s after unpause"

  # ----- swa (trusted=0) and swb on one switch
  lab_check "swa: its frontend says trusted=0 and is Connected (state 4)" swa_trusted0
  lab_check "swa (trusted=0) -> swb through switch(name=lab): ping" gping swa 10.99.4.3
  lab_check "swb -> swa: ping" gping swb 10.99.4.2
  lab_check "swa (trusted=0) -> swb: iperf3 TCP 3 s through the switch" sw_iperf
  lab_check "swb -> swa (trusted=0): iperf3 TCP 3 s (-R)" sw_iperf -R
  lab_check "swa, swb: softdev list shows both vifs Connected" sw_listed
  # A guest destroyed mid-transfer: swa sends to swb for 30 s; swb goes after ~4 s.
  gx swb iperf_server > /dev/null
  gx swa "(timeout 45 \$IPERF -c 10.99.4.3 -t 30 > /run/long.out 2>&1 &)" > /dev/null
  sleep 4
  xl destroy swb
  lab_check "swb: destroyed mid-transfer; the daemon removes its vif, Xen frees the domain" net_gone swb
  lab_check "the daemon survived (running, no crash in its log)" sd_alive
  lab_check "softdev list still answers" list_answers
  lab_check "another guest (n1) still pings dom0" gping n1 10.99.1.1
  lab_check "swa: no netfront error in the guest's logs" guest_log_clean swa
  xl destroy swa
  lab_check "swa: destroyed; the daemon removes its vif, Xen frees the domain" net_gone swa

  # ----- n1: features, pings, a little TCP while the pcap records
  lab_check "n1: the frontend is Connected (state 4)" xs_is "$(vif_fe n1 0)/state" 4
  lab_check "n1: softdev list shows vif 0 Connected with 2 queues and sg,tso4,tso6" list_shows n1 0 "2 queues, sg,tso4,tso6"
  lab_check "n1: the guest has 2 queues and sg, tso on (sysfs, ethtool -k)" n1_features
  lab_check "n1: ping dom0 -> guest (56 B)" ping_ok 10.99.1.2
  lab_check "n1: ping guest -> dom0 (56 B)" gping n1 10.99.1.1
  lab_check "n1: ping dom0 -> guest 1472 B, don't fragment" ping_ok -s 1472 -M do 10.99.1.2
  lab_check "n1: ping guest -> dom0 1472 B, don't fragment" gping n1 -s 1472 -M do 10.99.1.1
  lab_check "n1: iperf3 TCP 4 MiB each way (for the capture)" n1_pcap_tcp

  # ----- detach and re-attach while the guest pings
  lab_check "n1: a ping runs in the guest" n1_bg_ping
  lab_check "n1: softdev detach n1 0 --class net while it pings (the guest lets go)" n1_detach
  lab_check "n1: the backend nodes are gone after detach" wait_until 20 xs_gone "$(vif_be n1 0)"
  lab_check "n1: the guest's interface went away" gx n1 "wait_if_gone $NET_MAC1 30"
  lab_check "dom0: the TAP went with the vif" wait_until 20 test ! -e /sys/class/net/sdn1
  sleep 1   # the capture is flushed as its stack closes, after the TAP
  lab_check "dom0: tcpdump -vv reads n1's capture: ICMP and TCP, no incorrect checksum" pcap_clean /run/n1.pcap
  rm -f /run/n1.pcap /run/pcap.txt
  lab_check "n1: softdev attach again ('tap(name=sdn1)'); the interface comes back, Connected" n1_reattach
  lab_check "n1: ping guest -> dom0 works again" gping n1 10.99.1.1
  gx n1 'kill $(cat /run/bg-ping.pid); sleep 0.5; tail -3 /run/bg-ping.out | sed "s/^/background ping: /"' || true
  sleep 2.5   # the statistics node is written every 2 s
  tx0=$(stats_of n1 0 tx-bytes); rx0=$(stats_of n1 0 rx-bytes)
  lab_check "n1: a second vif over generator(count=$NET_GENERATED): the guest receives every frame, the vif counts them, detach" n1_generator

  # ----- n1: throughput, offloads off, small packets, jumbo frames
  lab_check "n1: iperf3 TCP dom0->guest ${NET_IPERF_SECONDS} s (offloads on)" iperf_tcp "n1 dom0->guest" n1 10.99.1.2 -t "$NET_IPERF_SECONDS"
  lab_check "n1: iperf3 TCP guest->dom0 ${NET_IPERF_SECONDS} s (offloads on)" iperf_tcp "n1 guest->dom0" n1 10.99.1.2 -t "$NET_IPERF_SECONDS" -R
  lab_check "n1: iperf3 TCP both ways with the guest's tso, gso, sg off (ethtool -K), then on again" n1_iperf_off
  lab_check "n1: iperf3 UDP 64 B datagrams guest->dom0 (-b 0) 3 s" iperf_udp64 "n1 udp64 guest->dom0" n1 10.99.1.2 -t 3 -R \
    && NET_EXTRA[udp.tx]=$UDP_PPS
  lab_check "n1: MTU 9000 on both ends, ping -s 8972 -M do both ways" n1_jumbo
  lab_check "n1: MTU back to 1500" n1_mtu 1500
  sleep 2.5
  lab_check "n1: the vif's statistics counters moved (tx and rx bytes, > 1 MB)" stats_moved n1 0 "${tx0:-0}" "${rx0:-0}"

  # ----- the bench: softdev vs kernel netback on n1
  NET_NETBACK=0
  lab_check "n1: a kernel-netback vif beside it (xl network-attach devid=1 bridge=xenbr0), pings" net_netback_up && NET_NETBACK=1
  for r in $(seq 1 "$NET_BENCH_ROUNDS"); do net_bench_round "$r"; done
  lab_check "bench: iperf3 through softdev measured both ways" test -n "${NET_BENCH[softdev.tx]:-}" -a -n "${NET_BENCH[softdev.rx]:-}"
  lab_check "bench: iperf3 through kernel netback measured both ways" test -n "${NET_BENCH[netback.tx]:-}" -a -n "${NET_BENCH[netback.rx]:-}"
  lab_check "n1: no netfront error in the guest's logs" guest_log_clean n1
  lab_domu_console_log n1 | sed 's/^/[n1] /'
  xl destroy n1
  lab_check "n1: destroyed; the daemon removes its vif, Xen frees the domain" net_gone n1
  ip link del xenbr0 2>/dev/null || true
  rm -f /run/net-agent.gz
}
