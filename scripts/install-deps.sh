#!/usr/bin/env bash
# Installs the Debian packages SoftDev builds against and tests with (idempotent).
set -euo pipefail
pkgs=(libxen-dev libaio-dev xenstore-utils qemu-utils libnbd-bin nbdfuse fio nbdkit fuse3 e2fsprogs util-linux prometheus libpcap-dev tcpdump iperf3 iproute2 tshark iputils-ping ethtool libssl-dev libgcrypt20-dev libusb-1.0-0-dev libzstd-dev)
missing=()
for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 && continue
    # nbdfuse is a package of its own on newer Debian, part of libnbd-bin on bookworm (where
    # the name is only provided, so dpkg never reports it installed): the program is what counts.
    [ "$p" = nbdfuse ] && command -v nbdfuse >/dev/null 2>&1 && continue
    missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
