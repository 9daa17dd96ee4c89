/// The parser of USBGuard's rule language, one rule per line:
///
/// ```
/// rule      := target [device-id] {attribute} [# comment]
/// target    := allow | block | reject
/// device-id := (hex4|*) ":" (hex4|*)
/// attribute := name ( value | [operator] "{" value {blank value} "}" )
/// operator  := all-of | one-of | none-of | equals | equals-ordered | match-all
/// ```
///
/// Attribute names: `id`, `name`, `serial`, `hash`, `parent-hash`, `via-port`,
/// `with-interface` (cc:ss:pp), `with-connect-type`, `label` (strings in double quotes with C
/// escapes: `\"`, `\\`, `\n`, `\t`, `\xHH`...) and `if` (`[!]true`, `[!]false`,
/// `[!]localtime(HH:MM[:SS][-HH:MM[:SS]])`). An attribute given twice, an empty set, an unknown
/// name or an unsupported condition is an error naming the file, line and column and what was
/// expected there.
enum USBRuleParser {
    static func parse(_ text: String, file: String) throws(USBPolicyError) -> [USBRule] {
        var rules: [USBRule] = []
        for (index, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            var line = Line(chars: Array(raw.hasSuffix("\r") ? raw.dropLast() : raw), file: file, number: index + 1)
            if let rule = try line.rule() { rules.append(rule) }
        }
        return rules
    }

    /// One line being parsed.
    struct Line {
        let chars: [Character]
        let file: String
        let number: Int
        var at = 0

        init(chars: [Character], file: String, number: Int) { self.chars = chars; self.file = file; self.number = number }

        var current: Character? { at < chars.count ? chars[at] : nil }
        var atEnd: Bool { current == nil || current == "#" }

        func fail(_ expected: String, at column: Int? = nil) -> USBPolicyError {
            let c = column ?? at
            let found = c < chars.count ? "'\(String(chars[c...].prefix(while: { !$0.isWhitespace }).prefix(24)))'" : "the end of the line"
            return USBPolicyError(file: file, line: number, column: c + 1, message: "expected \(expected), found \(found)")
        }

        mutating func skipBlanks() { while let c = current, c == " " || c == "\t" { at += 1 } }

        /// Characters up to a blank, a brace or the end (a word, a device id, an interface type).
        mutating func word() -> (String, Int) {
            let start = at
            while let c = current, !c.isWhitespace, c != "{", c != "}", c != "\"", c != "#" { at += 1 }
            return (String(chars[start..<at]), start)
        }

        /// After a value: a blank, a closing brace, a comment or the end.
        func expectSeparator() throws(USBPolicyError) {
            guard let c = current, !c.isWhitespace, c != "#", c != "}" else { return }
            throw fail("a blank after the value")
        }

