#!/usr/bin/env bash
# Installs what the tests need and runs them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# The peers are installed now: a test that cannot find one (nbdkit, qemu-img, fio...) must
# fail here, not skip and pass (Tests/TestPeers).
export SOFTDEV_REQUIRE_PEERS=1
swift build --build-tests
swift test --skip-build
# The lab's dom0 test must stop the daemon however it ends (checked here, without Xen).
bash lab/xen/tests/softdev-lib-selftest.sh
# Then SoftDev against real Xen and Linux guests in the lab (release build).
bash scripts/lab.sh
