# The `ids | crypt | file` section of the SoftDev lab (bash; source after
# lib/lab.sh and softdev-lib.sh; softdev serve must be running). A guest on
#   ids(rules=/run/ids.toml, alerts=/run/ids-alerts.json) | crypt(keyfile=/run/ids.key) | file(path=/run/ids.img)
# (a LUKS1 volume from `softdev luks-format`) runs guest/ids.sh: ext4, an
# append to the watched /etc/passwd (alerted), an overwrite of the denied
# /boot/vmlinuz (refused: an I/O error in the guest), fsck, checksums. dom0
# then checks the alerts file, the daemon's log and that the image holds no
# plaintext, and leaves the image and its key in the share (LAB_SHARE/ids/)
# for tests/ids-host.sh, which opens them on the host with qemu-img's luks
# driver after the lab run.
# shellcheck shell=bash

IDS_SPEC='ids(rules=/run/ids.toml, alerts=/run/ids-alerts.json) | crypt(keyfile=/run/ids.key) | file(path=/run/ids.img)'

# ids_alerted ACTION RULE PATH: the alerts file has a JSON line with these fields.
ids_alerted() {
  grep -F "\"action\":\"$1\"" /run/ids-alerts.json | grep -F "\"rule\":\"$2\"" | grep -qF "\"path\":\"$3\""
}
# ids_logged ACTION RULE PATH: the daemon logged it ("ids alert: RULE: PATH: ...").
ids_logged() { grep -F "ids $1: $2: $3" "$SOFTDEV_LOG" | head -2 | sed 's/^/  /' | grep -q .; }
# ids_no_plaintext: none of the guest's text is in the image (grep -c counts 0 lines).
ids_no_plaintext() {
  local n; n=$(grep -c -F "$IDS_MARKER" /run/ids.img); echo "  grep -c $IDS_MARKER /run/ids.img: $n"; [ "$n" = 0 ]
}
# ids_no_magic: no ext4 magic (53 ef) at 0x438 of the LUKS payload (its offset, in
# 512-byte sectors, is the header's big-endian word at byte 104).
ids_no_magic() {
  local b po magic
  read -ra b <<<"$(od -An -tu1 -j104 -N4 /run/ids.img)"
  po=$(( (b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3] ))
  magic=$(od -An -tx1 -j $((po * 512 + 0x438)) -N2 /run/ids.img | tr -d ' ')
  echo "  payload at sector $po; bytes at payload+0x438: $magic"
  [ "$po" -gt 0 ] && [ -n "$magic" ] && [ "$magic" != 53ef ]
}
ids_to_share() {
  mkdir -p "$LAB_SHARE/ids" && cp /run/ids.img /run/ids.key "$LAB_SHARE/ids/" && printf '%s\n' "$IDS_MARKER" > "$LAB_SHARE/ids/marker"
}

# ids_all: the whole section.
ids_all() {
  local d rc=0
  lab_log "5. ids | crypt | file: a LUKS volume, alert on /etc/passwd, deny /boot"
  IDS_MARKER=IDS-$RANDOM$RANDOM
  printf '%s\n' "$IDS_MARKER" > /run/ids-marker
  rm -f /run/ids.img /run/ids-alerts.json
  # A text key: qemu-img reads a luks key-secret as UTF-8 (the host check opens the image with it).
  head -c 32 /dev/urandom | od -An -tx1 | tr -d " \n" > /run/ids.key
  cat > /run/ids.toml <<'EOF'
[[alert]]
name = "passwd-watch"
path = "/etc/passwd"
[[deny]]
name = "boot-locked"
path = "/boot"
EOF
  lab_check "dom0: softdev luks-format /run/ids.img --size 64M --keyfile /run/ids.key --iter-time 100" \
    timeout 120 "$SOFTDEV" luks-format /run/ids.img --size 64M --keyfile /run/ids.key --iter-time 100 || return 1
  guest_script /run/ids-run.sh "sh /test/ids.sh"
  lab_domu_initrd /run/ids.gz /run/ids-run.sh "$G/ids.sh" /run/ids-marker
  lab_domu_config /run/ids.cfg ids /run/ids.gz
  lab_domu_create /run/ids.cfg || { lab_check "ids: xl create -p" false; return 1; }
  d=$(lab_domid ids)
  lab_check "ids: softdev attach ids block xvda '$IDS_SPEC'" sd attach ids block xvda "$IDS_SPEC" || { xl destroy ids; return 1; }
  xl unpause ids
  lab_domu_wait ids 400 || rc=$?
  lab_check "ids: ext4 on ids | crypt | file: files, append to /etc/passwd, fsck -fn, remount, checksums (vmlinuz unchanged)" test $rc = 0
  lab_check "ids: the in-place overwrite of /boot/vmlinuz failed in the guest (denied)" xs_is "/local/domain/$d/data/ids-deny" ok
  xl destroy ids
  lab_check "ids: the daemon removes the destroyed guest's nodes" wait_until 30 backends_gone "$d"
  echo "  alerts file (/run/ids-alerts.json, $(grep -c . /run/ids-alerts.json 2>/dev/null) lines):"
  head -20 /run/ids-alerts.json 2>/dev/null | sed 's/^/    /'
  lab_check "dom0: the alerts file has the /etc/passwd alert (JSON: action, rule, path)" ids_alerted alert passwd-watch /etc/passwd
  lab_check "dom0: the alerts file has the /boot/vmlinuz deny" ids_alerted deny boot-locked /boot/vmlinuz
  lab_check "dom0: the daemon logged 'ids alert: passwd-watch: /etc/passwd'" ids_logged alert passwd-watch /etc/passwd
  lab_check "dom0: the daemon logged 'ids deny: boot-locked: /boot/vmlinuz'" ids_logged deny boot-locked /boot/vmlinuz
  lab_check "dom0: no text the guest wrote is in the encrypted image" ids_no_plaintext
  lab_check "dom0: no ext4 magic at payload offset 0x438 of the image" ids_no_magic
  lab_check "dom0: image and key copied to the share for the host's qemu-img check" ids_to_share
  rm -f /run/ids.img /run/ids.gz
}
