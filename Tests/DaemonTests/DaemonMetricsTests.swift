import BlockTap
import Core
import Daemon
import Foundation
import Observability
import TestPeers
import XCTest
import XenStore

/// `[metrics] listen`: the daemon's Prometheus endpoint, scraped over HTTP as Prometheus does,
/// its numbers checked against the I/O a guest did, its text against promtool.
extension SoftDevDaemonTests {
    func testMetricsMoveWithIOAndPromtoolAcceptsThem() throws {
        var config = ServeConfig()
        config.metricsListen = MetricsListenAddress(host: "127.0.0.1", port: 0)
        config.exports = [.init(name: "scratch", device: "memory(size=1M)")]
        config.nbdListen = ["tcp:127.0.0.1:0"]
        let d = try startDaemon(config)
        let port = try XCTUnwrap(d.metricsEndpoint?.boundPort)
        let guest = try LocalHypervisor.createGuest(LocalHypervisorAddress(directory: directory), name: "g", pages: 8192)
        defer { guest.destroy() }
        let store = d.hypervisor.store
        let paths = try BlockTapService.attach(store: store, guest: guest.domainID, disk: try VirtualDisk("xvdb"), spec: "memory(size=8M)")
        let front = try LocalBlockFrontend(hypervisor: guest, frontendPath: paths.frontendPath)
        let disk = ["device": paths.backendPath, "class": "block", "transport": "blkif"]
        let connected = { (text: String) in Self.sample(text, "softdev_frontends_connected", ["class": "block"]) }
        let attached = { (text: String) in Self.sample(text, "softdev_devices_attached", ["class": "block"]) }

        let before = try Self.scrape(port)
        XCTAssertEqual(connected(before), 1, before)
        XCTAssertEqual(attached(before), 1, before)
        for i in 0..<3 { try front.write(sector: UInt64(8 * i), [UInt8](repeating: UInt8(i), count: 4096)) }
        for _ in 0..<2 { _ = try front.read(sector: 0, count: 8192) }
        let after = try Self.scrape(port)

        func delta(_ name: String, _ operation: String) -> Double? {
            let labels = disk.merging(["operation": operation]) { $1 }
            guard let a = Self.sample(after, name, labels) else { return nil }
            return a - (Self.sample(before, name, labels) ?? 0)
        }
        XCTAssertEqual(delta("softdev_requests_total", "write"), 3, after)
        XCTAssertEqual(delta("softdev_request_bytes_total", "write"), 3 * 4096)
        XCTAssertEqual(delta("softdev_requests_total", "read"), 2)
        XCTAssertEqual(delta("softdev_request_bytes_total", "read"), 2 * 8192)
        XCTAssertEqual(delta("softdev_request_errors_total", "write"), 0)
        XCTAssertEqual(delta("softdev_request_duration_seconds_count", "write"), 3)
        XCTAssertEqual(Self.sample(after, "softdev_request_duration_seconds_bucket", disk.merging(["operation": "write", "le": "+Inf"]) { $1 })
                       .map { $0 - (Self.sample(before, "softdev_request_duration_seconds_bucket", disk.merging(["operation": "write", "le": "+Inf"]) { $1 }) ?? 0) }, 3)
        XCTAssertEqual(Self.sample(after, "softdev_requests_in_flight", disk), 0)
        // The NBD export is measured under its name.
        XCTAssertEqual(Self.sample(after, "softdev_requests_total", ["device": "scratch", "transport": "nbd", "operation": "read"]), 0, after)

        let promtool = try Peers.program("promtool", package: "prometheus")
        let check = try Self.run(promtool, ["check", "metrics"], input: after)
        XCTAssertEqual(check.status, 0, "promtool check metrics: \(check.output)\n\(after)")
        XCTAssertEqual(check.output, "", after)

        // The guest lets go and the disk is detached: nothing connected, the disk's series gone.
        try front.close()
        XCTAssertEqual(try XenbusToolstack.detach(store, paths, timeoutSeconds: 10), .closed)
        try waitUntil("the disk to be unplugged") { d.host.count == 0 }
        let detached = try Self.scrape(port)
        XCTAssertEqual(connected(detached), 0, detached)
        XCTAssertEqual(attached(detached), 0, detached)
        XCTAssertFalse(detached.contains(paths.backendPath), detached)
    }

