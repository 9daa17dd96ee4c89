# dom0 side of the marker round trip, shared by smoke.sh and qdisk.sh (bash).
# marker_roundtrip NAME IMAGE DISKSPEC: write a marker at sector 0 of IMAGE
# (16 MiB, created here), boot a guest NAME whose xvda is DISKSPEC (an xl disk
# spec, e.g. "phy:/dev/loop0,xvda,w"), let it check the marker and write
# sector 8, and check the result from dom0. Uses lab_check for each step.
marker_roundtrip() {
  local name=$1 image=$2 spec=$3 marker rc=0 domid size back t0
  marker="SOFTDEV-LAB-MARKER-$name-$$-$RANDOM$RANDOM"
  printf '%s' "$marker" | dd of="$image" conv=notrunc status=none
  mkdir -p "/run/$name.files"
  printf '%s' "$marker" > "/run/$name.files/marker"   # the guest reads /test/marker
  lab_domu_initrd "/run/$name-initrd.gz" "$LAB_SHARE/lab/tests/guest/marker.sh" "/run/$name.files/marker"
  lab_domu_config "/run/$name.cfg" "$name" "/run/$name-initrd.gz" "disk = ['$spec']"
  t0=$(date +%s)
  lab_domu_create "/run/$name.cfg" || { lab_check "$name: xl create" false; return 1; }
  domid=$(lab_domid "$name")
  xl unpause "$name"
  lab_domu_wait "$name" 240 || rc=$?
  size=$(xenstore-read "/local/domain/$domid/data/disk-sectors" 2>/dev/null || echo "?")
  lab_log "$name: guest result $rc after $(( $(date +%s) - t0 ))s; guest saw $size sectors"
  lab_check "$name: domU read the marker, wrote sector 8 and read it back" test "$rc" = 0
  lab_check "$name: domU published its disk size through xenstore (32768)" test "$size" = 32768
  xl destroy "$name" || true
  back=$(dd if="$image" bs=512 skip=8 count=1 status=none | tr -d '\000')
  lab_check "$name: dom0 reads the sector the guest wrote" test "$back" = "DOMU-WROTE-$marker"
  lab_check "$name: guest is gone after xl destroy" bash -c "! xl domid $name >/dev/null 2>&1"
}
