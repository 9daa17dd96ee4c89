import Core
import Devices
import XCTest

/// The learning switch: flooding, learning, never back to the sender, offloads per receiver.
final class NetSwitchTests: XCTestCase {
    func ports(_ name: String, _ n: Int, accepting: [NetOffloads]? = nil) throws -> ([SwitchPort], [CollectingReceiver]) {
        var ports: [SwitchPort] = [], receivers: [CollectingReceiver] = []
        for i in 0..<n {
            let port = try XCTUnwrap(try DeviceRegistry.open("switch(name=\(name))", of: .net) as? SwitchPort)
            let receiver = CollectingReceiver()
            port.connect(receiver, accepting: accepting?[i] ?? .all)
            ports.append(port); receivers.append(receiver)
        }
        return (ports, receivers)
    }

    func testFloodsLearnsAndNeverSendsBack() throws {
        let (p, r) = try ports("learn", 3)
        defer { p.forEach { $0.close() } }
        XCTAssertEqual(EthernetSwitch.portCount(of: "learn"), 3)
        // Broadcast from A floods to the others.
        p[0].fromGuest(NetTestFrames.arp(from: NetTestFrames.macA))
        XCTAssertEqual(r.map { $0.received.count }, [0, 1, 1])
        // B answers A: A is known, so only port 0 gets it; B is learned too.
        p[1].fromGuest(NetTestFrames.tcp4(port: 80, from: NetTestFrames.macB, to: NetTestFrames.macA))
        XCTAssertEqual(r.map { $0.received.count }, [1, 1, 1])
        p[0].fromGuest(NetTestFrames.tcp4(port: 80, from: NetTestFrames.macA, to: NetTestFrames.macB))
        XCTAssertEqual(r.map { $0.received.count }, [1, 2, 1])
        // Unknown unicast floods.
        let unknown = MACAddress(0x02, 0, 0, 0, 0, 0x99)
        p[2].fromGuest(NetTestFrames.tcp4(port: 80, from: MACAddress(0x02, 0, 0, 0, 0, 0x0c), to: unknown))
        XCTAssertEqual(r.map { $0.received.count }, [2, 3, 1])
        // A frame to an address behind its own port is not sent back.
        p[0].fromGuest(NetTestFrames.tcp4(port: 80, from: MACAddress(0x02, 0, 0, 0, 0, 0x0d), to: NetTestFrames.macA))
        XCTAssertEqual(r.map { $0.received.count }, [2, 3, 1])
        XCTAssertEqual(p[0].counts.fromGuest.frames, 3)
        XCTAssertEqual(p[1].counts.toGuest.frames, 3)
    }

    func testFinishesChecksumsAndCutsSegmentsTheReceiverCannotTake() throws {
        let (p, r) = try ports("offload", 3, accepting: [.all, [], .all])
        defer { p.forEach { $0.close() } }
        let partial = NetTestFrames.tcp4(port: 80, payload: 100, from: NetTestFrames.macA, to: .broadcast, partial: true)
        p[0].fromGuest(partial)
        let finished = try XCTUnwrap(r[1].received.first)
        XCTAssertEqual(finished.offload.checksum, .validated)
        XCTAssertEqual(finished.bytes, NetTestFrames.tcp4(port: 80, payload: 100, from: NetTestFrames.macA, to: .broadcast).bytes)
        XCTAssertEqual(r[2].received.first?.offload.checksum, .partial(start: 34, offset: 16), "a port that takes it gets it partial")
        var gso = NetTestFrames.tcp4(port: 80, payload: 3000, from: NetTestFrames.macA, to: .broadcast, partial: true)
        gso.offload.segmentation = .init(kind: .tcpv4, size: 1448)
        p[0].fromGuest(gso)
        // Port 1 takes no offload: three segments, checksums finished; port 2 the frame whole.
        XCTAssertEqual(r[1].received.dropFirst().map(\.count), [1448, 1448, 104].map { 54 + $0 })
        XCTAssertEqual(r[1].received.dropFirst().map(\.offload), [FrameOffload](repeating: FrameOffload(checksum: .validated), count: 3))
        XCTAssertEqual(p[1].counts.toGuest.drops, 0)
        XCTAssertEqual(p[1].counts.toGuest.frames, 4)
        XCTAssertEqual(r[2].received.count, 2)
        XCTAssertEqual(r[2].received.last?.offload.segmentation, gso.offload.segmentation)
        // A segmentation that cannot be cut (UDP) is dropped and counted.
        var udp = NetTestFrames.udp6(payload: 3000, from: NetTestFrames.macA, to: .broadcast)
        udp.offload.segmentation = .init(kind: .tcpv6, size: 1448)
        p[0].fromGuest(udp)
        XCTAssertEqual(p[1].counts.toGuest.drops, 1)
    }

    func testSwitchGoesWithItsLastPort() throws {
        let (p, r) = try ports("gone", 2)
        p[0].close()
        XCTAssertEqual(EthernetSwitch.portCount(of: "gone"), 1)
        p[1].fromGuest(NetTestFrames.arp())
        XCTAssertEqual(r[0].received.count, 0, "a closed port gets nothing")
        p[1].close()
        XCTAssertEqual(EthernetSwitch.portCount(of: "gone"), 0)
        let (again, _) = try ports("gone", 1)
        XCTAssertEqual(EthernetSwitch.portCount(of: "gone"), 1)
        again[0].close()
    }

    func testManyThreadsAtOnce() throws {
        let (p, r) = try ports("threads", 4)
        defer { p.forEach { $0.close() } }
        DispatchQueue.concurrentPerform(iterations: 4) { i in
            let mac = MACAddress(0x02, 0, 0, 0, 1, UInt8(i))
            for _ in 0..<500 { p[i].fromGuest(NetTestFrames.arp(from: mac)) }
        }
        XCTAssertEqual(r.map { $0.received.count }, [1500, 1500, 1500, 1500])
    }
}
