import CXen
import Core
import Devices
import Foundation
import Glibc
import NetTap
import Synchronization
import XenStore

/// `softdev bench --net`: frames through the netif rings, from a local netfront
/// (``LocalNetFrontend``) to SoftDev's netif backend over the `generator` device, and in the same run to the C
/// reference backend (netif_reference_backend.c, Xen's ring macros): the protocol's cost on
/// this machine, which SoftDev's backend is measured against.
///
/// Tx rows: the guest puts as many frames as its ring holds, pushes once per batch (as netfront
/// does under load, with xmit_more), and refills as responses free slots; the backend copies
/// each frame out and drops it. Rx rows: the backend side fills every buffer the guest posts
/// with frames of the row's size; the guest takes them and reposts the buffers in batches.
/// SoftDev's vif is over the `generator` device (``FrameGenerator``), which makes its frames on
/// the ring thread when the guest posts buffers (``NetDevice/guestPostedBuffers(_:queue:)``),
/// one frame handed up as a run of copies (pktgen's clone_skb); the C backend makes them on its thread from a template.
///
/// Each target gets its own guest with one queue; the targets take turns row by row, in order
/// and then reversed (A B, B A), so a noisy neighbour hurts both sides of a ratio alike.
public struct NetBenchmark {
    public enum Target: String, Sendable, Equatable, CustomStringConvertible {
        case softdev = "softdev generator"
        case reference = "C reference"
        public var description: String { rawValue }
    }

    public struct Workload: Sendable, Equatable {
        public enum Direction: String, Sendable { case tx, rx }
        public var name: String
        /// The workload's name in `--workloads` (tx-64, rx-gso, ...).
        public var key: String
        public var frameSize: Int
        /// A TCPv4 segment with a partial checksum and a GSO extra (MSS 1448).
        public var gso: Bool
        public var direction: Direction
        public init(name: String, key: String, frameSize: Int, gso: Bool = false, direction: Direction) {
            self.name = name; self.key = key; self.frameSize = frameSize; self.gso = gso; self.direction = direction
        }

        public static let standard: [Workload] = [
            .init(name: "tx 64 B", key: "tx-64", frameSize: 64, direction: .tx),
            .init(name: "tx 1514 B", key: "tx-1514", frameSize: 1514, direction: .tx),
            .init(name: "tx 64 KiB GSO", key: "tx-gso", frameSize: 65535, gso: true, direction: .tx),
            .init(name: "rx 64 B", key: "rx-64", frameSize: 64, direction: .rx),
            .init(name: "rx 1514 B", key: "rx-1514", frameSize: 1514, direction: .rx),
            .init(name: "rx 64 KiB GSO", key: "rx-gso", frameSize: 65535, gso: true, direction: .rx),
        ]

        /// The standard workloads named in `list` (keys, comma-separated, or "all").
        public static func select(_ list: String) throws -> [Workload] { try selectWorkloads(list, from: standard, key: \.key) }
    }

    public struct Result: Sendable {
        public var frames: UInt64
        public var bytes: UInt64
        public var seconds: Double
        public var errors: UInt64
        public var framesPerSecond: Double { Double(frames) / seconds }
        public var gigabitsPerSecond: Double { Double(bytes) * 8 / seconds / 1e9 }
        mutating func add(_ other: Result) {
            frames += other.frames; bytes += other.bytes; seconds += other.seconds; errors += other.errors
        }
    }

    public struct Row: Sendable {
        public var workload: String
        public var target: String
        public var result: Result
        /// SoftDev's frames/s over the C reference's on the same workload (nil for the reference).
        public var ratioToReference: Double?
    }

    public var targets: [Target]
    public var workloads: [Workload]
    public var seconds: Double
    public var warmup: Double
    /// Both backends' poll window, and the guest's (its netfront watches its rings for
    /// responses before it sleeps).
    public var pollMicroseconds = AdaptivePoller.defaultMicroseconds
    /// Turns per workload, each of `seconds / rounds`, every second one in reverse order.
    public var rounds = 2
    /// The guest's thread on one CPU and the backends' threads on the others while the rows
    /// run (``BenchCPUPlacement``), when the machine has two CPUs or more.
    public var placeThreads = true
    /// How the rows' threads are placed, for the table's heading.
    public static let placementNote = "the guest's thread on one CPU, the backends' threads on the others (when there are two or more)"