    func testTheMetricsEndpointAnswersOnlyMetricsAndSurvivesBadClients() throws {
        var config = ServeConfig()
        config.metricsListen = MetricsListenAddress(host: "127.0.0.1", port: 0)
        let d = try startDaemon(config)
        let port = try XCTUnwrap(d.metricsEndpoint?.boundPort)
        XCTAssertTrue(try Self.http(port, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n").hasPrefix("HTTP/1.1 404 "))
        XCTAssertTrue(try Self.http(port, "POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n").hasPrefix("HTTP/1.1 405 "))
        XCTAssertTrue(try Self.http(port, "\u{1}\u{2} garbage\r\n\r\n").hasPrefix("HTTP/1.1 400 "))
        // A client that connects and goes away at once, and one that sends half a request and goes.
        _ = try Self.http(port, "")
        _ = try Self.http(port, "GET /metr", shutDown: true)
        let text = try Self.scrape(port)
        XCTAssertEqual(Self.sample(text, "softdev_frontends_connected", ["class": "block"]), 0, text)
    }

    func testAMetricsPortInUseStopsTheDaemonWithTheReason() throws {
        // Someone else holds the port.
        let holder = MetricsEndpoint(host: "127.0.0.1", port: 0, metrics: MetricsRegistry())
        try holder.start()
        defer { holder.stop() }
        let port = try XCTUnwrap(holder.boundPort)
        var config = ServeConfig()
        config.metricsListen = MetricsListenAddress(host: "127.0.0.1", port: port)
        XCTAssertThrowsError(try startDaemon(config)) { error in
            XCTAssertTrue("\(error)".contains("metrics: cannot listen on 127.0.0.1:\(port): Address already in use"), "\(error)")
        }
        daemon = nil
    }

    // MARK: Helpers

    /// GET /metrics: the body of a 200 answer.
    static func scrape(_ port: UInt16) throws -> String {
        let answer = try http(port, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\n\r\n")
        guard answer.hasPrefix("HTTP/1.1 200 OK\r\n"), let split = answer.range(of: "\r\n\r\n") else {
            throw TimedOut(what: "a 200 answer to GET /metrics, got: \(answer.prefix(200))")
        }
        XCTAssertTrue(answer[..<split.lowerBound].contains("Content-Type: text/plain; version=0.0.4"))
        return String(answer[split.upperBound...])
    }

    /// Sends `request` on a new TCP connection and reads the answer until the server closes.
    /// `shutDown`: stop sending after the request without waiting for an answer.
    static func http(_ port: UInt16, _ request: String, shutDown: Bool = false) throws -> String {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = port.bigEndian
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let ok = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard ok == 0 else { throw TimedOut(what: "a connection to 127.0.0.1:\(port)") }
        guard !request.isEmpty else { return "" }
        _ = Array(request.utf8).withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if shutDown { return "" }
        var answer: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard n > 0 else { break }
            answer += buffer[..<n]
        }
        return String(decoding: answer, as: UTF8.self)
    }

    /// The value of the sample of `name` whose labels include `labels`.
    static func sample(_ text: String, _ name: String, _ labels: [String: String]) -> Double? {
        for line in text.split(separator: "\n") where line.hasPrefix(name + "{") || line.hasPrefix(name + " ") {
            guard labels.allSatisfy({ line.contains("\($0.key)=\"\($0.value)\"") }), let value = line.split(separator: " ").last else { continue }
            return Double(value)
        }
        return nil
    }

    /// Runs `program` with `input` on its stdin: its exit status and what it wrote.
    static func run(_ program: String, _ arguments: [String], input: String) throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: program)
        p.arguments = arguments
        let stdin = Pipe(), out = Pipe()
        p.standardInput = stdin
        p.standardOutput = out
        p.standardError = out
        try p.run()
        stdin.fileHandleForWriting.write(Data(input.utf8))
        try stdin.fileHandleForWriting.close()
        let output = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: output, as: UTF8.self))
    }
}
