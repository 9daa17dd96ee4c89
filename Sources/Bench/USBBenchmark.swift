import CReference
import CXen
import Core
import Devices
import Foundation
import Glibc
import Synchronization
import USBTap
import XenStore

/// `softdev bench --usb`: URBs through the usbif rings to SoftDev's usbif backend serving a soft
/// storage stick over a memory device, as Linux's usb-storage drives it through xen-hcd: one
/// Bulk-Only command at a time (`can_queue` 1), each a CBW, its data in bulk URBs all in flight
/// at once as far as the 16-slot ring allows (xen-hcd has no scatter-gather: usb_sg_wait puts
/// one URB per scatterlist entry, up to 64 KiB where the guest's pages are contiguous, 4 KiB
/// where none are) and the CSW; and control transfers one at a time (GET_DESCRIPTOR of the device descriptor). Two
/// frontends drive the same backend, each with its own guest and stick: SoftDev's Swift
/// usbfront (``LocalUSBFrontend``) and the C usbfront of the conformance suite
/// (usbif_conformance.c, Xen's ring macros). There is no user-space usbif backend to compare
/// with locally (QEMU's qusb needs a QEMU device model and a libusb device), so there is no
/// "vs C" column: the C frontend's row shows what the frontend side costs.
public struct USBBenchmark {
    public enum Frontend: String, Sendable, CustomStringConvertible {
        case swift = "Swift usbfront"
        case c = "C usbfront"
        public var description: String { rawValue }
    }

    public struct Workload: Sendable, Equatable {
        public enum Kind: Sendable, Equatable {
            /// Bulk-Only READ(10) or WRITE(10) commands of `bytes`, the data in URBs of `chunk`
            /// bytes at most (one per scatterlist entry: 64 KiB where the guest's pages are
            /// contiguous, 4 KiB where none are).
            case bulkOnly(write: Bool, bytes: Int, chunk: Int)
            /// GET_DESCRIPTOR(DEVICE), 18 bytes.
            case control
        }
        public var name: String
        public var kind: Kind
        public init(name: String, kind: Kind) { self.name = name; self.kind = kind }

        public static let standard: [Workload] = [
            .init(name: "read 64 KiB", kind: .bulkOnly(write: false, bytes: 65536, chunk: 65536)),
            .init(name: "write 64 KiB", kind: .bulkOnly(write: true, bytes: 65536, chunk: 65536)),
            .init(name: "read 120 KiB", kind: .bulkOnly(write: false, bytes: 122_880, chunk: 65536)),
            .init(name: "write 120 KiB", kind: .bulkOnly(write: true, bytes: 122_880, chunk: 65536)),
            .init(name: "read 120K/4K", kind: .bulkOnly(write: false, bytes: 122_880, chunk: 4096)),
            .init(name: "write 120K/4K", kind: .bulkOnly(write: true, bytes: 122_880, chunk: 4096)),
            .init(name: "control 18 B", kind: .control),
        ]
    }

    public struct Result: Sendable {
        /// Bulk-Only commands or control transfers done.
        public var transfers: UInt64
        public var urbs: UInt64
        /// Data bytes moved (not counting CBWs and CSWs).
        public var bytes: UInt64
        public var seconds: Double
        public var transfersPerSecond: Double { Double(transfers) / seconds }
        public var urbsPerSecond: Double { Double(urbs) / seconds }
        public var megabytesPerSecond: Double { Double(bytes) / seconds / 1e6 }
        mutating func add(_ o: Result) { transfers += o.transfers; urbs += o.urbs; bytes += o.bytes; seconds += o.seconds }
    }

    public struct Row: Sendable {
        public var workload: String
        public var frontend: String
        public var result: Result
    }

    public var frontends: [Frontend] = [.swift, .c]
    public var workloads: [Workload]
    public var seconds: Double
    public var warmup: Double
    /// Turns per workload, each of `seconds / rounds`, every second one in reverse order.
    public var rounds = 2
    /// The backend's poll window (the frontends sleep on the event channel).
    public var pollMicroseconds = AdaptivePoller.defaultMicroseconds
    /// The stick's memory device.
    public var stickBytes = 64 << 20
    /// The address each stick gets.
    static let address: UInt8 = 5

    public init(workloads: [Workload] = Workload.standard, seconds: Double = 2, warmup: Double = 0.3) {
        self.workloads = workloads; self.seconds = seconds; self.warmup = warmup
    }

    /// One guest's controller with a stick on port 1, enumerated, and its frontend.
    private enum Attached {
        case swift(LocalUSBFrontend, BulkOnlyLoop)
        case c(CUSBConformanceFrontend)
    }

