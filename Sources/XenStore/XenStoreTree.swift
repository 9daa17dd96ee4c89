/// The whole of an in-memory xenstore as xenstored keeps it: the committed nodes, open
/// transactions, connections (each acting for one domain), their watches, and which domains
/// are introduced. It does no I/O and no locking: its owner (the server) serialises calls, sends
/// the replies, and delivers `outbox`, the watch events each call produced.
final class XenStoreTree {
    typealias ConnectionID = UInt64

    struct Transaction {
        var connection: ConnectionID
        var workspace: XenStoreWorkspace
    }

    /// Unprivileged connections may hold at most this many open transactions.
    static let transactionQuota = 10

    private let clock = XenStoreClock()
    private var store: XenStoreWorkspace
    private var transactions: [UInt32: Transaction] = [:]
    private var lastTransactionID: UInt32 = 0
    private var domains: [ConnectionID: UInt16] = [:]
    private var watches = XenStoreWatches()
    private(set) var introducedDomains: Set<UInt16> = [0]
    /// Watch events produced by the calls so far, in order; the owner takes and delivers them.
    var outbox: [(ConnectionID, XenStoreWatchEvent)] = []

    init() {
        store = XenStoreWorkspace(nodes: [:], clock: clock)
        let dom0Only = [XenStorePermission(domain: 0, access: .none)]
        store.put("/", XenStoreNode(permissions: dom0Only))
        // The skeleton a toolstack expects: domains live under /local/domain.
        try! store.mkdir("/local/domain", domain: 0)
        store.changes = []
    }

    // MARK: connections

    func addConnection(_ id: ConnectionID, domain: UInt16) { domains[id] = domain }

    /// Forgets a connection: its watches go and its transactions are aborted.
    func removeConnection(_ id: ConnectionID) {
        watches.removeAll(connection: id)
        transactions = transactions.filter { $0.value.connection != id }
        domains[id] = nil
    }

    func domain(of id: ConnectionID) -> UInt16? { domains[id] }

    func connections(of domain: UInt16) -> [ConnectionID] {
        domains.filter { $0.value == domain }.map(\.key).sorted()
    }

    private func domainOrThrow(_ id: ConnectionID) throws(XenStoreError) -> UInt16 {
        guard let d = domains[id] else { throw .disconnected("unknown connection \(id)") }
        return d
    }

    // MARK: node operations

    /// Runs `body` on the committed store (firing watches at once) or on the connection's
    /// transaction `transaction` (the changes wait for commit).
    private func inWorkspace<T>(_ connection: ConnectionID, _ transaction: UInt32,
                                _ body: (inout XenStoreWorkspace, UInt16) throws(XenStoreError) -> T) throws(XenStoreError) -> T {
        let domain = try domainOrThrow(connection)
        if transaction == 0 {
            defer { fire(store.changes); store.changes = [] }
            return try body(&store, domain)
        }
        guard var tx = transactions[transaction], tx.connection == connection else {
            throw .noEntry("transaction \(transaction)")
        }
        transactions[transaction] = nil   // so the workspace is uniquely referenced while it changes
        defer { transactions[transaction] = tx }
        return try body(&tx.workspace, domain)
    }

    /// Validates and makes absolute a path a connection sent.
    func canonical(_ path: String, connection: ConnectionID) throws(XenStoreError) -> String {
        try XenStorePath.canonical(path, domain: domainOrThrow(connection))
    }

    func read(_ path: String, connection: ConnectionID, transaction: UInt32 = 0) throws(XenStoreError) -> [UInt8] {
        let path = try canonical(path, connection: connection)
        return try inWorkspace(connection, transaction) { (ws, domain) throws(XenStoreError) in
            try ws.existing(path, domain: domain, need: .read).value
        }
    }

    func write(_ path: String, _ value: [UInt8], connection: ConnectionID, transaction: UInt32 = 0) throws(XenStoreError) {
        let path = try canonical(path, connection: connection)
        try inWorkspace(connection, transaction) { (ws, domain) throws(XenStoreError) in try ws.write(path, value, domain: domain) }
    }

    func mkdir(_ path: String, connection: ConnectionID, transaction: UInt32 = 0) throws(XenStoreError) {
        let path = try canonical(path, connection: connection)
        try inWorkspace(connection, transaction) { (ws, domain) throws(XenStoreError) in try ws.mkdir(path, domain: domain) }
    }

    func remove(_ path: String, connection: ConnectionID, transaction: UInt32 = 0) throws(XenStoreError) {
        let path = try canonical(path, connection: connection)
        try inWorkspace(connection, transaction) { (ws, domain) throws(XenStoreError) in try ws.remove(path, domain: domain) }
    }

