import Core
import Foundation
import Glibc
import Synchronization

/// An alert of the `ids` filter.
public struct IDSAlert: Sendable, Equatable {
    public var rule: String
    /// "alert", or "deny" when the write was refused.
    public var action: String
    /// The file the write or change concerns, when the map knows it.
    public var path: String?
    /// The write's byte range on the device (0, 0 for a change seen in the journal).
    public var offset: UInt64
    public var length: UInt64
    public var detail: String

    /// One JSON line (the `alerts=` file's format).
    public var json: String {
        func quote(_ s: String) -> String {
            var out = "\""
            for c in s.unicodeScalars {
                switch c {
                case "\"": out += "\\\""
                case "\\": out += "\\\\"
                case "\n": out += "\\n"
                default: out += c.value < 0x20 ? String(format: "\\u%04x", c.value) : String(c)
                }
            }
            return out + "\""
        }
        let time = String(format: "%.6f", Date().timeIntervalSince1970)
        return "{\"time\":\(time),\"rule\":\(quote(rule)),\"action\":\(quote(action)),\"path\":\(path.map(quote) ?? "null"),"
            + "\"offset\":\(offset),\"length\":\(length),\"detail\":\(quote(detail))}"
    }
}

/// `ids(rules=FILE, alerts=FILE) | <disk>`: storage-based intrusion detection that understands
/// the ext2/3/4 file system above it (Pennington et al.'s storage IDS; the block-tap paper's
/// "semantically smart" disk). It maps blocks to paths (``Ext4Map``: read at open, kept current
/// from the metadata the guest writes, journal included) and applies rules (``IDSRules``) to
/// each write:
/// - a write to a data block of a file under a `deny` path, to a denied block range, or with a
///   denied signature fails (EPERM) and nothing of it reaches the disk;
/// - `alert` rules on the same conditions raise an alert and let the write through;
/// - changes the map sees to protected paths (a name created, replaced or removed; a file's
///   size or blocks) raise alerts, for `deny` rules too (a metadata block holds many files).
/// Alerts go to the alert handler (the daemon's log and metrics; standard error otherwise) and,
/// with `alerts=`, to a file as JSON lines. Reads, flushes and the rest pass through.
public final class IDSFilter: BlockFilter, @unchecked Sendable {
    public override var name: String { "ids" }
    let rules: IDSRules
    private let map: Ext4Map
    private let mapLock = ConditionLock()
    /// Map updates, in the order writes complete, off the completion thread (they read the disk).
    private let updates = BlockWorkers(limit: 1, purpose: "ids map updates")
    private let alertsFD: Int32
    private let alertCount = Atomic<Int>(0)
    private let closed = Atomic<Bool>(false)

    /// Where alerts go besides `alerts=`: the daemon sets its log and metrics here.
    public static func setAlertHandler(_ handler: @escaping @Sendable (IDSAlert) -> Void) { handlerBox.withLock { $0 = handler } }
    private static let handlerBox = Mutex<@Sendable (IDSAlert) -> Void>({ alert in
        let line = "softdev: ids \(alert.action): \(alert.rule): \(alert.path ?? "-"): \(alert.detail)\n"
        fputs(line, stderr)
    })

    init(next: any BlockDevice, rules: IDSRules, alerts: String?) throws(BlockError) {
        self.rules = rules
        if let alerts {
            alertsFD = open(alerts, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o600)
            guard alertsFD >= 0 else { throw BlockError.system("ids: alerts file \(alerts)", errno: errno) }
        } else {
            alertsFD = -1
        }
        let below = next
        map = Ext4Map { offset, length in Self.readBytes(below, offset, length) }
        super.init(next: next)
    }

    deinit { if alertsFD >= 0 { Glibc.close(alertsFD) } }

    /// Alerts raised so far.
    public var alerts: Int { alertCount.load(ordering: .relaxed) }

    /// The paths of the file owning byte `offset` of the device, and its role ("data",
    /// "directory", "tree"); empty when no file owns it. For tests and `softdev` checks.
    public func owner(ofByte offset: UInt64) -> (paths: [String], role: String)? {
        mapLock.withLock {
            guard map.superblock != nil, let owner = map.owner(of: offset / UInt64(map.blockSize)) else { return nil }
            return (map.paths(of: owner.inode), "\(owner.role)")
        }
    }