    public func run(progress: (Row) -> Void = { _ in }) throws -> [Row] {
        let hypervisor = try BenchHypervisor(name: "softdev-usbbench")
        defer { hypervisor.stop() }
        let backend = hypervisor.backend
        var options = UsbifBackendOptions()
        options.pollMicroseconds = pollMicroseconds
        let stickSpec = "storage(device=\"memory(size=\(stickBytes))\")"
        let host = USBTapService.makeHost(hypervisor: backend, options: options) { spec in
            guard spec == "bench-stick" else { throw HarnessFailure("no device \(spec)") }
            return try DeviceRegistry.open(stickSpec, of: .usb) as! any USBDevice
        }
        try host.start()
        defer { host.stop() }

        var attached: [(Frontend, Attached, LocalHypervisor)] = []
        defer {
            for (_, a, guest) in attached {
                switch a {
                case .swift(let front, _): try? front.close(timeoutSeconds: 2)
                case .c(let front): _ = try? front.close()
                }
                guest.destroy()
            }
        }
        for (index, frontend) in frontends.enumerated() {
            let guest = try LocalHypervisor.createGuest(hypervisor.address, name: "usbbench-\(index)", pages: 1024)
            let paths = XenbusDevicePaths(frontendDomain: guest.domainID, backendDomain: backend.domainID, frontendType: USBTapService.frontendType,
                                          backendType: USBTapService.backendType, deviceID: 0)
            let (fe, be) = USBTapService.nodes(ports: 1, usbVersion: 2, plugged: [1: "bench-stick"])
            try XenbusToolstack.attach(backend.store, paths, frontend: fe, backend: be)
            switch frontend {
            case .swift:
                let front = try LocalUSBFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
                attached.append((frontend, .swift(front, BulkOnlyLoop(front: front, blocks: stickBytes / 512)), guest))
                try front.waitForPort(1)
                _ = try front.enumerate(port: 1, address: Self.address)
            case .c:
                let layout = cref_usb_layout(storage_port: 1, keyboard_port: 0, iso_port: 0, ports: 1, storage_bytes: UInt64(stickBytes))
                let front = try CUSBConformanceFrontend(guest: guest, paths: paths, layout: layout,
                                                        hands: .init(type: { _ in false }, setPort: { _, _ in false }))
                attached.append((frontend, .c(front), guest))
                // The stick is plugged as the backend connects: until its event is handled the port is empty.
                let deadline = monotonicSeconds() + 5
                while cref_usbfront_enumerate(front.front, 1, Self.address) != 0 {
                    guard monotonicSeconds() < deadline else { throw HarnessFailure("the C usbfront could not enumerate the stick") }
                    usleep(10_000)
                }
            }
        }

        var rows: [Row] = []
        for workload in workloads {
            var totals = [Result](repeating: Result(transfers: 0, urbs: 0, bytes: 0, seconds: 0), count: attached.count)
            for round in 0..<max(1, rounds) {
                for i in round % 2 == 0 ? Array(attached.indices) : attached.indices.reversed() {
                    _ = try measure(attached[i].1, workload, seconds: warmup)
                    totals[i].add(try measure(attached[i].1, workload, seconds: seconds / Double(max(1, rounds))))
                }
            }
            for (a, result) in zip(attached, totals) {
                let row = Row(workload: workload.name, frontend: "\(a.0)", result: result)
                rows.append(row)
                progress(row)
            }
        }
        return rows
    }

    private func measure(_ a: Attached, _ w: Workload, seconds: Double) throws -> Result {
        let start = monotonicSeconds()
        switch (a, w.kind) {
        case (.swift(_, let loop), .bulkOnly(let write, let bytes, let chunk)):
            var r = try loop.run(write: write, bytes: bytes, chunk: chunk, seconds: seconds)
            r.seconds = monotonicSeconds() - start
            return r
        case (.swift(let front, _), .control):
            var n: UInt64 = 0
            let setup = USBSetup(requestType: 0x80, request: 6, value: 0x0100, index: 0, length: 18)
            while monotonicSeconds() - start < seconds {
                let r = try front.control(port: 1, device: Self.address, setup)
                guard r.status == .ok, r.actualLength == 18 else { throw HarnessFailure("GET_DESCRIPTOR: \(r.status)") }
                n += 1
            }
            return Result(transfers: n, urbs: n, bytes: n * 18, seconds: monotonicSeconds() - start)
        case (.c(let front), .bulkOnly(let write, let bytes, let chunk)):
            var urbs: UInt64 = 0
            let n = cref_usbfront_bench_bot(front.front, Self.address, UInt32(bytes), UInt32(chunk), write ? 1 : 0, seconds, &urbs)
            guard n >= 0 else { throw HarnessFailure("the C usbfront's Bulk-Only commands failed") }
            return Result(transfers: UInt64(n), urbs: urbs, bytes: UInt64(n) * UInt64(bytes), seconds: monotonicSeconds() - start)
        case (.c(let front), .control):
            let n = cref_usbfront_bench_control(front.front, 1, Self.address, seconds)
            guard n >= 0 else { throw HarnessFailure("the C usbfront's control transfers failed") }
            return Result(transfers: UInt64(n), urbs: UInt64(n), bytes: UInt64(n) * 18, seconds: monotonicSeconds() - start)
        }
    }

