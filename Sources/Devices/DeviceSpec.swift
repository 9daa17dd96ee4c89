import Core

/// A device stack written as text, shared by the command line and configuration files:
///
/// ```
/// stats | file(path=disk.img, readonly=true)
/// memory(size=1G)
/// null(size=64M)
/// ```
///
/// The grammar (whitespace is allowed between any two tokens):
///
/// ```
/// stack   := element ( "|" element )*         leftmost is outermost
/// element := name [ "(" [ param ( "," param )* ] ")" ]
/// param   := name "=" value
/// name    := letter ( letter | digit | "_" | "-" )*
/// value   := bare | quoted
/// bare    := one or more characters other than whitespace , ( ) | = "
/// quoted  := '"' ( any character but " and \ | "\" any character )* '"'
/// ```
///
/// Parsing checks only the shape; `DeviceRegistry` checks names and parameters.
public struct DeviceSpec: Equatable, Sendable, CustomStringConvertible {
    /// One device or filter of the stack with its parameters, in the order written.
    public struct Element: Equatable, Sendable {
        public var name: String
        public var parameters: [Parameter]
        public init(name: String, parameters: [Parameter] = []) { self.name = name; self.parameters = parameters }
    }
    public struct Parameter: Equatable, Sendable {
        public var key: String
        public var value: String
        public init(key: String, value: String) { self.key = key; self.value = value }
    }

    /// Outermost first: `elements[0]` receives requests, the last element is the device.
    public var elements: [Element]
    public init(elements: [Element]) { self.elements = elements }

    /// Parses `text`; the error says what was expected and where.
    public init(parsing text: String) throws(DeviceSpecError) {
        var parser = Parser(text: Array(text.unicodeScalars), source: text)
        elements = try parser.stack()
    }

    /// The spec in its canonical form, which parses back to the same value.
    public var description: String {
        elements.map { element in
            guard !element.parameters.isEmpty else { return element.name }
            let parameters = element.parameters.map { "\($0.key)=\(Self.quoteIfNeeded($0.value))" }
            return "\(element.name)(\(parameters.joined(separator: ", ")))"
        }.joined(separator: " | ")
    }

    static func quoteIfNeeded(_ value: String) -> String {
        if !value.isEmpty && value.unicodeScalars.allSatisfy(Parser.isBare) { return value }
        var quoted = "\""
        for c in value.unicodeScalars {
            if c == "\"" || c == "\\" { quoted.unicodeScalars.append("\\") }
            quoted.unicodeScalars.append(c)
        }
        return quoted + "\""
    }

    /// A recursive-descent parser over Unicode scalars; positions in errors are 1-based columns.
    private struct Parser {
        let text: [Unicode.Scalar]
        let source: String
        var position = 0

        static func isBare(_ c: Unicode.Scalar) -> Bool {
            !(c.properties.isWhitespace || ",()|=\"".unicodeScalars.contains(c))
        }
        static func isNameStart(_ c: Unicode.Scalar) -> Bool { c.isASCII && c.properties.isAlphabetic }
        static func isName(_ c: Unicode.Scalar) -> Bool {
            c.isASCII && (c.properties.isAlphabetic || ("0"..."9").contains(c) || c == "_" || c == "-")
        }

        var current: Unicode.Scalar? { position < text.count ? text[position] : nil }

        mutating func skipSpace() {
            while let c = current, c.properties.isWhitespace { position += 1 }
        }

        func fail(_ expected: String) -> DeviceSpecError {
            let found = current.map { "'\($0)'" } ?? "the end"
            return DeviceSpecError("expected \(expected) at column \(position + 1) of '\(source)', found \(found)")
        }

        mutating func stack() throws(DeviceSpecError) -> [Element] {
            var elements = [try element()]
            while current == "|" {
                position += 1
                elements.append(try element())
            }
            guard current == nil else { throw fail("'|' or the end") }
            return elements
        }