    /// Waits until the map has taken in every write completed so far.
    public func settle() {
        let done = ConditionLock()
        var finished = false
        updates.enqueue { done.withLock { finished = true; done.broadcast() } }
        done.withLock { while !finished { done.wait() } }
    }

    static func readBytes(_ device: any BlockDevice, _ offset: UInt64, _ length: Int) -> [UInt8]? {
        guard offset + UInt64(length) <= device.geometry.size else { return nil }
        let memory = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: 4096)
        defer { memory.deallocate() }
        var vector = iovec(iov_base: memory, iov_len: length)
        let ok = withUnsafeMutablePointer(to: &vector) { v in
            device.submitAndWait(BlockRequest(operation: .read, offset: offset, length: UInt64(length), buffers: IOBuffers(v, count: 1))) == .success
        }
        return ok ? Array(UnsafeRawBufferPointer(start: memory, count: length)) : nil
    }

    // MARK: Writes

    public override func submit(_ request: BlockRequest, completion: BlockCompletion) {
        switch request.operation {
        case .read, .flush: return next.submit(request, completion: completion)
        case .write, .writeZeroes, .discard: break
        }
        let write = request.operation == .write
        // Decide with the map as it is, and keep the new contents of the blocks the map reads.
        let (verdicts, metadata) = mapLock.withLock { () -> ([IDSAlert], [(UInt64, [UInt8]?)]) in
            let size = UInt64(map.blockSize)
            let first = request.offset / size, last = (request.offset + max(request.length, 1) - 1) / size
            var verdicts: [IDSAlert] = []
            var metadata: [(UInt64, [UInt8]?)] = []
            for block in first...last {
                if map.isMetadata(block) {
                    let start = block * size, whole = start >= request.offset && start + size <= request.offset + request.length
                    // A whole block's new contents; a part of one is read back once it landed.
                    if whole {
                        metadata.append((block, write ? Self.copy(request.buffers, at: Int(start - request.offset), count: Int(size))
                                                      : [UInt8](repeating: 0, count: Int(size))))
                    } else {
                        metadata.append((block, nil))
                    }
                } else if map.superblock != nil, let owner = map.owner(of: block), owner.role == .data {
                    let paths = map.paths(of: owner.inode)
                    for rule in rules.rules {
                        guard let path = paths.first(where: rule.covers) else { continue }
                        verdicts.append(IDSAlert(rule: rule.name, action: rule.action.rawValue, path: path, offset: request.offset,
                                                 length: request.length, detail: "\(request.operation) of block \(block) of \(path)"))
                    }
                }
                for rule in rules.rules {
                    if case .blocks(let range) = rule.condition, range.contains(block) {
                        verdicts.append(IDSAlert(rule: rule.name, action: rule.action.rawValue, path: nil, offset: request.offset,
                                                 length: request.length, detail: "\(request.operation) of block \(block)"))
                    }
                }
            }
            return (verdicts, metadata)
        }
        var all = verdicts
        if write && !rules.signatures.isEmpty {
            Self.withContiguousBytes(request.buffers) { data in
                for rule in rules.signatures {
                    guard case .signature(let signature) = rule.condition, Self.contains(data, signature) else { continue }
                    all.append(IDSAlert(rule: rule.name, action: rule.action.rawValue, path: nil, offset: request.offset,
                                        length: request.length, detail: "a written block holds the signature"))
                }
            }
        }
        // One alert per rule and write is enough.
        var seen = Set<String>()
        all = all.filter { seen.insert($0.rule).inserted }
        for alert in all { raise(alert) }
        if all.contains(where: { $0.action == IDSRules.Action.deny.rawValue }) {
            return completion.complete(.failure(BlockError(.readOnly, errno: EPERM, "ids: the write was denied by \(all.first { $0.action == "deny" }!.rule)")))
        }
        guard !metadata.isEmpty else { return next.submit(request, completion: completion) }
        let sink = IDSWriteSink(filter: self, completion: completion, metadata: metadata)
        next.submit(request, completion: BlockCompletion(sink: sink, tag: 0))
    }

    /// The write landed: the map takes in the metadata it changed, off this thread.
    fileprivate func landed(_ metadata: [(UInt64, [UInt8]?)]) {
        updates.enqueue { [self] in
            let changes = mapLock.withLock { () -> [(Ext4Map.Change, [String])] in
                var changes: [(Ext4Map.Change, [String])] = []
                for (block, contents) in metadata {
                    let size = map.blockSize
                    guard let bytes = contents ?? Self.readBytes(next, block * UInt64(size), size), bytes.count == size else { continue }
                    for change in map.written(block, bytes) { changes.append((change, map.paths(of: change.inode))) }
                }
                return changes
            }
            for (change, paths) in changes {
                for rule in rules.pathRules {
                    // A name removed has no path any more: the detail carries it.
                    guard let path = paths.first(where: rule.covers) ?? (rule.covers(Self.pathIn(change.detail)) ? Self.pathIn(change.detail) : nil) else { continue }
                    raise(IDSAlert(rule: rule.name, action: "alert", path: path, offset: 0, length: 0, detail: change.detail))
                }
            }
        }
    }

    /// The path a change's detail starts with ("name /etc/passwd removed").
    private static func pathIn(_ detail: String) -> String {
        let words = detail.split(separator: " ")
        return words.first(where: { $0.hasPrefix("/") }).map(String.init) ?? ""
    }

    private func raise(_ alert: IDSAlert) {
        alertCount.add(1, ordering: .relaxed)
        if alertsFD >= 0 {
            let line = alert.json + "\n"
            _ = line.withCString { write(alertsFD, $0, strlen($0)) }
        }
        let handler = Self.handlerBox.withLock { $0 }
        handler(alert)
    }

    /// `count` bytes of the buffers (seen as one run) from byte `position`: one metadata block.
    private static func copy(_ buffers: IOBuffers, at position: Int, count: Int) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: count) { bytes, initialized in
            if count > 0 { buffers.copy(to: bytes.baseAddress!, count: count, at: position) }
            initialized = count
        }
    }

    /// Calls `body` with the whole of the buffers as one run of bytes: the buffer itself when
    /// there is one, else a copy gathered from them (a signature may straddle two).
    private static func withContiguousBytes(_ buffers: IOBuffers, _ body: (UnsafeRawBufferPointer) -> Void) {
        let count = buffers.byteCount
        if let whole = buffers.contiguous(at: 0, count: count) {
            return body(UnsafeRawBufferPointer(start: whole, count: count))
        }
        let gathered = copy(buffers, at: 0, count: count)
        gathered.withUnsafeBytes(body)
    }

    private static func contains(_ data: UnsafeRawBufferPointer, _ signature: [UInt8]) -> Bool {
        guard let first = signature.first, data.count >= signature.count, let base = data.baseAddress else { return false }
        return signature.withUnsafeBytes { wanted in
            // memchr to each candidate first byte, memcmp the rest (Glibc's module has no memmem).
            let end = base + (data.count - wanted.count + 1)
            var at = base
            while at < end, let hit = memchr(at, Int32(first), end - at) {
                if memcmp(hit, wanted.baseAddress!, wanted.count) == 0 { return true }
                at = UnsafeRawPointer(hit) + 1
            }
            return false
        }
    }

    public override func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        updates.stop()
        super.close()
    }
}

