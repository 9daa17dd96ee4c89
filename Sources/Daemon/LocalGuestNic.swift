import Core
import NetTap
import XenStore

/// A local guest's network card through the Swift netfront (`softdev guest`).
final class LocalGuestNic: LocalGuestDevice {
    let front: LocalNetFrontend
    let name: String
    let mac: MACAddress
    var backendPath: String { front.backendPath }

    init(guest: LocalHypervisor, frontendPath: String, options: LocalGuestOptions) throws {
        var o = LocalNetFrontend.Options()
        o.queues = options.queues
        front = try LocalNetFrontend(hypervisor: guest, frontendPath: frontendPath, options: o)
        name = "vif" + String(frontendPath.split(separator: "/").last ?? "")
        mac = ((try? guest.store.readString(frontendPath + "/mac")) ?? nil).flatMap { MACAddress($0) } ?? .zero
    }

    var summary: String {
        "MAC \(mac), \(front.queues.count) queue\(front.queues.count == 1 ? "" : "s"), backend offers "
            + ["feature-sg", "feature-gso-tcpv4", "feature-gso-tcpv6", "feature-split-event-channels"]
                .filter { front.backendFeatures[$0] == "1" }.map { $0.replacingOccurrences(of: "feature-", with: "") }.joined(separator: ",")
    }

    /// Sends a broadcast ARP request for 192.0.2.1 (a documentation address: nobody answers)
    /// and sees the backend take it.
    func check() throws -> String? {
        var arp = [UInt8](repeating: 0xff, count: 6) + mac.octets + [0x08, 0x06]
        arp += [0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01] + mac.octets + [192, 0, 2, 2] + [UInt8](repeating: 0, count: 6) + [192, 0, 2, 1]
        arp += [UInt8](repeating: 0, count: 60 - arp.count)
        guard front.send(EthernetFrame(arp)) else { throw NetifConnectError("\(name): the tx ring is full") }
        guard front.waitForTx(), front.queues[0].txStatuses.last == Netif.statusOkay else {
            throw NetifConnectError("\(name): the backend did not take a 60-byte ARP request (statuses \(front.queues[0].txStatuses))")
        }
        return "a 60-byte ARP request sent and taken"
    }

    func close(timeoutSeconds: Double) throws { try front.close(timeoutSeconds: timeoutSeconds) }
}