        mutating func rule() throws(USBPolicyError) -> USBRule? {
            skipBlanks()
            if atEnd { return nil }
            let (first, start) = self.word()
            guard let target = USBPolicyTarget(rawValue: first) else { throw fail("a rule target: allow, block or reject", at: start) }
            var rule = USBRule(target: target, file: file, line: number,
                               text: String(chars).trimmingCharacters(in: " \t"))
            skipBlanks()
            // An optional device id right after the target (it has a colon; names do not).
            if !atEnd, current != "\"" {
                let save = at
                let (token, start) = self.word()
                if token.contains(":") {
                    rule.id = USBRuleAttribute(op: .equals, values: [try deviceID(token, at: start)])
                    try expectSeparator()
                } else {
                    at = save
                }
            }
            var seen: Set<String> = []
            while true {
                skipBlanks()
                if atEnd { break }
                let (name, start) = word()
                guard Self.attributeNames.contains(name) else {
                    throw fail("an attribute (" + Self.attributeNames.joined(separator: ", ") + ")", at: start)
                }
                guard seen.insert(name).inserted, !(name == "id" && rule.id != nil) else {
                    throw USBPolicyError(file: file, line: number, column: start + 1,
                                         message: "the attribute '\(name)' is given twice (a rule has each at most once)")
                }
                skipBlanks()
                switch name {
                case "id": rule.id = try attribute { (p: inout Line) throws(USBPolicyError) in
                    let (token, start) = p.word()
                    return try p.deviceID(token, at: start)
                }
                case "name": rule.name = try attribute { (p: inout Line) throws(USBPolicyError) in try p.string() }
                case "serial": rule.serial = try attribute { (p: inout Line) throws(USBPolicyError) in try p.string() }
                case "hash": rule.hash = try attribute { (p: inout Line) throws(USBPolicyError) in try p.string() }
                case "parent-hash": rule.parentHash = try attribute { (p: inout Line) throws(USBPolicyError) in try p.string() }
                case "via-port": rule.viaPort = try attribute { (p: inout Line) throws(USBPolicyError) in try p.string() }
                case "with-connect-type": rule.withConnectType = try attribute { (p: inout Line) throws(USBPolicyError) in try p.string() }
                case "label": rule.label = try attribute { (p: inout Line) throws(USBPolicyError) in try p.string() }
                case "with-interface": rule.withInterface = try attribute { (p: inout Line) throws(USBPolicyError) in
                    let (token, start) = p.word()
                    switch USBInterfaceClassPattern.parse(token) {
                    case .success(let v): return v
                    case .failure(let reason): throw p.fail(reason.message, at: start)
                    }
                }
                default:   // "if"
                    let conditions = try attribute { (p: inout Line) throws(USBPolicyError) in try p.condition() }
                    if conditions.op == .matchAll {
                        throw USBPolicyError(file: file, line: number, column: start + 1,
                                             message: "match-all is not an operator of conditions (all-of, one-of, none-of, equals, equals-ordered)")
                    }
                    rule.conditions = conditions
                }
                try expectSeparator()
            }
            return rule
        }

        static let attributeNames = ["id", "name", "serial", "hash", "parent-hash", "via-port", "with-interface",
                                     "with-connect-type", "label", "if"]

        /// `value` or `[operator] { value ... }`.
        mutating func attribute<V>(_ value: (inout Line) throws(USBPolicyError) -> V) throws(USBPolicyError) -> USBRuleAttribute<V> {
            var op = USBSetOperator.equals
            let save = at
            let (token, _) = word()
            if let named = USBSetOperator(rawValue: token) {
                op = named
                skipBlanks()
                guard current == "{" else { throw fail("'{' after the operator \(token)") }
            } else {
                at = save
                if current != "{" {
                    guard !atEnd else { throw fail("a value") }
                    return USBRuleAttribute(op: .equals, values: [try value(&self)])
                }
            }
            at += 1   // "{"
            var values: [V] = []
            while true {
                skipBlanks()
                guard let c = current else { throw fail("'}' to close the set") }
                if c == "}" { at += 1; break }
                values.append(try value(&self))
                try expectSeparator()
            }
            guard !values.isEmpty else { throw fail("at least one value in the set", at: at - 1) }
            return USBRuleAttribute(op: op, values: values)
        }

        func deviceID(_ token: String, at start: Int) throws(USBPolicyError) -> USBDeviceIDPattern {
            let parts = token.split(separator: ":", omittingEmptySubsequences: false)
            func part(_ s: Substring) -> UInt16?? {
                if s == "*" { return .some(nil) }
                guard s.count == 4, let v = UInt16(s, radix: 16) else { return nil }
                return .some(v)
            }
            guard parts.count == 2, let vendor = part(parts[0]), let product = part(parts[1]) else {
                throw fail("a device id VID:PID (four hex digits each, or *)", at: start)
            }
            if vendor == nil && product != nil { throw fail("*:* (a * vendor id needs a * product id)", at: start) }
            return USBDeviceIDPattern(vendor: vendor, product: product)
        }

