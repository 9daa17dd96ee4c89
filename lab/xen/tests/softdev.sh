#!/bin/bash
# SoftDev end to end (runs in dom0; lab/xen/test-softdev.sh starts it):
# `softdev serve --hypervisor xen` in dom0 serves `file` disks to Linux's own
# xen-blkfront in domUs, and everything is checked from both sides.
#   1. a disk attached before the daemon starts (xl create -p, softdev attach,
#      serve, xl unpause): marker round trip, ext4 round trip, dom0 fsck;
#      at the same time a second guest with two disks, two vCPUs and a
#      4-page ring (multi-queue) and without persistent grants (so that blkfront
#      grants write data read-only and the daemon maps it so), plus a third
#      disk attached --readonly; the negotiated features of both are printed;
#      xen-lab-probe checks the Xen implementation's error paths on g1's ring
#   2. detach and re-attach while a guest runs; at the same time another guest
#      is destroyed mid-I/O: the daemon survives, frees the guest, and goes on
#      serving the first one
#   2b. SIGKILL of the daemon while a guest writes and verifies on one disk
#      (the other idle), and a new daemon: it resumes both rings where the
#      killed one left them; the guest's I/O completes, intact, with no error
#   3. the side-by-side benchmark: softdev, QEMU's qdisk, kernel blkback
#   3b. network (net-lib.sh): SoftDev's netif backend (softdev-vif) with Linux's
#      xen-netfront. n1 (2 vCPUs) on 'pcap | tap': state 4, 2 queues, sg/tso
#      in `softdev list`, pings (56 B, 1472 B -M do) both ways, iperf3 TCP both
#      ways with the guest's offloads on and off, UDP 64 B packets/s, MTU 9000
#      (ping -s 8972 -M do), the capture read by tcpdump (no bad checksum), the
#      vif's counters; n2 with trusted=0 pings and runs iperf3; swa and swb on
#      one switch ping and iperf3 each other; n1's vif detached while the
#      guest pings and attached again (eth0 goes and comes back); swb
#      destroyed mid-transfer (the daemon survives, list answers, n1 pings);
#      no netfront error in any guest's log; then iperf3 through n1's SoftDev
#      vif and a kernel-netback vif beside it, interleaved (table at the end)
#   5. ids | crypt | file (ids-lib.sh): alerts and a denied write on a LUKS disk
#   3c. USB (usb-lib.sh), last, on the same daemon: SoftDev's usbif backend with Linux's
#      xen-hcd; a soft stick (ext4, dom0 reads the image), the soft keyboard, hot-plug,
#      a guest destroyed mid-transfer, dom0's emulated stick through host() under policies
#      and readonly-storage, and the dd bench against QEMU's qusb (table at the end);
#      skipped with LAB_USB=0 (dom0 then has no stick)
#   4. SIGTERM: the daemon stops cleanly
set -uo pipefail
. "${LAB_SHARE:-/mnt/host}/lab/lib/lab.sh"
. "$LAB_SHARE/lab/tests/softdev-lib.sh"
. "$LAB_SHARE/lab/tests/bench-lib.sh"
. "$LAB_SHARE/lab/tests/net-lib.sh"
. "$LAB_SHARE/lab/tests/ids-lib.sh"
. "$LAB_SHARE/lab/tests/usb-lib.sh"
G=$LAB_SHARE/lab/tests/guest
RANDREAD=$LAB_SHARE/files/randread
T0=$(date +%s)
took() { echo "$(( $(date +%s) - T0 ))s"; }

lab_check "softdev, xen-lab-probe and randread are in the share" test -x "$SOFTDEV" -a -x "$LAB_SHARE/bin/xen-lab-probe" -a -x "$RANDREAD" || { lab_summary; exit 1; }