    /// The children of `path` and the node's generation (which XS_DIRECTORY_PART reports so a
    /// client can tell that the list changed between parts).
    func directory(_ path: String, connection: ConnectionID, transaction: UInt32 = 0) throws(XenStoreError) -> (children: [String], generation: UInt64) {
        let path = try canonical(path, connection: connection)
        return try inWorkspace(connection, transaction) { (ws, domain) throws(XenStoreError) in
            let node = try ws.existing(path, domain: domain, need: .read)
            return (node.children, node.generation)
        }
    }

    func permissions(_ path: String, connection: ConnectionID, transaction: UInt32 = 0) throws(XenStoreError) -> [XenStorePermission] {
        let path = try canonical(path, connection: connection)
        return try inWorkspace(connection, transaction) { (ws, domain) throws(XenStoreError) in
            try ws.existing(path, domain: domain, need: .read).permissions
        }
    }

    func setPermissions(_ path: String, _ permissions: [XenStorePermission], connection: ConnectionID, transaction: UInt32 = 0) throws(XenStoreError) {
        let path = try canonical(path, connection: connection)
        try inWorkspace(connection, transaction) { (ws, domain) throws(XenStoreError) in
            try ws.setPermissions(path, permissions, domain: domain)
        }
    }

    // MARK: transactions

    func startTransaction(connection: ConnectionID) throws(XenStoreError) -> UInt32 {
        let domain = try domainOrThrow(connection)
        if domain != 0 && transactions.values.filter({ $0.connection == connection }).count >= Self.transactionQuota {
            throw .other("ENOSPC")
        }
        repeat { lastTransactionID &+= 1 } while lastTransactionID == 0 || transactions[lastTransactionID] != nil
        var workspace = XenStoreWorkspace(nodes: store.nodes, clock: clock)
        workspace.journal = [:]
        transactions[lastTransactionID] = Transaction(connection: connection, workspace: workspace)
        return lastTransactionID
    }

    /// Ends a transaction. A commit fails with `.again` if any node the transaction looked at or
    /// changed has changed in the store since; then nothing of it is applied.
    func endTransaction(_ id: UInt32, commit: Bool, connection: ConnectionID) throws(XenStoreError) {
        guard let tx = transactions[id], tx.connection == connection else { throw .noEntry("transaction \(id)") }
        transactions[id] = nil
        guard commit else { return }
        let ws = tx.workspace
        for (path, generation) in ws.journal ?? [:] where (store.nodes[path]?.generation ?? 0) != generation {
            throw .again
        }
        for path in ws.modified { store.nodes[path] = ws.nodes[path] }
        fire(ws.changes)
    }

    // MARK: watches

    func watch(_ path: String, token: String, connection: ConnectionID) throws(XenStoreError) {
        let domain = try domainOrThrow(connection)
        let canonical = try XenStorePath.canonicalWatch(path, domain: domain)
        try watches.add(.init(registered: path, canonical: canonical, token: token), connection: connection, privileged: domain == 0)
        // xenstored fires every new watch once, so the client sees the current state.
        outbox.append((connection, XenStoreWatchEvent(path: path, token: token)))
    }

    func unwatch(_ path: String, token: String, connection: ConnectionID) throws(XenStoreError) {
        let canonical = try XenStorePath.canonicalWatch(path, domain: domainOrThrow(connection))
        try watches.remove(canonical: canonical, token: token, connection: connection)
    }

    /// XS_RESET_WATCHES: drops the connection's watches and transactions, as after a guest's kexec.
    func resetWatches(connection: ConnectionID) {
        watches.removeAll(connection: connection)
        transactions = transactions.filter { $0.value.connection != connection }
    }

    private func fire(_ changes: [XenStoreChange]) {
        guard !changes.isEmpty else { return }
        outbox.append(contentsOf: watches.events(for: changes) { domains[$0] })
    }

    // MARK: domains

    /// Marks `domain` introduced and fires @introduceDomain (to domain 0's watchers: the special
    /// nodes are owned by domain 0 with no access for others). Returns false if it already was.
    @discardableResult
    func introduceDomain(_ domain: UInt16) -> Bool {
        guard introducedDomains.insert(domain).inserted else { return false }
        fireSpecial(XenStorePath.introduceDomain)
        return true
    }

    /// Forgets `domain` and fires @releaseDomain. Returns the connections acting for it, which
    /// the owner must close: the domain is gone. Domain 0 cannot be released.
    func releaseDomain(_ domain: UInt16) throws(XenStoreError) -> [ConnectionID] {
        guard domain != 0 else { throw .invalid("cannot release domain 0") }
        guard introducedDomains.remove(domain) != nil else { throw .noEntry("domain \(domain)") }
        let gone = connections(of: domain)
        for id in gone { removeConnection(id) }
        fireSpecial(XenStorePath.releaseDomain)
        return gone
    }

    private func fireSpecial(_ path: String) {
        fire([XenStoreChange(path: path, recursive: false, permissions: [XenStorePermission(domain: 0, access: .none)])])
    }

    func isIntroduced(_ domain: UInt16) -> Bool { introducedDomains.contains(domain) }
}
