#!/usr/bin/env bash
# Installs what the tests need and runs them all.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
swift build --build-tests
swift test --skip-build
# Then SoftDev against real Xen and Linux guests in the lab (release build).
bash scripts/lab.sh