/// One write with metadata in flight: completes the caller, then feeds the map.
private final class IDSWriteSink: BlockCompletionSink, @unchecked Sendable {
    let filter: IDSFilter
    let completion: BlockCompletion
    let metadata: [(UInt64, [UInt8]?)]
    init(filter: IDSFilter, completion: BlockCompletion, metadata: [(UInt64, [UInt8]?)]) {
        self.filter = filter; self.completion = completion; self.metadata = metadata
    }
    func complete(tag: UInt64, result: BlockResult) {
        if result == .success { filter.landed(metadata) }
        completion.complete(result)
    }
}

extension IDSFilter {
    public static let descriptor = DeviceDescriptor(
        name: "ids", kind: .filter,
        summary: "Storage-based intrusion detection for the ext2/3/4 file system on the device below: maps blocks to paths and alerts on or denies writes by path, block range or signature.",
        parameters: [
            DeviceParameter("rules", required: true, "A TOML file of [[alert]] and [[deny]] rules, each with path, blocks = [first, last], signature or signature-hex."),
            DeviceParameter("alerts", "A file the alerts are appended to as JSON lines (they also go to the daemon's log and metrics)."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            let path = try parameters.required("rules")
            let alerts = parameters.string("alerts")
            let below = next!
            return try DeviceSpecError.opening { () throws(BlockError) in
                guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
                    throw BlockError(.invalid, "ids: cannot read the rules file \(path)")
                }
                return try IDSFilter(next: below, rules: try IDSRules(parsing: text, file: path), alerts: alerts)
            }
        })
}