# ---------------------------------------------------------------- 1. boot disks
lab_log "1. ext4 guest (disk attached before the daemon starts) + two-disk multi-queue guest"
M1=M1-$RANDOM$RANDOM; M2A=M2A-$RANDOM$RANDOM; M2B=M2B-$RANDOM$RANDOM; M2C=M2C-$RANDOM$RANDOM
new_image /run/g1.img 96 "$M1"
new_image /run/g2a.img 32 "$M2A"
new_image /run/g2b.img 32 "$M2B"
new_image /run/g2c.img 16 "$M2C"
cp /run/g2a.img.marker /run/marker-a; cp /run/g2b.img.marker /run/marker-b; cp /run/g2c.img.marker /run/marker-c
cp /run/g1.img.marker /run/marker
sha256sum < /run/g2c.img > /run/g2c.sha256
guest_script /run/g1-run.sh "sh /test/marker.sh" "sh /test/ext4.sh" "sh /test/features.sh"
lab_domu_initrd /run/g1.gz /run/g1-run.sh "$G/marker.sh" "$G/ext4.sh" "$G/features.sh" /run/marker
guest_script /run/g2-run.sh "LAB_DEV=/dev/xvda LAB_MARKER=/test/marker-a sh /test/marker.sh" \
  "LAB_DEV=/dev/xvdb LAB_MARKER=/test/marker-b sh /test/marker.sh" \
  "LAB_DEV=/dev/xvdb LAB_MIB=16 sh /test/seq-dd.sh" "LAB_DEV=/dev/xvdc LAB_MARKER=/test/marker-c LAB_READONLY=1 sh /test/marker.sh" \
  "sh /test/features.sh"
lab_domu_initrd /run/g2.gz /run/g2-run.sh "$G/marker.sh" "$G/seq-dd.sh" "$G/features.sh" \
  /run/marker-a /run/marker-b /run/marker-c
lab_domu_config /run/g1.cfg g1 /run/g1.gz
# Two queues of 4-page rings with persistent grants and indirect pages preallocated by
# blkfront for two disks need more than the default 128 MiB (the guest ran out of memory).
# Without persistent grants blkfront grants each write's pages read-only: the daemon must map
# them read-only (Xen refuses a writable mapping of a read-only grant).
LAB_DOMU_MEMORY=256 LAB_DOMU_VCPUS=2 LAB_DOMU_EXTRA="xen_blkfront.max_ring_page_order=2 xen_blkfront.feature_persistent=0" \
  lab_domu_config /run/g2.cfg g2 /run/g2.gz

lab_domu_create /run/g1.cfg && D1=$(lab_domid g1)
lab_check "g1: softdev attach while paused, before the daemon runs" sd attach g1 block xvda "file(path=/run/g1.img)"
lab_check "softdev serve starts (--hypervisor xen)" sd_start || { cat "$SOFTDEV_LOG"; lab_summary; exit 1; }
lab_domu_create /run/g2.cfg && D2=$(lab_domid g2)
lab_check "g2: softdev attach xvda" sd attach g2 block xvda "file(path=/run/g2a.img)"
# This attach goes through the kernel's /dev/xen/xenbus instead of xenstored's socket (what a
# driver domain without xenstored has): transactions and permissions through the device.
lab_check "g2: softdev attach xvdb through /dev/xen/xenbus (by domain id)" \
  env XENSTORED_PATH=/dev/xen/xenbus timeout 60 "$SOFTDEV" attach "$D2" block xvdb "file(path=/run/g2b.img)"
lab_check "g2: softdev attach xvdc --readonly" sd attach g2 block xvdc "file(path=/run/g2c.img)" --readonly
xl unpause g1; xl unpause g2
rc1=0; lab_domu_wait g1 400 || rc1=$?
rc2=0; lab_domu_wait g2 300 || rc2=$?
lab_check "g1: marker and ext4 round trip (mkfs, files, fsck -fn, remount, sha256) on a softdev disk" test $rc1 = 0
lab_check "g1: the guest saw 96 MiB (196608 sectors)" xs_is "/local/domain/$D1/data/disk-sectors" 196608
lab_check "g2: marker round trips on two softdev disks of one guest, 16 MiB dd on xvdb, read-only xvdc refuses a write" test $rc2 = 0
lab_check "g2: the guest saw xvdc read-only and read its marker" xs_is "/local/domain/$D2/data/readonly-xvdc" ok
lab_check "g2: blkfront ran without persistent grants (write data granted read-only)" xs_is "/local/domain/$D2/device/vbd/51712/feature-persistent" 0
print_features g1 "$D1" xvda 51712
print_features g2 "$D2" xvda 51712
print_features g2 "$D2" xvdb 51728
print_features g2 "$D2" xvdc 51744
echo "softdev list:"; sd list | tee /run/list.xen | sed 's/^/  /'
lab_check "softdev list with --hypervisor auto (Xen in dom0) says the same" bash -c "timeout 60 '$SOFTDEV' list | cmp -s - /run/list.xen"
# What a Linux guest never does: bad grant references, a dead domain, ports never offered.
lab_check "xen-lab-probe: the Xen grant table and event channels' error paths and a loopback channel" "$LAB_SHARE/bin/xen-lab-probe" "$D1"
lab_check "g2: the guest used 2 queues (multi-queue-num-queues)" xs_is "/local/domain/$D2/device/vbd/51712/multi-queue-num-queues" 2
lab_check "g2: the guest used a 4-page ring (ring-page-order 2)" xs_is "/local/domain/$D2/device/vbd/51712/ring-page-order" 2
xl destroy g1; xl destroy g2
lab_check "g1, g2: the daemon removes the destroyed guests' backend nodes" wait_until 30 backends_gone "$D1" "$D2"
lab_check "g1, g2: Xen freed both domains (every grant unmapped)" wait_until 30 domain_gone "$D1" "$D2"
# (xvdb's was then overwritten by the guest's dd: the guest read it back itself.)
lab_check "dom0: sector 8 of g2's xvda holds what the guest wrote" sector8_is /run/g2a.img "$M2A"
lab_check "dom0: g2's read-only xvdc image is unchanged" bash -c "sha256sum < /run/g2c.img | cmp -s - /run/g2c.sha256"
lab_check "dom0: fsck.ext4 -fn is clean on g1's file system" fsck.ext4 -fn /run/g1.img
rm -f /run/g1.img /run/g2a.img /run/g2b.img /run/g2c.img
lab_log "section 1 done at $(took)"

