/// One node of the store.
struct XenStoreNode: Equatable {
    var value: [UInt8] = []
    /// First entry: the owner, and the access of every domain not listed after it.
    var permissions: [XenStorePermission]
    /// Child names in creation order, as xenstored lists them.
    var children: [String] = []
    /// Bumped (from the store-wide clock) on every change; transactions compare it on commit.
    var generation: UInt64 = 0
}

/// What a domain may do with a node.
struct XenStoreAccess: OptionSet {
    let rawValue: UInt8
    static let read = XenStoreAccess(rawValue: 1)
    static let write = XenStoreAccess(rawValue: 2)
    /// May change the permissions (the owner, or domain 0).
    static let owner = XenStoreAccess(rawValue: 4)
    static let all: XenStoreAccess = [.read, .write, .owner]

    /// cxenstored's `perm_for_conn`: domain 0 may do anything, the owner may do anything, a
    /// listed domain gets its entry, everyone else the first entry's access.
    init(domain: UInt16, permissions: [XenStorePermission]) {
        guard domain != 0, let first = permissions.first else {
            self = domain == 0 ? .all : []
            return
        }
        if first.domain == domain { self = .all; return }
        let entry = permissions.dropFirst().first { $0.domain == domain } ?? first
        switch entry.access {
        case .none: self = []
        case .read: self = .read
        case .write: self = .write
        case .both: self = [.read, .write]
        }
    }
    init(rawValue: UInt8) { self.rawValue = rawValue }
}

/// A change that fires watches: the node's path, whether watches below it fire too (reporting
/// their own path), and the node's permissions, which decide who may see the event. As in
/// cxenstored, writes, mkdir, set-perms and the top of a removal fire recursively; the nodes a
/// removal deletes below its top fire only watches at or above themselves.
struct XenStoreChange {
    var path: String
    var recursive: Bool
    var permissions: [XenStorePermission]
}

/// The store's source of generations; shared by the committed store and every transaction so
/// that a generation, once handed out, never appears again.
final class XenStoreClock {
    private var last: UInt64 = 0
    func tick() -> UInt64 { last += 1; return last }
}

/// A set of nodes that operations work on: the committed store itself, or a transaction's private
/// copy. A transaction keeps a journal of the generation every node had when the transaction first
/// looked at it; commit fails with EAGAIN if any of them has changed in the store since.
struct XenStoreWorkspace {
    /// Nodes an unprivileged domain may own (cxenstored's quota-nb-entry-per-domain): with
    /// values of at most a payload each, a guest cannot grow the store's memory without bound.
    static let entryQuota = 1000

    var nodes: [String: XenStoreNode]
    let clock: XenStoreClock
    /// Path -> generation when first touched (0: did not exist). nil outside a transaction.
    var journal: [String: UInt64]?
    /// Paths this transaction created, changed or removed.
    var modified: Set<String> = []
    /// Watch firings, held back until the transaction commits.
    var changes: [XenStoreChange] = []

    private mutating func note(_ path: String) {
        if journal != nil, journal![path] == nil { journal![path] = nodes[path]?.generation ?? 0 }
    }

    mutating func node(_ path: String) -> XenStoreNode? {
        note(path)
        return nodes[path]
    }

    mutating func put(_ path: String, _ node: XenStoreNode) {
        note(path)
        var node = node
        node.generation = clock.tick()
        nodes[path] = node
        if journal != nil { modified.insert(path) }
    }

    mutating func delete(_ path: String) {
        note(path)
        nodes[path] = nil
        if journal != nil { modified.insert(path) }
    }

    // MARK: operations, with cxenstored's permission rules

    func access(_ domain: UInt16, _ node: XenStoreNode) -> XenStoreAccess {
        XenStoreAccess(domain: domain, permissions: node.permissions)
    }

    /// The node at `path`, which the caller must be allowed to `need`.
    mutating func existing(_ path: String, domain: UInt16, need: XenStoreAccess) throws(XenStoreError) -> XenStoreNode {
        guard let node = node(path) else { throw .noEntry(path) }
        guard access(domain, node).isSuperset(of: need) else { throw .permissionDenied(path) }
        return node
    }