        mutating func element() throws(DeviceSpecError) -> Element {
            skipSpace()
            let name = try self.name(what: "a device name")
            var parameters: [Parameter] = []
            skipSpace()
            if current == "(" {
                position += 1
                skipSpace()
                if current == ")" {
                    position += 1
                } else {
                    while true {
                        parameters.append(try parameter())
                        skipSpace()
                        if current == "," { position += 1; continue }
                        if current == ")" { position += 1; break }
                        throw fail("',' or ')'")
                    }
                }
                skipSpace()
            }
            return Element(name: name, parameters: parameters)
        }

        mutating func name(what: String) throws(DeviceSpecError) -> String {
            guard let c = current, Self.isNameStart(c) else { throw fail(what) }
            let start = position
            while let c = current, Self.isName(c) { position += 1 }
            return String(String.UnicodeScalarView(text[start..<position]))
        }

        mutating func parameter() throws(DeviceSpecError) -> Parameter {
            skipSpace()
            let key = try name(what: "a parameter name")
            skipSpace()
            guard current == "=" else { throw fail("'=' after '\(key)'") }
            position += 1
            skipSpace()
            return Parameter(key: key, value: try value(of: key))
        }

        mutating func value(of key: String) throws(DeviceSpecError) -> String {
            var value = String.UnicodeScalarView()
            if current == "\"" {
                position += 1
                while true {
                    guard var c = current else { throw fail("a closing '\"' for the value of '\(key)'") }
                    position += 1
                    if c == "\"" { break }
                    if c == "\\" {
                        guard let escaped = current else { throw fail("a character after '\\'") }
                        c = escaped
                        position += 1
                    }
                    value.append(c)
                }
                return String(value)
            }
            while let c = current, Self.isBare(c) { value.append(c); position += 1 }
            guard !value.isEmpty else { throw fail("a value for '\(key)' (quote it if it has spaces or , ( ) | =)") }
            return String(value)
        }
    }
}

/// A spec that cannot be parsed or opened. The message names the device and says what to do.
public struct DeviceSpecError: Error, Equatable, Sendable, CustomStringConvertible {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }

    /// Runs `open`; a device that cannot be opened becomes a spec error with the device's own
    /// message (which names the device and the file, socket or table that failed).
    public static func opening<T>(_ open: () throws(BlockError) -> T) throws(DeviceSpecError) -> T {
        do throws(BlockError) {
            return try open()
        } catch {
            throw DeviceSpecError(error.message)
        }
    }
}

/// The parameters given to one device, already checked against the names it declares. The
/// accessors convert values and throw errors that name the device and the parameter.
public struct DeviceParameters: Sendable {
    /// The device these belong to, for error messages.
    public let device: String
    private let values: [String: String]

    public init(device: String, values: [String: String]) { self.device = device; self.values = values }

    public func string(_ key: String) -> String? { values[key] }

    public func required(_ key: String) throws(DeviceSpecError) -> String {
        guard let value = values[key] else { throw DeviceSpecError("\(device): missing parameter '\(key)'") }
        return value
    }

    /// `true`/`false` and their usual spellings (yes/no, on/off, 1/0).
    public func bool(_ key: String, default defaultValue: Bool) throws(DeviceSpecError) -> Bool {
        guard let value = values[key] else { return defaultValue }
        switch value.lowercased() {
        case "true", "yes", "on", "1": return true
        case "false", "no", "off", "0": return false
        default: throw DeviceSpecError("\(device): \(key) '\(value)' is not a boolean (use true or false)")
        }
    }

    /// One of `choices`, as written.
    public func choice(_ key: String, _ choices: [String], default defaultValue: String) throws(DeviceSpecError) -> String {
        guard let value = values[key] else { return defaultValue }
        guard choices.contains(value) else {
            throw DeviceSpecError("\(device): \(key) '\(value)' is not one of \(choices.joined(separator: ", "))")
        }
        return value
    }

    /// A size in bytes (see `parseSize`) that is a positive multiple of `multiple`; nil if absent.
    public func size(_ key: String, multipleOf multiple: UInt64 = 512) throws(DeviceSpecError) -> UInt64? {
        guard let value = values[key] else { return nil }
        guard let bytes = Self.parseSize(value) else {
            throw DeviceSpecError("\(device): \(key) '\(value)' is not a size (use e.g. 512M, 4G)")
        }
        guard bytes > 0, bytes % multiple == 0 else {
            throw DeviceSpecError("\(device): \(key) '\(value)' must be a positive multiple of \(multiple) bytes")
        }
        return bytes
    }