        /// A double-quoted string with C escapes.
        mutating func string() throws(USBPolicyError) -> String {
            guard current == "\"" else { throw fail("a string in double quotes") }
            let open = at
            at += 1
            var out = ""
            while true {
                guard let c = current else {
                    throw USBPolicyError(file: file, line: number, column: open + 1, message: "expected a closing '\"' for the string opened here")
                }
                at += 1
                if c == "\"" { return out }
                guard c == "\\" else { out.append(c); continue }
                guard let e = current else { continue }
                at += 1
                switch e {
                case "\"", "\\", "'", "?": out.append(e)
                case "n": out.append("\n")
                case "t": out.append("\t")
                case "r": out.append("\r")
                case "a": out.append("\u{07}")
                case "b": out.append("\u{08}")
                case "f": out.append("\u{0C}")
                case "v": out.append("\u{0B}")
                case "x":
                    let digits = String(chars[at..<min(at + 2, chars.count)])
                    guard digits.count == 2, let v = UInt8(digits, radix: 16) else { throw fail("two hex digits after \\x") }
                    at += 2
                    out.unicodeScalars.append(Unicode.Scalar(v))
                default: throw fail("an escape (\\\" \\\\ \\' \\n \\t \\r \\a \\b \\f \\v \\xHH)", at: at - 2)
                }
            }
        }

        /// `[!]true`, `[!]false`, `[!]localtime(range)`.
        mutating func condition() throws(USBPolicyError) -> USBRuleCondition {
            let start = at
            var negated = false
            if current == "!" { negated = true; at += 1 }
            let nameStart = at
            while let c = current, c.isLetter || c == "-" { at += 1 }
            let name = String(chars[nameStart..<at])
            var argument: String?
            var argumentStart = at
            if current == "(" {
                at += 1
                argumentStart = at
                while let c = current, c != ")" { at += 1 }
                guard current == ")" else { throw fail("')' to close \(name)(") }
                argument = String(chars[argumentStart..<at])
                at += 1
            }
            switch name {
            case "true", "false":
                guard argument == nil else { throw fail("\(name) without an argument", at: start) }
                return USBRuleCondition(kind: .always(name == "true"), negated: negated)
            case "localtime":
                guard let argument else { throw fail("localtime(HH:MM[:SS][-HH:MM[:SS]])", at: start) }
                let ends = argument.split(separator: "-", omittingEmptySubsequences: false)
                guard ends.count <= 2, let begin = Self.daytime(ends[0]), let end = ends.count == 2 ? Self.daytime(ends[1]) : begin else {
                    throw fail("a time range HH:MM[:SS][-HH:MM[:SS]]", at: argumentStart)
                }
                guard begin <= end else { throw fail("a time range whose beginning is not after its end", at: argumentStart) }
                return USBRuleCondition(kind: .localtime(begin: begin, end: end), negated: negated)
            case "allowed-matches", "rule-applied", "rule-evaluated", "random":
                throw USBPolicyError(file: file, line: number, column: nameStart + 1,
                                     message: "the condition \(name) is not supported by SoftDev (it evaluates true, false and localtime(...))")
            default:
                throw fail("a condition: true, false or localtime(...)", at: start)
            }
        }

        static func daytime(_ s: Substring) -> Int? {
            let parts = s.split(separator: ":", omittingEmptySubsequences: false)
            guard parts.count == 2 || parts.count == 3, parts.allSatisfy({ $0.count == 2 }) else { return nil }
            let n = parts.compactMap { Int($0) }
            guard n.count == parts.count, n[0] < 24, n[1] < 60, n.count == 2 || n[2] < 60 else { return nil }
            return n[0] * 3600 + n[1] * 60 + (n.count == 3 ? n[2] : 0)
        }
    }
}

extension String {
    fileprivate func trimmingCharacters(in set: String) -> String {
        var s = Substring(self)
        while let c = s.first, set.contains(c) { s = s.dropFirst() }
        while let c = s.last, set.contains(c) { s = s.dropLast() }
        return String(s)
    }
}
