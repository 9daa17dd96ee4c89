import Core
import Devices
import Synchronization

/// Real frames for the network tests: ARP, IPv4 TCP, IPv6 UDP, with correct IP headers.
enum NetTestFrames {
    static let macA = MACAddress(0x02, 0, 0, 0, 0, 0x0a)
    static let macB = MACAddress(0x02, 0, 0, 0, 0, 0x0b)

    static func ethernet(_ dst: MACAddress, _ src: MACAddress, type: UInt16) -> [UInt8] {
        dst.octets + src.octets + [UInt8(type >> 8), UInt8(type & 0xff)]
    }

    /// An ARP request for 10.0.0.2 from 10.0.0.1.
    static func arp(from src: MACAddress = macA) -> EthernetFrame {
        let body: [UInt8] = [0, 1, 8, 0, 6, 4, 0, 1] + src.octets + [10, 0, 0, 1] + [0, 0, 0, 0, 0, 0] + [10, 0, 0, 2]
        return EthernetFrame(ethernet(.broadcast, src, type: 0x0806) + body)
    }

    /// An IPv4 TCP segment to `port` with `payload` bytes; its checksum is correct, or left
    /// partial (the pseudo-header sum in the field) when `partial`.
    static func tcp4(port: UInt16, payload: Int = 20, from src: MACAddress = macA, to dst: MACAddress = macB,
                     partial: Bool = false) -> EthernetFrame {
        let total = 20 + 20 + payload
        var ip: [UInt8] = [0x45, 0, UInt8(total >> 8), UInt8(total & 0xff), 0x12, 0x34, 0x40, 0, 64, 6, 0, 0,
                           10, 0, 0, 1, 10, 0, 0, 2]
        let ipsum = ~FrameChecksum.fold(ip.withUnsafeBytes { FrameChecksum.sum($0) })
        ip[10] = UInt8(ipsum >> 8); ip[11] = UInt8(ipsum & 0xff)
        let tcp: [UInt8] = [0x9c, 0x40, UInt8(port >> 8), UInt8(port & 0xff), 0, 0, 0, 1, 0, 0, 0, 0,
                            0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]
        let data = (0..<payload).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
        return finish(EthernetFrame(ethernet(dst, src, type: 0x0800) + ip + tcp + data), partial: partial)
    }

    /// An IPv6 UDP datagram to port 53 with `payload` bytes, its checksum correct.
    static func udp6(payload: Int = 12, from src: MACAddress = macA, to dst: MACAddress = macB) -> EthernetFrame {
        let length = 8 + payload
        let ip: [UInt8] = [0x60, 0, 0, 0, UInt8(length >> 8), UInt8(length & 0xff), 17, 64]
            + [0xfd, 0] + [UInt8](repeating: 0, count: 13) + [1]
            + [0xfd, 0] + [UInt8](repeating: 0, count: 13) + [2]
        let udp: [UInt8] = [0x30, 0x39, 0, 53, UInt8(length >> 8), UInt8(length & 0xff), 0, 0]
        let data = (0..<payload).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        return finish(EthernetFrame(ethernet(dst, src, type: 0x86dd) + ip + udp + data), partial: false)
    }

    /// Writes the transport checksum: left partial, or completed.
    private static func finish(_ frame: EthernetFrame, partial: Bool) -> EthernetFrame {
        var f = frame
        let h = FrameHeaders(f)!
        FrameChecksum.preparePartial(&f, headers: h)
        if !partial {
            FrameChecksum.complete(&f)
            f.offload.checksum = .none
        }
        return f
    }
}

/// A receiver that keeps what it gets.
final class CollectingReceiver: NetFrameReceiver, @unchecked Sendable {
    private let frames = Mutex<[EthernetFrame]>([])
    func toGuest(_ frame: EthernetFrame) { frames.withLock { $0.append(frame) } }
    var received: [EthernetFrame] { frames.withLock { $0 } }
}

/// An endpoint that keeps the frames from the guest and can send frames up.
final class CollectingEndpoint: NetDevice, @unchecked Sendable {
    let name = "collect"
    var offloads: NetOffloads = .all
    private let frames = Mutex<[EthernetFrame]>([])
    private(set) var receiver: (any NetFrameReceiver)?
    private(set) var receiverOffloads: NetOffloads = []
    private(set) var closed = false
    func fromGuest(_ frame: EthernetFrame) { frames.withLock { $0.append(frame) } }
    func connect(_ receiver: any NetFrameReceiver, accepting offloads: NetOffloads) {
        self.receiver = receiver; receiverOffloads = offloads
    }
    func close() { closed = true }
    func send(_ frame: EthernetFrame) { receiver?.toGuest(frame) }
    var received: [EthernetFrame] { frames.withLock { $0 } }
}
