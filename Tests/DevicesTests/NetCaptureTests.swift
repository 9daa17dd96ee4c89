import Core
import Devices
import Foundation
import TestPeers
import XCTest

/// `pcap`: files that tcpdump and tshark read back, with directions and finished checksums.
final class NetCaptureTests: XCTestCase {
    func run(_ program: String, _ arguments: [String]) throws -> String {
        let (status, output) = try Peers.run(program, arguments, errors: false)
        XCTAssertEqual(status, 0, "\(program) \(arguments)")
        return output
    }

    /// Captures three frames from the guest (one TCP with a partial checksum) and one to it.
    func capture(_ path: String, spec: String) throws -> [EthernetFrame] {
        let stack = try XCTUnwrap(try DeviceRegistry.open("\(spec) | null", of: .net) as? NetFilter)
        let up = CollectingReceiver()
        stack.connect(up, accepting: .all)
        let partial = NetTestFrames.tcp4(port: 80, payload: 100, partial: true)
        let frames = [NetTestFrames.arp(), partial, NetTestFrames.udp6()]
        for frame in frames { stack.fromGuest(frame) }
        // Up, toward the guest: the filter passes it to its receiver.
        let reply = NetTestFrames.tcp4(port: 22, from: NetTestFrames.macB, to: NetTestFrames.macA)
        stack.toGuest(reply)
        XCTAssertEqual(up.received.count, 1)
        stack.close()
        return frames + [reply]
    }

    func testClassicPcapReadsBackInTcpdumpAndTshark() throws {
        let tcpdump = try Peers.program("tcpdump", package: "tcpdump")
        let tshark = try Peers.program("tshark", package: "tshark")
        let path = makeTemporaryDirectory(self) + "/c.pcap"
        let frames = try capture(path, spec: "pcap(file=\(path))")
        let lines = try run(tcpdump, ["-nn", "-vv", "-r", path]).split(separator: "\n").filter { !$0.hasPrefix(" ") }
        XCTAssertEqual(lines.count, 4, lines.joined(separator: "\n"))
        let lengths = try run(tshark, ["-r", path, "-T", "fields", "-e", "frame.len"]).split(separator: "\n").compactMap { Int($0) }
        XCTAssertEqual(lengths, frames.map(\.count))
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        XCTAssertEqual(data.count, 24 + frames.map { 16 + $0.count }.reduce(0, +))
        XCTAssertEqual(Array(data.suffix(frames[3].count)), frames[3].bytes, "the bytes as given")
        // The partial checksum is finished in the file.
        let verbose = try run(tcpdump, ["-nn", "-vv", "-r", path, "tcp port 80"])
        XCTAssertTrue(verbose.contains("cksum") && verbose.contains("(correct)") && !verbose.contains("incorrect"), verbose)
    }

    func testPcapngHasDirections() throws {
        let tshark = try Peers.program("tshark", package: "tshark")
        let tcpdump = try Peers.program("tcpdump", package: "tcpdump")
        let path = makeTemporaryDirectory(self) + "/c.pcapng"
        let frames = try capture(path, spec: "pcap(file=\(path))")
        let rows = try run(tshark, ["-r", path, "-T", "fields", "-e", "frame.len", "-e", "frame.packet_flags_direction"])
            .split(separator: "\n").map { $0.split(separator: "\t").map(String.init) }
        XCTAssertEqual(rows.map { Int($0[0]) }, frames.map(\.count))
        // Outbound (2) from the guest, inbound (1) to it.
        let directions = rows.map { $0.count > 1 ? Int($0[1].replacingOccurrences(of: "0x", with: ""), radix: 16) : nil }
        XCTAssertEqual(directions, [2, 2, 2, 1])
        let verbose = try run(tcpdump, ["-nn", "-vv", "-r", path, "tcp port 80"])
        XCTAssertTrue(verbose.contains("(correct)") && !verbose.contains("incorrect"), verbose)
    }

    func testFormatParameterAndErrors() throws {
        let dir = makeTemporaryDirectory(self)
        _ = try capture(dir + "/x.cap", spec: "pcap(file=\(dir)/x.cap, format=pcapng)")
        let data = try Data(contentsOf: URL(fileURLWithPath: dir + "/x.cap"))
        XCTAssertEqual(Array(data.prefix(4)), [0x0a, 0x0d, 0x0d, 0x0a])
        XCTAssertThrowsError(try DeviceRegistry.open("pcap(file=/nonexistent/dir/x.pcap) | null", of: .net)) {
            XCTAssertTrue("\($0)".contains("cannot create"), "\($0)")
        }
    }
}