    public init(targets: [Target] = [.reference, .softdev], workloads: [Workload] = Workload.standard, seconds: Double = 2, warmup: Double = 0.3) {
        self.targets = targets; self.workloads = workloads; self.seconds = seconds; self.warmup = warmup
    }

    /// One guest and its vif, connected to one target.
    private final class Attached {
        let target: Target
        let guest: LocalHypervisor
        let front: LocalNetFrontend
        let reference: CReferenceNetBackendHarness?
        let generatorDevice: FrameGenerator?
        let generator: NetLoadGenerator
        init(target: Target, guest: LocalHypervisor, front: LocalNetFrontend, reference: CReferenceNetBackendHarness?, generatorDevice: FrameGenerator?,
             pollMicroseconds: Int) {
            self.target = target; self.guest = guest; self.front = front; self.reference = reference; self.generatorDevice = generatorDevice
            generator = NetLoadGenerator(front: front, pollMicroseconds: pollMicroseconds)
        }
    }

    public func run(progress: (Row) -> Void = { _ in }) throws -> [Row] {
        let hypervisor = try BenchHypervisor(name: "softdev-netbench")
        defer { hypervisor.stop() }
        let (address, backend) = (hypervisor.address, hypervisor.backend)
        var options = NetifBackendOptions()
        options.pollMicroseconds = pollMicroseconds
        let devices = Mutex<[String: FrameGenerator]>([:])
        let service = NetTapService.makeHost(hypervisor: backend, options: options) { spec in
            guard let device = devices.withLock({ $0[spec] }) else { throw HarnessFailure("no generator \(spec)") }
            return device
        }
        try service.start()
        defer { service.stop() }

        var attached: [Attached] = []
        defer {
            for a in attached {
                try? a.front.close(timeoutSeconds: 2)
                a.reference?.stop()
                a.guest.destroy()
            }
        }
        for (index, target) in targets.enumerated() {
            // Rings, 256 tx pages and 256 rx buffers, and room.
            let guest = try LocalHypervisor.createGuest(address, name: "netbench-\(index)", pages: 1024)
            var paths = XenbusDevicePaths(frontendDomain: guest.domainID, backendDomain: backend.domainID, frontendType: NetTapService.frontendType,
                                          backendType: NetTapService.backendType, deviceID: 0)
            let vif = XenbusDeviceName(name: "0", deviceID: 0)
            let mac = NetTapService.defaultMAC(guest: guest.domainID, vif: 0)
            switch target {
            case .softdev:
                let device = try FrameGenerator(size: 1514)
                let spec = "bench-generator-\(index)"
                devices.withLock { $0[spec] = device }
                let (fe, be) = NetTapService.nodes(vif, spec: spec, mac: mac)
                try XenbusToolstack.attach(backend.store, paths, frontend: fe, backend: be)
                let front = try LocalNetFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
                attached.append(Attached(target: target, guest: guest, front: front, reference: nil, generatorDevice: device, pollMicroseconds: pollMicroseconds))
            case .reference:
                // A backend directory no service watches: the harness plays the backend.
                paths.backendType = "cref-vif"
                let (fe, be) = NetTapService.nodes(vif, spec: "cref", mac: mac)
                try XenbusToolstack.attach(backend.store, paths, frontend: fe, backend: be)
                let harness = CReferenceNetBackendHarness(backend: backend, guest: guest, paths: paths)
                harness.pollMicroseconds = pollMicroseconds
                try harness.advertise()
                let connected = DispatchSemaphore(value: 0)
                harness.connectInBackground { connected.signal() }
                let front = try LocalNetFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
                connected.wait()
                if let error = harness.connectError { throw HarnessFailure("C reference backend: \(error)") }
                attached.append(Attached(target: target, guest: guest, front: front, reference: harness, generatorDevice: nil, pollMicroseconds: pollMicroseconds))
            }
        }

        // Every ring thread is running now: the guest's thread (this one) apart from them.
        let placement = placeThreads ? BenchCPUPlacement.separateGuest() : nil
        defer { placement?.restore() }
        var rows: [Row] = []
        for workload in workloads {
            let frame = try Self.frame(workload)
            for a in attached {
                a.reference?.generate(frameSize: workload.direction == .rx ? workload.frameSize : 0, gsoSize: workload.gso ? 1448 : 0)
                try a.generatorDevice?.use(size: workload.frameSize, mss: workload.gso ? 1448 : nil, destination: Self.frameDestination)
            }
            var totals = [Result](repeating: Result(frames: 0, bytes: 0, seconds: 0, errors: 0), count: attached.count)
            for round in 0..<max(1, rounds) {
                for i in round % 2 == 0 ? Array(attached.indices) : attached.indices.reversed() {
                    let a = attached[i]
                    let part = seconds / Double(max(1, rounds))
                    _ = try measure(a, workload, frame, seconds: warmup)
                    let r = try measure(a, workload, frame, seconds: part)
                    if r.errors > 0 { throw HarnessFailure("\(a.target) answered \(r.errors) frames of \(workload.name) with errors") }
                    totals[i].add(r)
                }
            }
            let reference = zip(attached, totals).first { $0.0.target == .reference }?.1
            for (a, result) in zip(attached, totals) {
                let row = Row(workload: workload.name, target: "\(a.target)", result: result,
                              ratioToReference: a.target == .reference ? nil : reference.map { result.framesPerSecond / $0.framesPerSecond })
                rows.append(row)
                progress(row)
            }
        }
        return rows
    }