# -------------------------------------------- 2. detach, re-attach, destroy mid-I/O
lab_log "2. detach/re-attach while g3 runs; g4 destroyed mid-I/O"
M3=M3-$RANDOM$RANDOM; M3B=M3B-$RANDOM$RANDOM
new_image /run/g3a.img 16 "$M3"
new_image /run/g3b.img 16 "$M3B"
new_image /run/g4.img 32
cp /run/g3a.img.marker /run/marker; cp /run/g3b.img.marker /run/marker2
lab_domu_initrd /run/g3.gz "$G/detach.sh" "$G/marker.sh" /run/marker /run/marker2
lab_domu_initrd /run/g4.gz "$G/busy-io.sh"
lab_domu_config /run/g3.cfg g3 /run/g3.gz
lab_domu_config /run/g4.cfg g4 /run/g4.gz
lab_domu_create /run/g3.cfg && D3=$(lab_domid g3)
lab_domu_create /run/g4.cfg && D4=$(lab_domid g4)
sd attach g3 block xvda "file(path=/run/g3a.img)" > /dev/null
sd attach g4 block xvda "file(path=/run/g4.img)" > /dev/null
xl unpause g3; xl unpause g4
lab_check "g3: read its first disk and asks for the detach" wait_until 240 xs_is "/local/domain/$D3/data/phase" detach-me
g3_detach() { sd detach g3 xvda | tee /run/detach.out; grep -q '^detached xvda from domain [0-9]*$' /run/detach.out; }
lab_check "g3: softdev detach (the guest lets go, not forced)" g3_detach
lab_check "g3: the backend nodes are gone after detach" wait_until 20 xs_gone "/local/domain/0/backend/softdev-vbd/$D3/51712"
lab_check "g3: the guest saw its disk go" wait_until 60 xs_is "/local/domain/$D3/data/phase" detached
lab_check "g4: I/O is running in the guest" wait_until 240 xs_at_least "/local/domain/$D4/data/io-rounds" 2
xl destroy g4
lab_check "g4: destroyed mid-I/O; the daemon unplugs its disk" wait_until 30 backends_gone "$D4"
lab_check "g4: Xen freed the domain (the daemon unmapped every grant)" wait_until 30 domain_gone "$D4"
lab_check "the daemon survived the destroy (running, no crash in its log)" sd_alive
lab_check "g3: softdev attach of another image while the guest runs" sd attach g3 block xvda "file(path=/run/g3b.img)"
rc3=0; lab_domu_wait g3 180 || rc3=$?
lab_check "g3: the guest used the re-attached disk (marker round trip)" test $rc3 = 0
lab_check "dom0: sector 8 of the re-attached image holds what g3 wrote" sector8_is /run/g3b.img "$M3B"
# Hot-plug cycles on the now idle guest: attach a second disk, wait until the guest's blkfront
# has connected it, detach it (the guest lets go), five times in a row.
hotplug_cycles() {
  local i fe=/local/domain/$D3/device/vbd/51728
  for i in 1 2 3 4 5; do
    sd attach g3 block xvdb "null(size=16M)" > /dev/null || { echo "cycle $i: attach failed"; return 1; }
    wait_until 60 xs_is "$fe/state" 4 || { echo "cycle $i: the guest did not connect xvdb"; return 1; }
    sd detach g3 xvdb > /run/detach.out 2>&1 || { echo "cycle $i: $(cat /run/detach.out)"; return 1; }
    grep -q '^detached xvdb from domain [0-9]*$' /run/detach.out || { echo "cycle $i: $(cat /run/detach.out)"; return 1; }
    wait_until 20 xs_gone "$fe" || { echo "cycle $i: the frontend nodes stayed"; return 1; }
  done
}
lab_check "g3: five attach/detach cycles of a second disk while the guest runs" hotplug_cycles
xl destroy g3
lab_check "g3: the daemon removes the destroyed guest's nodes" wait_until 30 backends_gone "$D3"
rm -f /run/g3a.img /run/g3b.img /run/g4.img
lab_log "section 2 done at $(took)"