    mutating func write(_ path: String, _ value: [UInt8], domain: UInt16) throws(XenStoreError) {
        if var node = node(path) {
            guard access(domain, node).contains(.write) else { throw .permissionDenied(path) }
            node.value = value
            put(path, node)
            changes.append(XenStoreChange(path: path, recursive: true, permissions: node.permissions))
        } else {
            try create(path, value, domain: domain)
        }
    }

    mutating func mkdir(_ path: String, domain: UInt16) throws(XenStoreError) {
        // An existing node is fine, if the caller could have written it (cxenstored's do_mkdir).
        if let node = node(path) {
            guard access(domain, node).contains(.write) else { throw .permissionDenied(path) }
            return
        }
        try create(path, [], domain: domain)
    }

    /// Creates `path` and any missing ancestors. The caller needs write access to the closest
    /// existing ancestor; each new node inherits its parent's permissions, except that a
    /// node an unprivileged domain creates is owned by that domain (cxenstored's construct_node).
    private mutating func create(_ path: String, _ value: [UInt8], domain: UInt16) throws(XenStoreError) {
        var missing = [path]
        var ancestor = XenStorePath.parent(path)!
        while node(ancestor) == nil {
            missing.append(ancestor)
            ancestor = XenStorePath.parent(ancestor)!   // the root always exists
        }
        var parent = try existing(ancestor, domain: domain, need: .write)
        if domain != 0 {
            // A scan, not a count kept on every change: only a guest's creations pay for it.
            let owned = nodes.values.reduce(0) { $1.permissions.first?.domain == domain ? $0 + 1 : $0 }
            guard owned + missing.count <= Self.entryQuota else { throw .other("ENOSPC") }
        }
        var parentPath = ancestor
        for newPath in missing.reversed() {
            var permissions = parent.permissions
            if domain != 0 { permissions[0].domain = domain }
            parent.children.append(XenStorePath.lastComponent(newPath))
            put(parentPath, parent)
            let node = XenStoreNode(value: newPath == path ? value : [], permissions: permissions)
            put(newPath, node)
            parent = nodes[newPath]!
            parentPath = newPath
        }
        changes.append(XenStoreChange(path: path, recursive: true, permissions: parent.permissions))
    }

    /// Removes `path` and everything below it. A missing node whose parent exists is not an error
    /// (cxenstored's do_rm), so removing twice succeeds.
    mutating func remove(_ path: String, domain: UInt16) throws(XenStoreError) {
        guard path != "/" else { throw .invalid("cannot remove /") }
        guard let target = node(path) else {
            if let parent = XenStorePath.parent(path), node(parent) != nil { return }
            throw .noEntry(path)
        }
        guard access(domain, target).contains(.write) else { throw .permissionDenied(path) }
        let parentPath = XenStorePath.parent(path)!
        if var parent = node(parentPath) {
            let name = XenStorePath.lastComponent(path)
            parent.children.removeAll { $0 == name }
            put(parentPath, parent)
        }
        // Fire first, with the permissions the node still has (cxenstored's _rm).
        changes.append(XenStoreChange(path: path, recursive: true, permissions: target.permissions))
        deleteTree(path, target)
    }

    /// Deletes a subtree, children first; each removed descendant fires watches on itself.
    private mutating func deleteTree(_ path: String, _ node: XenStoreNode) {
        for name in node.children {
            let childPath = XenStorePath.child(path, name)
            if let child = self.node(childPath) {
                deleteTree(childPath, child)
                changes.append(XenStoreChange(path: childPath, recursive: false, permissions: child.permissions))
            }
        }
        delete(path)
    }

    mutating func setPermissions(_ path: String, _ permissions: [XenStorePermission], domain: UInt16) throws(XenStoreError) {
        guard !permissions.isEmpty else { throw .invalid("empty permission list") }
        var node = try existing(path, domain: domain, need: [.write, .owner])
        // Unprivileged domains may not give their nodes away (cxenstored's do_set_perms).
        if domain != 0 && permissions[0].domain != node.permissions[0].domain { throw .other("EPERM") }
        node.permissions = permissions
        put(path, node)
        changes.append(XenStoreChange(path: path, recursive: true, permissions: permissions))
    }
}
