/// The watches of all connections, and how a change turns into events (cxenstored's
/// fire_watches).
struct XenStoreWatches {
    typealias ConnectionID = UInt64

    struct Watch: Equatable {
        /// The path as the client registered it: events are reported relative to the
        /// connection's home when the watch was registered with a relative path.
        var registered: String
        var canonical: String
        var token: String
    }

    /// Unprivileged connections may hold at most this many watches (cxenstored's default quota).
    static let quotaPerConnection = 128

    private(set) var byConnection: [ConnectionID: [Watch]] = [:]

    mutating func add(_ watch: Watch, connection: ConnectionID, privileged: Bool) throws(XenStoreError) {
        var list = byConnection[connection, default: []]
        if list.contains(where: { $0.canonical == watch.canonical && $0.token == watch.token }) {
            throw .exists(watch.registered)
        }
        if !privileged && list.count >= Self.quotaPerConnection { throw .other("E2BIG") }
        list.append(watch)
        byConnection[connection] = list
    }

    mutating func remove(canonical: String, token: String, connection: ConnectionID) throws(XenStoreError) {
        guard let i = byConnection[connection]?.firstIndex(where: { $0.canonical == canonical && $0.token == token })
        else { throw .noEntry(canonical) }
        byConnection[connection]!.remove(at: i)
    }

    mutating func removeAll(connection: ConnectionID) { byConnection[connection] = nil }

    /// The events `changes` cause, for every connection whose domain (from `domainOf`) may read
    /// the changed node. A watch fires when the change is at or below its path; a removal also
    /// fires watches below the removed node, reporting the watched path. A watch fires at most
    /// once per path in one batch of changes.
    func events(for changes: [XenStoreChange], domainOf: (ConnectionID) -> UInt16?) -> [(ConnectionID, XenStoreWatchEvent)] {
        var out: [(ConnectionID, XenStoreWatchEvent)] = []
        for (connection, watches) in byConnection.sorted(by: { $0.key < $1.key }) {
            guard let domain = domainOf(connection) else { continue }
            var seen = Set<XenStoreWatchEvent>()
            for change in changes {
                guard XenStoreAccess(domain: domain, permissions: change.permissions).contains(.read) else { continue }
                for watch in watches {
                    let path: String
                    if change.path.hasPrefix("@") || watch.canonical.hasPrefix("@") {
                        guard change.path == watch.canonical else { continue }   // special paths match exactly
                        path = change.path
                    } else if XenStorePath.isWithin(change.path, watch.canonical) {
                        path = change.path
                    } else if change.recursive && XenStorePath.isWithin(watch.canonical, change.path) {
                        path = watch.canonical
                    } else {
                        continue
                    }
                    let event = XenStoreWatchEvent(path: Self.reported(path, for: watch, domain: domain), token: watch.token)
                    if seen.insert(event).inserted { out.append((connection, event)) }
                }
            }
        }
        return out
    }

    /// Strips the connection's home from events of a watch registered with a relative path.
    static func reported(_ path: String, for watch: Watch, domain: UInt16) -> String {
        guard !watch.registered.hasPrefix("/") && !watch.registered.hasPrefix("@") else { return path }
        let home = XenStorePath.domainPath(domain) + "/"
        return path.hasPrefix(home) ? String(path.dropFirst(home.count)) : path
    }
}