    /// A byte offset (a size that may be 0) that is a multiple of `multiple`; nil if absent.
    public func offset(_ key: String, multipleOf multiple: UInt64 = 512) throws(DeviceSpecError) -> UInt64? {
        guard let value = values[key] else { return nil }
        guard let bytes = Self.parseSize(value) else {
            throw DeviceSpecError("\(device): \(key) '\(value)' is not a size (use e.g. 0, 1M, 4G)")
        }
        guard bytes % multiple == 0 else {
            throw DeviceSpecError("\(device): \(key) '\(value)' must be a multiple of \(multiple) bytes")
        }
        return bytes
    }

    /// A whole number from `range`; nil if absent.
    public func integer<T: FixedWidthInteger>(_ key: String, in range: ClosedRange<T>) throws(DeviceSpecError) -> T? {
        guard let value = values[key] else { return nil }
        guard let number = T(value), range.contains(number) else {
            throw DeviceSpecError("\(device): \(key) '\(value)' is not a whole number from \(range.lowerBound) to \(range.upperBound)")
        }
        return number
    }

    /// A probability written as nbdkit writes it: "0.1", "10%" or "1:10"; nil if absent.
    public func rate(_ key: String) throws(DeviceSpecError) -> Double? {
        guard let value = values[key] else { return nil }
        var rate: Double?
        if value.hasSuffix("%") {
            rate = Double(value.dropLast()).map { $0 / 100 }
        } else if let colon = value.firstIndex(of: ":") {
            if let a = Double(value[..<colon]), let b = Double(value[value.index(after: colon)...]), b > 0 { rate = a / b }
        } else {
            rate = Double(value)
        }
        guard let rate, rate >= 0, rate <= 1 else {
            throw DeviceSpecError("\(device): \(key) '\(value)' is not a rate from 0 to 1 (use e.g. 0.1, 10% or 1:10)")
        }
        return rate
    }

    /// A duration in nanoseconds: seconds ("2", "0.5", "2s") or "NNms", "NNus"; nil if absent.
    public func duration(_ key: String) throws(DeviceSpecError) -> UInt64? {
        guard let value = values[key] else { return nil }
        let units: [(String, Double)] = [("ms", 1e6), ("us", 1e3), ("ns", 1), ("s", 1e9)]
        var number = Substring(value), scale = 1e9
        if let unit = units.first(where: { value.hasSuffix($0.0) }) {
            number = number.dropLast(unit.0.count); scale = unit.1
        }
        guard let amount = Double(number), amount >= 0, amount * scale < 3.6e12 else {
            throw DeviceSpecError("\(device): \(key) '\(value)' is not a duration (use e.g. 2ms, 0.5 or 1s, at most an hour)")
        }
        return UInt64(amount * scale)
    }

    /// A size that must be given.
    public func requiredSize(_ key: String, multipleOf multiple: UInt64 = 512) throws(DeviceSpecError) -> UInt64 {
        _ = try required(key)
        return try size(key, multipleOf: multiple)!
    }

    /// Parses plain bytes ("65536", "512B") or a number with K, M, G or T, powers of 1024,
    /// optionally followed by "B" or "iB" ("64K", "1G", "2TiB"). Nil if malformed or too large.
    public static func parseSize(_ text: String) -> UInt64? {
        var digits = Substring(text)
        var needsMultiplier = false
        if digits.hasSuffix("iB") {
            digits = digits.dropLast(2); needsMultiplier = true
        } else if digits.hasSuffix("B") {
            digits = digits.dropLast()
        }
        var shift: UInt64 = 0
        if let last = digits.last, let power = ["K", "M", "G", "T"].firstIndex(of: last.uppercased()) {
            shift = 10 * UInt64(power + 1)
            digits = digits.dropLast()
        } else if needsMultiplier {
            return nil
        }
        guard !digits.isEmpty, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let number = UInt64(digits) else { return nil }
        let (bytes, overflow) = number.multipliedReportingOverflow(by: 1 << shift)
        return overflow ? nil : bytes
    }
}
