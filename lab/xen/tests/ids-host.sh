#!/bin/bash
# Host side of the `ids | crypt | file` section (ids-lib.sh), after the lab run:
# the LUKS image and key dom0 left in SHARE/ids open with qemu-img's own luks
# driver; the decrypted file system shows the line the guest appended to
# /etc/passwd (debugfs) and is clean (fsck.ext4 -fn). Prints each check as
# run.sh does; exit status non-zero if one failed. Does nothing when the
# section did not run (no SHARE/ids).
#   lab/xen/tests/ids-host.sh SHARE      (test-softdev.sh runs it)
set -uo pipefail
dir=$1/ids
[ -d "$dir" ] || exit 0
ok=1
check() { if [ "$1" = 0 ]; then echo "  ok   $2"; else echo "  FAIL $2"; ok=0; fi; }
echo "==== host checks of the ids | crypt | file image ($dir) ===="
marker=$(cat "$dir/marker" 2>/dev/null)
rm -f "$dir/out.raw"
qemu-img convert --object "secret,id=s0,file=$dir/ids.key" \
  --image-opts "driver=luks,key-secret=s0,file.filename=$dir/ids.img" -O raw "$dir/out.raw"
check $? "qemu-img convert with its luks driver and the key opens the image"
passwd=$(debugfs -R "cat /etc/passwd" "$dir/out.raw" 2>/dev/null)
sed 's/^/       /' <<<"$passwd"
[ -n "$marker" ] && grep -q "^$marker-appended:" <<<"$passwd"
check $? "debugfs -R 'cat /etc/passwd' on the decrypted image shows the line the guest appended"
fsck.ext4 -fn "$dir/out.raw" 2>&1 | sed 's/^/       /'
check "${PIPESTATUS[0]}" "fsck.ext4 -fn is clean on the decrypted image"
[ $ok = 1 ] && echo "ids host checks: PASSED" || echo "ids host checks: FAILED"
[ $ok = 1 ]