    private func measure(_ a: Attached, _ w: Workload, _ frame: EthernetFrame, seconds: Double) throws -> Result {
        switch w.direction {
        case .tx: return try a.generator.transmit(frame, seconds: seconds)
        case .rx: return try a.generator.receive(seconds: seconds)
        }
    }

    /// Where the rows' frames go (the guest's MAC).
    static let frameDestination = MACAddress(0x00, 0x16, 0x3e, 0, 0, 2)

    /// The row's frame, the generator's (``FrameGenerator/frame(size:mss:destination:)``): a
    /// TCPv4 segment, with MSS 1448 and a partial checksum for a GSO row.
    static func frame(_ w: Workload) throws(DeviceSpecError) -> EthernetFrame {
        try FrameGenerator.frame(size: w.frameSize, mss: w.gso ? 1448 : nil, destination: frameDestination)
    }

    /// The rows as a table: workload, backend, frames/s, Gbit/s, ratio to the C reference.
    public static func table(_ rows: [Row]) -> String {
        var lines = [pad(["workload", "backend", "frames/s", "Gbit/s", "vs C"])]
        var lastWorkload = ""
        for row in rows {
            let fps = row.result.framesPerSecond
            lines.append(pad([row.workload == lastWorkload ? "" : row.workload, row.target,
                              fps >= 10_000 ? String(format: "%.1fk", fps / 1000) : String(format: "%.0f", fps),
                              String(format: "%.2f", row.result.gigabitsPerSecond),
                              row.ratioToReference.map { String(format: "%.2f", $0) } ?? (row.target == "\(Target.reference)" ? "1.00" : "-")]))
            lastWorkload = row.workload
        }
        return lines.joined(separator: "\n")
    }

    private static func pad(_ cells: [String]) -> String {
        let widths = [16, 18, 10, 8, 6]
        return zip(cells, widths).enumerated().map { i, pair in
            let (cell, width) = pair
            let space = String(repeating: " ", count: max(0, width - cell.count))
            return i < 2 ? cell + space : space + cell
        }.joined(separator: " ")
    }
}

/// Drives queue 0 of a ``LocalNetFrontend`` as hard as a guest could, the same way whichever
/// backend serves it, so that the difference between two runs is the backend's.
final class NetLoadGenerator {
    let front: LocalNetFrontend
    @exclusivity(unchecked) private var poller: AdaptivePoller
    /// The rx frame being taken: an extra still to come, more data slots to come.
    @exclusivity(unchecked) private var expectExtra = false, moreData = false