# ------------------------------------- 2b. the daemon killed and started again
lab_log "2b. softdev serve killed (SIGKILL) while g5 writes and verifies, then started again"
M5=M5-$RANDOM$RANDOM
new_image /run/g5a.img 32
new_image /run/g5b.img 16 "$M5"
cp /run/g5b.img.marker /run/marker
lab_domu_initrd /run/g5.gz "$G/restart-io.sh" "$G/marker.sh" /run/marker
lab_domu_config /run/g5.cfg g5 /run/g5.gz
lab_domu_create /run/g5.cfg && D5=$(lab_domid g5)
sd attach g5 block xvda "file(path=/run/g5a.img)" > /dev/null
sd attach g5 block xvdb "file(path=/run/g5b.img)" > /dev/null
xl unpause g5
lab_check "g5: I/O is running in the guest (xvda busy, xvdb idle)" wait_until 240 xs_at_least "/local/domain/$D5/data/io-rounds" 3
kill -KILL "$SOFTDEV_PID"; wait "$SOFTDEV_PID" 2>/dev/null; SOFTDEV_PID=
R5=$(xenstore-read "/local/domain/$D5/data/io-rounds")
lab_check "softdev serve starts again after SIGKILL" sd_start
resumed_both() { [ "$(grep "resumed after a restart" "$SOFTDEV_LOG" | grep -c "softdev-vbd/$D5/")" = 2 ]; }
lab_check "g5: the new daemon resumed both disks where the killed one left them" wait_until 30 resumed_both
lab_check "g5: I/O goes on after the restart" wait_until 120 xs_at_least "/local/domain/$D5/data/io-rounds" $((R5 + 5))
xenstore-write "/local/domain/$D5/data/stop" 1
rc5=0; lab_domu_wait g5 180 || rc5=$?
lab_check "g5: every round read back what it wrote, the idle disk works, no block error in the guest's log" test $rc5 = 0
lab_check "g5: the guest's verdict" xs_is "/local/domain/$D5/data/restart-io" ok
xl destroy g5
lab_check "g5: the daemon removes the destroyed guest's nodes" wait_until 30 backends_gone "$D5"
rm -f /run/g5a.img /run/g5b.img
lab_log "section 2b done at $(took)"

# ---------------------------------------------------------------- 3. benchmark
lab_log "3. side by side: softdev, qdisk, blkback"
bench_all
lab_log "section 3 done at $(took)"

# ---------------------------------------------------------------- 3b. network
net_all
lab_log "section 3b done at $(took)"

ids_all
lab_log "section 5 done at $(took)"

# ---------------------------------------------------------------- 3c. USB
if [ "${LAB_USB:-0}" = 1 ]; then
  usb_all
  lab_log "section 3c done at $(took)"
else
  lab_log "3c. USB: skipped (LAB_USB=0: dom0 has no USB controller or stick)"
fi

# ---------------------------------------------------------------- 4. shutdown
lab_check "the daemon is still running after all guests (no crash in its log)" sd_alive
lab_check "softdev serve stops cleanly on SIGTERM (exit status 0)" sd_stop
echo "==== softdev serve log ===="
cat "$SOFTDEV_LOG"
net_bench_table
[ "${LAB_USB:-0}" = 1 ] && usb_bench_table
lab_log "all done at $(took)"
lab_summary