    /// The rows as a table: workload, frontend, commands (or transfers) per second, URBs/s, MB/s.
    public static func table(_ rows: [Row]) -> String {
        func rate(_ v: Double) -> String { v >= 10_000 ? String(format: "%.1fk", v / 1000) : String(format: "%.0f", v) }
        return BenchmarkTable.render(["workload", "frontend", "cmds/s", "URBs/s", "MB/s"],
                                     rows.map { [$0.workload, $0.frontend, rate($0.result.transfersPerSecond), rate($0.result.urbsPerSecond),
                                                 String(format: "%.1f", $0.result.megabytesPerSecond)] },
                                     widths: [14, 15, 8, 8, 8])
    }
}

/// Bulk-Only commands from the Swift usbfront as usb-storage sends them: the CBW, the data in
/// URBs of `chunk` bytes at most, as many in flight as the ring holds, the CSW; sequential LBAs,
/// wrapping at the end.
final class BulkOnlyLoop {
    let front: LocalUSBFrontend
    let blocks: Int
    private var tag: UInt32 = 0
    private var lba = 0
    private var data: [UInt8] = []

    init(front: LocalUSBFrontend, blocks: Int) { self.front = front; self.blocks = blocks }

    func run(write: Bool, bytes: Int, chunk: Int, seconds: Double) throws -> USBBenchmark.Result {
        if data.count != bytes { data = (0..<bytes).map { UInt8(truncatingIfNeeded: $0 &* 13) } }
        let start = monotonicSeconds()
        var result = USBBenchmark.Result(transfers: 0, urbs: 0, bytes: 0, seconds: 0)
        while monotonicSeconds() - start < seconds {
            let span = bytes / 512
            if lba + span > blocks { lba = 0 }
            result.urbs += UInt64(try command(write: write, lba: lba, bytes: bytes, chunk: chunk))
            result.transfers += 1
            result.bytes += UInt64(bytes)
            lba += span
        }
        return result
    }

    /// One command; the URBs it took.
    private func command(write: Bool, lba: Int, bytes: Int, chunk: Int) throws -> Int {
        tag &+= 1
        var cbw = [UInt8](repeating: 0, count: 31)
        for (at, v) in [(0, UInt32(0x4342_5355)), (4, tag), (8, UInt32(bytes))] { for i in 0..<4 { cbw[at + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) } }
        cbw[12] = write ? 0 : 0x80
        cbw[14] = 10
        cbw[15] = write ? 0x2A : 0x28
        for i in 0..<4 { cbw[17 + i] = UInt8(truncatingIfNeeded: UInt32(lba) >> (24 - 8 * i)) }
        cbw[22] = UInt8((bytes / 512) >> 8); cbw[23] = UInt8((bytes / 512) & 0xff)
        let address = USBBenchmark.address
        guard try front.transfer(port: 1, device: address, endpoint: 2, type: .bulk, isIn: false, data: cbw).status == .ok else {
            throw HarnessFailure("the CBW was refused")
        }
        // As many in flight as the ring has slots, each waited for in order.
        var inFlight: [UInt16] = []
        var urbs = 0
        func waitOldest() throws {
            let r = try front.wait(inFlight.removeFirst(), isIn: !write)
            guard r.status == .ok else { throw HarnessFailure("data: \(r.status)") }
        }
        for at in stride(from: 0, to: bytes, by: chunk) {
            if inFlight.count == Int(front.urbRing.size) { try waitOldest() }
            let n = min(chunk, bytes - at)
            inFlight.append(write ? try front.put(port: 1, device: address, endpoint: 2, type: .bulk, isIn: false, data: Array(data[at..<(at + n)]))
                            : try front.put(port: 1, device: address, endpoint: 1, type: .bulk, isIn: true, length: n))
            urbs += 1
        }
        while !inFlight.isEmpty { try waitOldest() }
        let csw = try front.transfer(port: 1, device: address, endpoint: 1, type: .bulk, isIn: true, length: 13)
        guard csw.status == .ok, csw.data.count == 13, csw.data[12] == 0 else { throw HarnessFailure("CSW: \(csw.status) \(csw.data)") }
        return 2 + urbs
    }
}
