#!/bin/bash
# A check of softdev-lib.sh's EXIT trap on the host (no Xen, about 15 s;
# scripts/test.sh runs it before the lab): a dom0 test that ends early after
# sd_start must still stop the daemon, or dom0's init, which reads the test's
# output to its end before it powers off, waits for ever and the lab runs into
# QEMU's timeout. Each case is a small dom0 test run the way lab/xen/dom0/init
# runs one (stdout and stderr into a pipe, the status into a file), against a
# stand-in daemon that runs until SIGTERM and then exits 0.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TMP=$(mktemp -d /tmp/softdev-lib-selftest.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
failed=0

cat > "$TMP/softdev" <<'EOF'
#!/bin/bash
# The stand-in for `softdev serve`: its stdout is the test's, as the daemon's is.
echo $$ > "$STANDIN_STOPPED.pid"
trap 'echo stopped >> "$STANDIN_STOPPED"; exit 0' TERM
while :; do sleep 0.1; done
EOF
chmod +x "$TMP/softdev"

# check NAME STATUS BODY: run a dom0 test made of BODY (after sd_start) as init
# does; it must end within 40 s (sd_stop alone may take 30) with STATUS, and
# the stand-in must have had its SIGTERM.
check() {
  local name=$1 want=$2 body=$3 rc
  rm -f "$TMP/rc" "$TMP/stopped" "$TMP/stopped.pid" "$TMP/serve.log"
  {
    echo "set -uo pipefail"
    echo ". '$HERE/softdev-lib.sh'"
    echo "sd_start || exit 99"
    echo "$body"
  } > "$TMP/test.sh"
  export SOFTDEV=$TMP/softdev SOFTDEV_LOG=$TMP/serve.log STANDIN_STOPPED=$TMP/stopped
  if ! timeout 40 bash -c '{ bash "$1/test.sh"; echo $? > "$1/rc"; } 2>&1 | cat > "$1/out"' _ "$TMP"; then
    echo "FAIL: $name: the test's output pipe was still open after 40 s"; failed=1
    kill -KILL "$(cat "$TMP/stopped.pid")" 2>/dev/null
    return
  fi
  rc=$(cat "$TMP/rc" 2>/dev/null || echo none)
  if [ "$rc" != "$want" ]; then
    echo "FAIL: $name: exit status $rc, expected $want"; sed 's/^/  | /' "$TMP/out"; failed=1
  elif [ "$(cat "$TMP/stopped" 2>/dev/null)" != stopped ]; then
    echo "FAIL: $name: the daemon was not sent SIGTERM exactly once"; sed 's/^/  | /' "$TMP/out"; failed=1
  else
    echo "PASS: $name"
  fi
}

check "an unbound variable after sd_start" 1 'echo "$UNSET_IN_THIS_TEST"'
check "an early exit after a failed check" 7 'exit 7'
check "the test killed by SIGTERM" 143 'kill -TERM $$; sleep 30'
check "a background helper left running" 3 'sleep 300 & exit 3'
check "a test that stops the daemon itself" 0 'sd_stop || exit 5; echo done'
exit $failed
