#!/usr/bin/env bash
# Installs what the tests need and runs them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
swift build --build-tests
swift test --skip-build
# The lab's dom0 test must stop the daemon however it ends (checked here, without Xen).
bash lab/xen/tests/softdev-lib-selftest.sh
# Then SoftDev against real Xen and Linux guests in the lab (release build).
bash scripts/lab.sh
