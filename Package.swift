// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "SoftDev",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "softdev", targets: ["softdev"]),
        .library(name: "Core", targets: ["Core"]),
        .library(name: "BlockTap", targets: ["BlockTap"]),
        .library(name: "NetTap", targets: ["NetTap"]),
        .library(name: "USBTap", targets: ["USBTap"]),
        .library(name: "Devices", targets: ["Devices"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // The Xen ABI (io/ring.h, blkif.h, netif.h, usbif.h, xs_wire.h, grant_table.h) and the
        // Xen libraries (libxengnttab, libxenevtchn, libxenstore) from libxen-dev.
        .target(
            name: "CXen",
            linkerSettings: [
                .linkedLibrary("xengnttab"), .linkedLibrary("xenevtchn"),
                .linkedLibrary("xenstore"), .linkedLibrary("xenctrl"),
            ]),
        // libaio from libaio-dev.
        .systemLibrary(name: "CAio", pkgConfig: nil, providers: [.apt(["libaio-dev"])]),
        // libpcap from libpcap-dev: tcpdump's filter compiler for the `filter` network device.
        .systemLibrary(name: "CPcap", pkgConfig: nil, providers: [.apt(["libpcap-dev"])]),
        // OpenSSL's libcrypto from libssl-dev (PBKDF2, SHA, AES-CBC) and libgcrypt from
        // libgcrypt20-dev (AES-XTS with VAES) for the `crypt` device (LUKS1) and the `cas` store.
        .systemLibrary(name: "CCrypto", pkgConfig: nil, providers: [.apt(["libssl-dev", "libgcrypt20-dev"])]),
        // libzstd from libzstd-dev: the chunks of the `compress` device.
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        // libusb-1.0 from libusb-1.0-0-dev: real host USB devices passed through (`host`).
        .systemLibrary(name: "CLibUSB", pkgConfig: "libusb-1.0", providers: [.apt(["libusb-1.0-0-dev"])]),
        // C code written with Xen's own ring macros: the conformance frontend and the
        // reference backend the benchmark compares against.
        .target(name: "CReference", dependencies: ["CXen"]),
        // The xenstore wire protocol (xs_wire.h): an in-memory store, a server, a client.
        .target(name: "XenStore", dependencies: ["CXen"]),
        // The hypervisor interface (grant table, event channels, xenstore) with its local
        // (emulated) and Xen implementations, the shared ring, the xenbus state machine and the
        // soft block device API.
        .target(name: "Core", dependencies: ["CXen", "XenStore"]),
        // The blkif backend and a local blkfront.
        .target(name: "BlockTap", dependencies: ["Core", "CXen"]),
        // The netif backend and a local netfront.
        .target(name: "NetTap", dependencies: ["Core", "CXen"]),
        // The usbif backend and a local usbfront.
        .target(name: "USBTap", dependencies: ["Core", "CXen"]),
        // The NBD protocol's numbers, the big-endian codec of its messages and the stream socket
        // both ends use: shared by the NBD export (a server) and the `nbd` device (a client).
        .target(name: "NBDWire", dependencies: ["Core"]),
        // The soft devices.
        .target(name: "Devices", dependencies: ["Core", "CAio", "CPcap", "CCrypto", "CLibUSB", "CZstd", "NBDWire", .product(name: "TOMLKit", package: "TOMLKit")]),
        // NBD export of any device stack.
        .target(name: "NBDExport", dependencies: ["Core", "NBDWire"]),
        // `softdev bench`: load generator, the C reference backend's harness, the tables.
        .target(name: "Bench", dependencies: ["Core", "BlockTap", "NetTap", "USBTap", "Devices", "NBDExport", "CReference", "CXen", "XenStore"]),
        // What operators see of the daemon: the swift-metrics registry with Prometheus text, the
        // filter that measures each served block stack, the /metrics HTTP endpoint, and the
        // swift-log handler that writes the daemon's lines.
        .target(name: "Observability", dependencies: [
            "Core",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "CoreMetrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
        ]),
        // `softdev serve`: the daemon, its TOML config and the hypervisor choice.
        .target(name: "Daemon", dependencies: [
            "Core", "BlockTap", "NetTap", "USBTap", "Devices", "NBDExport", "XenStore", "Observability",
            .product(name: "TOMLKit", package: "TOMLKit"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "CoreMetrics", package: "swift-metrics"),
        ]),
        .executableTarget(
            name: "softdev",
            dependencies: [
                "Core", "BlockTap", "NetTap", "Devices", "NBDExport", "Bench", "Daemon", "XenStore", "Observability",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]),
        // What the tests do when a real peer (nbdkit, qemu-img, fio...) is missing: fail in CI
        // (SOFTDEV_REQUIRE_PEERS=1, set by scripts/test.sh), skip elsewhere.
        .target(name: "TestPeers", path: "Tests/TestPeers"),
        // Checks of the Xen hypervisor implementation against a real Xen (run in the lab's dom0).
        .executableTarget(name: "xen-lab-probe", dependencies: ["Core"], path: "Sources/XenLabProbe"),
        // The crash harness's child: serves one device stack over NBD until it is SIGKILLed.
        .executableTarget(name: "softdev-crash-child", dependencies: ["Core", "Devices", "NBDExport"], path: "Tests/CrashChild"),
        .testTarget(name: "XenStoreTests", dependencies: ["XenStore"]),
        .testTarget(name: "CoreTests", dependencies: ["Core", "CXen"]),
        .testTarget(name: "BlockTapTests", dependencies: ["BlockTap", "Devices", "Core", "CXen", "CReference", "Bench", "TestPeers"]),
        .testTarget(name: "DevicesTests", dependencies: ["Devices", "Core", "CCrypto", "CLibUSB", "NBDExport", "NBDWire", "TestPeers", "Bench"]),
        .testTarget(name: "DaemonTests", dependencies: ["Daemon", "BlockTap", "NetTap", "USBTap", "Devices", "Core", "CXen", "XenStore", "TestPeers", "Observability",
                                                       .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "NetTapTests", dependencies: ["NetTap", "Core", "CXen", "XenStore", "CReference", "Bench", "Devices", "TestPeers"]),
        .testTarget(name: "USBTapTests", dependencies: ["USBTap", "Core", "CXen", "XenStore", "Devices", "TestPeers", "CReference", "Bench"]),
        .testTarget(name: "NBDExportTests", dependencies: ["NBDExport", "NBDWire", "Devices", "Core", "Bench", "TestPeers"]),
    ],
    swiftLanguageModes: [.v5]
)