    init(front: LocalNetFrontend, pollMicroseconds: Int) {
        self.front = front
        poller = AdaptivePoller(microseconds: pollMicroseconds)
    }

    /// Sends `frame` for `seconds`: puts as many as the ring holds, one push per batch, and
    /// refills as responses come; waits for the last responses.
    func transmit(_ frame: EthernetFrame, seconds: Double) throws -> NetBenchmark.Result {
        let q = front.queues[0]
        let start = monotonicSeconds(), end = start + seconds
        var put: UInt64 = 0, answeredSlots: UInt64 = 0, errors: UInt64 = 0
        var stopping = false
        let slots = UInt64(max(1, (frame.count + xenPageSize - 1) / xenPageSize) + (frame.offload.segmentation != nil ? 1 : 0))
        while true {
            var batch = 0
            if !stopping {
                while front.put(frame) { batch += 1 }
                if batch > 0 { q.pushTx() }
                put += UInt64(batch)
            }
            let answered = front.collectTx()
            answeredSlots += UInt64(answered)
            errors += UInt64(q.clearTxStatuses())
            if answered > 0 || batch > 0 {
                if !stopping && monotonicSeconds() >= end { stopping = true }
                if !stopping || answeredSlots < put * slots { continue }
            }
            if stopping && answeredSlots >= put * slots { break }
            if poller.wait(idle: true, { q.tx.unconsumedResponses() > 0 ? true : nil }) != nil { continue }
            // collectTx asked for a notification (RING_FINAL_CHECK_FOR_RESPONSES).
            if q.tx.unconsumedResponses() > 0 { continue }
            guard q.txChannel.wait(timeoutMilliseconds: 10_000) else {
                throw HarnessFailure("tx: no response within 10 s (\(put * slots - answeredSlots) slots unanswered)")
            }
        }
        let elapsed = monotonicSeconds() - start
        let frames = answeredSlots / slots - errors
        return .init(frames: frames, bytes: frames * UInt64(frame.count), seconds: elapsed, errors: errors)
    }

    /// Takes frames for `seconds`, reposting buffers in batches.
    func receive(seconds: Double) throws -> NetBenchmark.Result {
        let q = front.queues[0]
        let start = monotonicSeconds(), end = start + seconds
        var frames: UInt64 = 0, bytes: UInt64 = 0, errors: UInt64 = 0
        while true {
            var taken = 0
            while q.rx.unconsumedResponses() > 0 {
                let raw = q.rx.takeResponse()
                taken += 1
                if expectExtra {
                    let e = withUnsafeBytes(of: raw) { $0.load(as: netif_extra_info.self) }
                    expectExtra = e.flags & Netif.extraFlagMore != 0
                } else {
                    let r = withUnsafeBytes(of: raw) { $0.load(as: netif_rx_response.self) }
                    if r.status < 0 { errors += 1 } else { bytes += UInt64(r.status) }
                    if !moreData { expectExtra = r.flags & Netif.rxExtraInfo != 0 }
                    moreData = r.flags & Netif.rxMoreData != 0
                }
                if !expectExtra && !moreData { frames += 1 }
            }
            if taken > 0 {
                for _ in 0..<taken {
                    let index = q.rx.requestProducer
                    let id = UInt16(index & (q.rx.size - 1))
                    q.rx.putRequest(netif_rx_request(id: id, pad: 0, gref: q.rxRefs[Int(id)]))
                }
                if q.rx.pushRequests() { q.rxChannel.notify() }
                if monotonicSeconds() >= end { break }
                continue
            }
            if monotonicSeconds() >= end { break }
            if poller.wait(idle: true, { q.rx.unconsumedResponses() > 0 ? true : nil }) != nil { continue }
            if q.rx.finalCheckForResponses() > 0 { continue }
            guard q.rxChannel.wait(timeoutMilliseconds: 10_000) else { throw HarnessFailure("rx: no frame within 10 s") }
        }
        return .init(frames: frames, bytes: bytes, seconds: monotonicSeconds() - start, errors: errors)
    }
}
