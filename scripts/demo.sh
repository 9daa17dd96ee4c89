#!/usr/bin/env bash
# The main job on the embedded default: the block tap end to end on the local emulated hypervisor.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
swift build -c release --product softdev
exec .build/release/softdev demo "$@"
