import Core
import TOMLKit

/// The `ids` filter's rules, from a TOML file: tables `[[alert]]` and `[[deny]]`, each with
/// one condition:
///
/// ```toml
/// [[alert]]
/// path = "/etc/passwd"        # this file (and, for a directory, everything under it)
/// [[deny]]
/// path = "/boot"
/// [[alert]]
/// blocks = [0, 1023]           # file-system blocks first..last (the superblock, the GDT...)
/// [[alert]]
/// signature = "X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR"   # bytes in a written block (text)
/// [[deny]]
/// signature-hex = "7f454c46"   # or as hex
/// ```
/// An optional `name` names the rule in alerts. Denied writes fail with EPERM and nothing of
/// them reaches the disk; a deny by path covers the file's data blocks (a metadata block is
/// shared by many files: a change there is alerted, never refused).
struct IDSRules {
    enum Action: String { case alert, deny }

    enum Condition: Equatable {
        case path(String)
        case blocks(ClosedRange<UInt64>)
        case signature([UInt8])
    }

    struct Rule: Equatable {
        var name: String
        var action: Action
        var condition: Condition

        /// Whether `path` is the rule's path or under it.
        func covers(_ path: String) -> Bool {
            guard case .path(let protected) = condition else { return false }
            if protected == "/" { return true }
            return path == protected || path.hasPrefix(protected.hasSuffix("/") ? protected : protected + "/")
        }
    }

    private(set) var rules: [Rule] = []
    var pathRules: [Rule] { rules.filter { if case .path = $0.condition { return true } else { return false } } }
    /// The signature rules, kept apart: only when there are any is a write searched (and
    /// gathered into one run of bytes if it is in several buffers).
    private(set) var signatures: [Rule] = []

    /// Reads the rules in `text`; `file` names it in errors (with the line and column for TOML
    /// syntax).
    init(parsing text: String, file: String) throws(BlockError) {
        let table: TOMLTable
        do { table = try TOMLTable(string: text) } catch let error as TOMLParseError {
            throw BlockError(.invalid, "\(file):\(error.source.begin.line):\(error.source.begin.column): \(error.description)")
        } catch {
            throw BlockError(.invalid, "\(file): \(error)")
        }
        for key in table.keys where key != "alert" && key != "deny" {
            throw BlockError(.invalid, "\(file): unknown table '\(key)' (use [[alert]] and [[deny]])")
        }
        for action in [Action.alert, .deny] {
            guard let value = table[action.rawValue] else { continue }
            guard let list = value.array else { throw BlockError(.invalid, "\(file): write [[\(action.rawValue)]], a list of tables") }
            for (index, item) in list.enumerated() {
                let place = "\(file): [[\(action.rawValue)]] number \(index + 1)"
                guard let entry = item.table else { throw BlockError(.invalid, "\(place) is not a table") }
                try rules.append(Self.rule(entry, action: action, place: place))
            }
        }
        signatures = rules.filter { if case .signature = $0.condition { return true } else { return false } }
    }

    private static func rule(_ entry: TOMLTable, action: Action, place: String) throws(BlockError) -> Rule {
        var conditions: [Condition] = []
        for key in entry.keys {
            let value = entry[key]!
            switch key {
            case "name": continue
            case "path":
                guard let path = value.string, path.hasPrefix("/") else { throw BlockError(.invalid, "\(place): path must be an absolute path") }
                conditions.append(.path(path.count > 1 && path.hasSuffix("/") ? String(path.dropLast()) : path))
            case "blocks":
                guard let pair = value.array, pair.count == 2, let first = pair[0].int, let last = pair[1].int, first >= 0, first <= last else {
                    throw BlockError(.invalid, "\(place): blocks must be [first, last] with first <= last")
                }
                conditions.append(.blocks(UInt64(first)...UInt64(last)))
            case "signature":
                guard let text = value.string, !text.isEmpty else { throw BlockError(.invalid, "\(place): signature must be a non-empty string") }
                conditions.append(.signature(Array(text.utf8)))
            case "signature-hex":
                guard let text = value.string, let bytes = Self.hex(text), !bytes.isEmpty else {
                    throw BlockError(.invalid, "\(place): signature-hex must be pairs of hex digits")
                }
                conditions.append(.signature(bytes))
            default:
                throw BlockError(.invalid, "\(place): unknown key '\(key)' (use path, blocks, signature or signature-hex, and name)")
            }
        }
        guard conditions.count == 1 else { throw BlockError(.invalid, "\(place): give exactly one of path, blocks, signature and signature-hex") }
        let name = entry["name"]?.string ?? "\(action.rawValue) \(Self.describe(conditions[0]))"
        return Rule(name: name, action: action, condition: conditions[0])
    }

    static func describe(_ condition: Condition) -> String {
        switch condition {
        case .path(let path): return "path \(path)"
        case .blocks(let range): return "blocks \(range.lowerBound)-\(range.upperBound)"
        case .signature(let bytes): return "signature \(bytes.count) bytes"
        }
    }

    private static func hex(_ text: String) -> [UInt8]? {
        let digits = Array(text.utf8)
        guard digits.count % 2 == 0 else { return nil }
        var bytes: [UInt8] = []
        for i in stride(from: 0, to: digits.count, by: 2) {
            guard let byte = UInt8(String(decoding: digits[i...i + 1], as: UTF8.self), radix: 16) else { return nil }
            bytes.append(byte)
        }
        return bytes
    }
}
