/// Turns one request from a connection into its reply, as cxenstored's process_message and its
/// do_* handlers do: unknown types get ENOSYS, privileged types from an unprivileged domain get
/// EACCES, malformed payloads get EINVAL, and every failure is an XS_ERROR reply, never a crash.
extension XenStoreTree {
    typealias MessageType = XenStoreMessageType

    /// Requests only domain 0 may send (cxenstored's XS_FLAG_PRIV).
    private static let privileged: Set<UInt32> = [
        MessageType.control, MessageType.introduce, MessageType.release, MessageType.isDomainIntroduced,
        MessageType.resume, MessageType.setTarget,
    ]

    func handle(_ request: XenStoreMessage, from connection: ConnectionID) -> XenStoreMessage {
        do throws(XenStoreError) {
            guard let domain = domain(of: connection) else { throw .disconnected("connection closed") }
            if Self.privileged.contains(request.type) && domain != 0 { throw .permissionDenied("privileged request") }
            let payload = try reply(to: request, from: connection)
            return XenStoreMessage(type: request.type, requestID: request.requestID,
                                   transactionID: request.transactionID, payload: payload)
        } catch {
            return .error(error.wireName, replyingTo: request)
        }
    }

    private static let ok = XenStoreMessage.nulTerminated(["OK"])

    private func reply(to request: XenStoreMessage, from connection: ConnectionID) throws(XenStoreError) -> [UInt8] {
        let tx = request.transactionID
        switch request.type {
        case MessageType.read:
            return try read(onlyArgument(request), connection: connection, transaction: tx)
        case MessageType.write:
            // "path\0value": the value is every byte after the path's NUL, NULs included.
            guard let path = request.firstString else { throw .invalid("write without path") }
            let value = Array(request.payload[(path.utf8.count + 1)...])
            try write(path, value, connection: connection, transaction: tx)
            return Self.ok
        case MessageType.mkdir:
            try mkdir(onlyArgument(request), connection: connection, transaction: tx)
            return Self.ok
        case MessageType.remove:
            try remove(onlyArgument(request), connection: connection, transaction: tx)
            return Self.ok
        case MessageType.directory:
            let children = try directory(onlyArgument(request), connection: connection, transaction: tx).children
            let payload = XenStoreMessage.nulTerminated(children)
            // Too long for one reply: the client must ask for parts (libxenstore does so on E2BIG).
            guard payload.count <= XenStoreLimits.payloadMax else { throw .other("E2BIG") }
            return payload
        case MessageType.directoryPart:
            return try directoryPart(request, connection: connection)
        case MessageType.getPermissions:
            let perms = try permissions(onlyArgument(request), connection: connection, transaction: tx)
            return XenStoreMessage.nulTerminated(perms.map(\.description))
        case MessageType.setPermissions:
            let args = request.strings
            guard request.payload.last == 0, args.count >= 2 else { throw .invalid("set-perms needs a path and permissions") }
            var perms: [XenStorePermission] = []
            for text in args.dropFirst() {
                guard let p = XenStorePermission(Substring(text)) else { throw .invalid("bad permission \(text)") }
                perms.append(p)
            }
            try setPermissions(args[0], perms, connection: connection, transaction: tx)
            return Self.ok
        case MessageType.watch, MessageType.unwatch:
            let args = request.strings
            guard request.payload.last == 0, args.count == 2 else { throw .invalid("watch needs a path and a token") }
            if request.type == MessageType.watch {
                try watch(args[0], token: args[1], connection: connection)
            } else {
                try unwatch(args[0], token: args[1], connection: connection)
            }
            return Self.ok
        case MessageType.resetWatches:
            resetWatches(connection: connection)
            return Self.ok
        case MessageType.transactionStart:
            // Transactions do not nest (cxenstored answers EBUSY).
            guard tx == 0 else { throw .other("EBUSY") }
            return XenStoreMessage.nulTerminated([String(try startTransaction(connection: connection))])
        case MessageType.transactionEnd:
            let commit: Bool
            switch try onlyArgument(request) {
            case "T": commit = true
            case "F": commit = false
            default: throw .invalid("transaction end takes T or F")
            }
            try endTransaction(tx, commit: commit, connection: connection)
            return Self.ok
        case MessageType.getDomainPath:
            return XenStoreMessage.nulTerminated([XenStorePath.domainPath(try domainArgument(request))])
        case MessageType.introduce:
            // "domid\0mfn\0port\0": the ring page and event channel mean nothing here; the local
            // hypervisor connects domains with `XenStoreServer.connect(as:)`.
            guard let first = request.strings.first, let domain = UInt16(first), request.strings.count >= 3 else {
                throw .invalid("introduce needs domid, mfn and port")
            }
            introduceDomain(domain)
            return Self.ok
        case MessageType.release:
            _ = try releaseDomain(domainArgument(request))
            return Self.ok
        case MessageType.isDomainIntroduced:
            return XenStoreMessage.nulTerminated([isIntroduced(try domainArgument(request)) ? "T" : "F"])
        case MessageType.resume:
            guard isIntroduced(try domainArgument(request)) else { throw .noEntry("domain") }
            return Self.ok
        case MessageType.control:
            // No debug commands (log, quota, live update) in this store.
            throw .other("ENOSYS")
        default:
            // XS_SET_TARGET, replies sent as requests, and unknown numbers.
            throw .other("ENOSYS")
        }
    }

    /// The single NUL-terminated argument (cxenstored's onearg: anything else is EINVAL).
    private func onlyArgument(_ request: XenStoreMessage) throws(XenStoreError) -> String {
        guard request.payload.last == 0, let s = request.firstString, s.utf8.count + 1 == request.payload.count else {
            throw .invalid("expected one NUL-terminated argument")
        }
        return s
    }

    private func domainArgument(_ request: XenStoreMessage) throws(XenStoreError) -> UInt16 {
        let text = try onlyArgument(request)
        guard let domain = UInt16(text) else { throw .invalid("bad domain id \(text)") }
        return domain
    }

    /// "path\0offset\0" -> "generation\0" and the children from byte `offset` of the
    /// NUL-separated child list that fit in one payload, plus an empty string once the list
    /// ends (cxenstored's send_directory_part).
    private func directoryPart(_ request: XenStoreMessage, connection: ConnectionID) throws(XenStoreError) -> [UInt8] {
        let args = request.strings
        guard request.payload.last == 0, args.count == 2, let offset = Int(args[1]) else {
            throw .invalid("directory part needs a path and an offset")
        }
        let (children, generation) = try directory(args[0], connection: connection, transaction: request.transactionID)
        let list = XenStoreMessage.nulTerminated(children)
        var out = XenStoreMessage.nulTerminated([String(generation)])
        let room = XenStoreLimits.payloadMax - out.count - 1
        var end = min(offset, list.count)
        while end < list.count {
            let next = list[end...].firstIndex(of: 0)! + 1
            if next - offset > room { break }
            end = next
        }
        out.append(contentsOf: list[min(offset, list.count)..<end])
        if end == list.count { out.append(0) }
        return out
    }
}
