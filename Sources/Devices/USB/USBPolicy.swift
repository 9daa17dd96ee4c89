import Core
import Glibc

/// What a USBGuard rule does to a device that it matches.
public enum USBPolicyTarget: String, Sendable, CustomStringConvertible {
    case allow, block, reject
    public var description: String { rawValue }
}

/// USBGuard's set operators, each comparing a rule's values with a device's:
/// - `all-of`: every rule value matches some device value;
/// - `one-of`: some rule value matches some device value;
/// - `none-of`: no rule value matches any device value;
/// - `equals`: as many values on both sides, and every rule value matches some device value
///   (the default, also for a single value: `with-interface 08:*:*` is a device with exactly one
///   interface, a mass-storage one);
/// - `equals-ordered`: as many values, the i-th rule value matching the i-th device value;
/// - `match-all`: every device value is matched by some rule value ("only these classes").
public enum USBSetOperator: String, Sendable, CaseIterable {
    case allOf = "all-of", oneOf = "one-of", noneOf = "none-of", equals, equalsOrdered = "equals-ordered", matchAll = "match-all"

    /// Whether the rule's `values` apply to the device's, `matches(rule value, device value)`
    /// saying when one rule value covers one device value (USBGuard's `Rule::Attribute::appliesTo`).
    func applies<R, D>(_ values: [R], to device: [D], _ matches: (R, D) -> Bool) -> Bool {
        switch self {
        case .allOf: return values.allSatisfy { r in device.contains { matches(r, $0) } }
        case .oneOf: return values.contains { r in device.contains { matches(r, $0) } }
        case .noneOf: return !values.contains { r in device.contains { matches(r, $0) } }
        case .equals: return values.count == device.count && values.allSatisfy { r in device.contains { matches(r, $0) } }
        case .equalsOrdered: return values.count == device.count && zip(values, device).allSatisfy { matches($0, $1) }
        case .matchAll: return device.allSatisfy { d in values.contains { matches($0, d) } }
        }
    }
}

/// `VID:PID` with `*` for any (`1234:*`, `*:*`), as `id` and a rule's leading device id write it.
public struct USBDeviceIDPattern: Equatable, Sendable, CustomStringConvertible {
    public var vendor: UInt16?
    public var product: UInt16?
    public init(vendor: UInt16?, product: UInt16?) { self.vendor = vendor; self.product = product }
    public func matches(vendor v: UInt16, product p: UInt16) -> Bool { (vendor ?? v) == v && (product ?? p) == p }
    public var description: String { Self.hex4(vendor) + ":" + Self.hex4(product) }
    static func hex4(_ v: UInt16?) -> String {
        guard let v else { return "*" }
        let s = String(v, radix: 16)
        return String(repeating: "0", count: 4 - s.count) + s
    }
}

/// `cc:ss:pp` with `*` for any subclass (and then any protocol) or any protocol: an interface's
/// class, subclass and protocol as `with-interface` and the `interfaces` filter write them.
public struct USBInterfaceClassPattern: Equatable, Sendable, CustomStringConvertible {
    public var interfaceClass: UInt8
    public var subclass: UInt8?
    public var interfaceProtocol: UInt8?
    public init(_ interfaceClass: UInt8, _ subclass: UInt8?, _ interfaceProtocol: UInt8?) {
        self.interfaceClass = interfaceClass; self.subclass = subclass; self.interfaceProtocol = interfaceProtocol
    }
    public func matches(_ c: UInt8, _ s: UInt8, _ p: UInt8) -> Bool {
        interfaceClass == c && (subclass ?? s) == s && (interfaceProtocol ?? p) == p
    }
    public func matches(_ i: USBInterfaceClass) -> Bool { matches(i.interfaceClass, i.subclass, i.interfaceProtocol) }
    public var description: String {
        [Optional(interfaceClass), subclass, interfaceProtocol].map { $0.map { Self.hex2($0) } ?? "*" }.joined(separator: ":")
    }
    static func hex2(_ v: UInt8) -> String { v < 16 ? "0" + String(v, radix: 16) : String(v, radix: 16) }

    /// Parses `cc:ss:pp` (hex, `*` for ss and pp; a `*` subclass needs a `*` protocol); nil and
    /// the reason when it is not one.
    public static func parse(_ text: String) -> Result<USBInterfaceClassPattern, USBPolicyError.Reason> {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
        guard parts.count == 3 else { return .failure(.init("an interface type cc:ss:pp (hex, * for ss or pp)")) }
        func hex(_ s: String, star: Bool) -> UInt8?? {
            if star && s == "*" { return .some(nil) }
            guard s.count == 2, let v = UInt8(s, radix: 16) else { return nil }
            return .some(v)
        }
        guard let c = hex(parts[0], star: false), let c = c else { return .failure(.init("a two-digit hex interface class in '\(text)'")) }
        guard let s = hex(parts[1], star: true) else { return .failure(.init("a two-digit hex subclass or * in '\(text)'")) }
        guard let p = hex(parts[2], star: true) else { return .failure(.init("a two-digit hex protocol or * in '\(text)'")) }
        if s == nil && p != nil { return .failure(.init("* as the protocol after a * subclass in '\(text)' (USBGuard refuses cc:*:pp)")) }
        return .success(USBInterfaceClassPattern(c, s, p))
    }
}

/// One interface (alternate setting) of a device: class, subclass, protocol.
public struct USBInterfaceClass: Equatable, Sendable, CustomStringConvertible {
    public var interfaceClass: UInt8, subclass: UInt8, interfaceProtocol: UInt8
    public init(_ c: UInt8, _ s: UInt8, _ p: UInt8) { interfaceClass = c; subclass = s; interfaceProtocol = p }
    public var description: String { USBInterfaceClassPattern(interfaceClass, subclass, interfaceProtocol).description }
}

/// What a rule is matched against: the attributes USBGuard reads of a device.
public struct USBDeviceAttributes: Equatable, Sendable {
    public var vendorID: UInt16
    public var productID: UInt16
    /// The product string (USBGuard's `name`, sysfs `product`), "" when the device has none.
    public var name: String
    /// The serial number string, "" when the device has none.
    public var serial: String
    /// Where the device is plugged, e.g. "1-2" (a host port) or a SoftDev port's name.
    public var viaPort: String
    /// Linux's `port/connect_type`: "hotplug", "hardwired", "not used", "unknown", or "".
    public var connectType: String
    /// Every interface descriptor of every configuration, alternate settings included, in order
    /// (what USBGuard collects while parsing the descriptors).
    public var interfaces: [USBInterfaceClass]
    /// base64(SHA-256) as USBGuard computes it (see ``hash(name:vendorID:productID:serial:descriptors:)``).
    public var hash: String
    /// The hash of the hub the device hangs from; nil when unknown (a rule's `parent-hash` then fails).
    public var parentHash: String?

    public init(vendorID: UInt16, productID: UInt16, name: String = "", serial: String = "", viaPort: String = "",
                connectType: String = "", interfaces: [USBInterfaceClass] = [], hash: String = "", parentHash: String? = nil) {
        self.vendorID = vendorID; self.productID = productID; self.name = name; self.serial = serial; self.viaPort = viaPort
        self.connectType = connectType; self.interfaces = interfaces; self.hash = hash; self.parentHash = parentHash
    }

    /// A device's attributes from its descriptors.
    public init(descriptors d: USBDescriptors, viaPort: String, connectType: String = "", parentHash: String? = nil) {
        let name = d.string(at: 15) ?? "", serial = d.string(at: 16) ?? ""
        var interfaces: [USBInterfaceClass] = []
        for blob in d.configurations {
            for item in USBDescriptors.walk(blob) where item.type == 4 && item.bytes.count >= 9 {
                let b = item.bytes.startIndex
                interfaces.append(USBInterfaceClass(item.bytes[b + 5], item.bytes[b + 6], item.bytes[b + 7]))
            }
        }
        self.init(vendorID: d.vendorID, productID: d.productID, name: name, serial: serial, viaPort: viaPort, connectType: connectType,
                  interfaces: interfaces,
                  hash: Self.hash(name: name, vendorID: d.vendorID, productID: d.productID, serial: serial,
                                  descriptors: d.device + d.configurations.joined()),
                  parentHash: parentHash)
    }

    /// USBGuard's device hash (`DevicePrivate::initializeHash` and `updateHash`): one SHA-256 over
    /// the name, the vendor id and the product id as sysfs prints them (four lower-case hex digits,
    /// `idVendor`/`idProduct`), the serial, each without a terminator, then the raw descriptors as
    /// sysfs `descriptors` gives them (the 18-byte device descriptor, then each configuration's
    /// whole blob in index order), base64 with padding.
    ///
    /// How faithful: for a device whose strings and descriptors SoftDev reads as the Linux kernel
    /// does (a passed-through host device), the value is USBGuard's, so a `hash` from
    /// `usbguard generate-policy` on the host matches. Two differences remain: the kernel keeps
    /// sysfs strings as it read them, including characters Swift's UTF-16 decoding would replace,
    /// and a soft device's strings are whatever it declares; the configurations are the ones the
    /// device below the filter gives (a filter that rewrites descriptors changes the hash above it).
    public static func hash(name: String, vendorID: UInt16, productID: UInt16, serial: String, descriptors: [UInt8]) -> String {
        var input: [UInt8] = []
        for field in [name, USBDeviceIDPattern.hex4(vendorID), USBDeviceIDPattern.hex4(productID), serial] { input += Array(field.utf8) }
        input += descriptors
        return base64(SHA256.hash(input))
    }

    static func base64(_ bytes: [UInt8]) -> String {
        let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
        var out: [UInt8] = []
        var i = 0
        while i < bytes.count {
            let n = min(3, bytes.count - i)
            let v = (UInt32(bytes[i]) << 16) | (n > 1 ? UInt32(bytes[i + 1]) << 8 : 0) | (n > 2 ? UInt32(bytes[i + 2]) : 0)
            out.append(alphabet[Int(v >> 18 & 63)]); out.append(alphabet[Int(v >> 12 & 63)])
            out.append(n > 1 ? alphabet[Int(v >> 6 & 63)] : UInt8(ascii: "="))
            out.append(n > 2 ? alphabet[Int(v & 63)] : UInt8(ascii: "="))
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// SHA-256 (FIPS 180-4), for the device hash alone. A few lines here rather than a crypto
/// library in the build; swap for libcrypto's `SHA256()` once the project links OpenSSL.
enum SHA256 {
    private static let k: [UInt32] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
    ]

    static func hash(_ message: [UInt8]) -> [UInt8] {
        var h: [UInt32] = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]
        var data = message
        data.append(0x80)
        while data.count % 64 != 56 { data.append(0) }
        let bits = UInt64(message.count) &* 8
        for shift in stride(from: 56, through: 0, by: -8) { data.append(UInt8(truncatingIfNeeded: bits >> UInt64(shift))) }
        var w = [UInt32](repeating: 0, count: 64)
        for block in stride(from: 0, to: data.count, by: 64) {
            for t in 0..<16 {
                let i = block + t * 4
                w[t] = UInt32(data[i]) << 24 | UInt32(data[i + 1]) << 16 | UInt32(data[i + 2]) << 8 | UInt32(data[i + 3])
            }
            for t in 16..<64 {
                let s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3)
                let s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10)
                w[t] = w[t - 16] &+ s0 &+ w[t - 7] &+ s1
            }
            var (a, b, c, d, e, f, g, hh) = (h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7])
            for t in 0..<64 {
                let t1 = hh &+ (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) &+ ((e & f) ^ (~e & g)) &+ k[t] &+ w[t]
                let t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) &+ ((a & b) ^ (a & c) ^ (b & c))
                (hh, g, f, e, d, c, b, a) = (g, f, e, d &+ t1, c, b, a, t1 &+ t2)
            }
            for (i, v) in [a, b, c, d, e, f, g, hh].enumerated() { h[i] = h[i] &+ v }
        }
        return h.flatMap { v in (0..<4).map { UInt8(truncatingIfNeeded: v >> UInt32(24 - 8 * $0)) } }
    }

    private static func rotr(_ x: UInt32, _ n: UInt32) -> UInt32 { (x >> n) | (x << (32 - n)) }
}

/// A rule condition (`if ...`): the ones SoftDev evaluates.
public struct USBRuleCondition: Equatable, Sendable {
    public enum Kind: Equatable, Sendable {
        case always(Bool)
        /// Seconds since midnight, local time, both ends included.
        case localtime(begin: Int, end: Int)
    }
    public var kind: Kind
    public var negated: Bool

    func holds(secondsOfDay: Int) -> Bool {
        let value: Bool
        switch kind {
        case .always(let v): value = v
        case .localtime(let begin, let end): value = secondsOfDay >= begin && secondsOfDay <= end
        }
        return value != negated
    }
}

/// One attribute of a rule: its operator and values.
public struct USBRuleAttribute<Value: Equatable & Sendable>: Equatable, Sendable {
    public var op: USBSetOperator
    public var values: [Value]
}

/// One rule of a policy, as parsed, with where it was written.
public struct USBRule: Equatable, Sendable, CustomStringConvertible {
    public var target: USBPolicyTarget
    public var id: USBRuleAttribute<USBDeviceIDPattern>?
    public var name: USBRuleAttribute<String>?
    public var serial: USBRuleAttribute<String>?
    public var hash: USBRuleAttribute<String>?
    public var parentHash: USBRuleAttribute<String>?
    public var viaPort: USBRuleAttribute<String>?
    public var withInterface: USBRuleAttribute<USBInterfaceClassPattern>?
    public var withConnectType: USBRuleAttribute<String>?
    /// Not matched (USBGuard keeps it for people and tools).
    public var label: USBRuleAttribute<String>?
    public var conditions: USBRuleAttribute<USBRuleCondition>?
    /// The rules file and the line of the rule, and the rule as written.
    public var file: String
    public var line: Int
    public var text: String

    public init(target: USBPolicyTarget, file: String = "", line: Int = 0, text: String = "") {
        self.target = target; self.file = file; self.line = line; self.text = text
    }

    public var description: String { "\(file):\(line): \(text)" }

    /// Whether the rule applies to `device` at `secondsOfDay` (local time): every attribute it
    /// has applies (an absent one applies to anything), then its conditions hold.
    public func matches(_ device: USBDeviceAttributes, secondsOfDay: Int) -> Bool {
        func strings(_ a: USBRuleAttribute<String>?, _ values: [String]) -> Bool {
            a.map { $0.op.applies($0.values, to: values, ==) } ?? true
        }
        guard id.map({ $0.op.applies($0.values, to: [(device.vendorID, device.productID)]) { $0.matches(vendor: $1.0, product: $1.1) } }) ?? true,
              strings(name, [device.name]), strings(serial, [device.serial]), strings(hash, [device.hash]),
              strings(parentHash, device.parentHash.map { [$0] } ?? []), strings(viaPort, [device.viaPort]),
              strings(withConnectType, [device.connectType]),
              withInterface.map({ $0.op.applies($0.values, to: device.interfaces) { $0.matches($1) } }) ?? true
        else { return false }
        guard let conditions else { return true }
        let results = conditions.values.map { $0.holds(secondsOfDay: secondsOfDay) }
        switch conditions.op {
        case .oneOf: return results.contains(true)
        case .noneOf: return !results.contains(true)
        default: return !results.contains(false)   // all-of, equals, equals-ordered (match-all is refused by the parser)
        }
    }
}

/// A rules file that cannot be read or parsed: where, and what was expected.
public struct USBPolicyError: Error, Equatable, Sendable, CustomStringConvertible {
    public struct Reason: Error, Equatable, Sendable {
        public var message: String
        public init(_ message: String) { self.message = message }
    }
    public var file: String
    public var line: Int
    public var column: Int
    public var message: String
    public init(file: String, line: Int, column: Int, message: String) {
        self.file = file; self.line = line; self.column = column; self.message = message
    }
    public var description: String { line > 0 ? "\(file):\(line):\(column): \(message)" : "\(file): \(message)" }
}

/// A device policy in USBGuard's rule language (`usbguard-rules.conf(5)`): rules in order, the
/// first that matches a device decides, and a device no rule matches is blocked (USBGuard's
/// implicit target). The daemon checks a host device with ``admit(_:)``
/// before a guest gets it; the `policy(rules=FILE)` filter does the same when a stack opens.
///
/// SoftDev evaluates the conditions `true`, `false` and `localtime(...)`; a rule with another
/// condition (`allowed-matches`, `rule-applied`, `rule-evaluated`, `random`) is refused when the
/// file is read, rather than evaluated differently from USBGuard.
public struct USBPolicy: Sendable {
    public var rules: [USBRule]
    public var file: String

    /// Parses `text`; `file` names it in errors and in each rule.
    public init(parsing text: String, file: String = "<rules>") throws(USBPolicyError) {
        self.file = file
        rules = try USBRuleParser.parse(text, file: file)
    }

    /// Reads and parses the rules file at `path`.
    public init(contentsOf path: String) throws(USBPolicyError) {
        guard let f = fopen(path, "r") else {
            throw USBPolicyError(file: path, line: 0, column: 0, message: "cannot read the rules file: \(String(cString: strerror(errno)))")
        }
        defer { fclose(f) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&chunk, 1, chunk.count, f)
            if n > 0 { bytes += chunk[0..<n] }
            if n < chunk.count { break }
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw USBPolicyError(file: path, line: 0, column: 0, message: "the rules file is not UTF-8 text")
        }
        try self.init(parsing: text, file: path)
    }

    /// The first rule that matches `device` and its target; no rule: `block` (the implicit target).
    public func evaluate(_ device: USBDeviceAttributes, secondsOfDay: Int = USBPolicy.localSecondsOfDay()) -> (target: USBPolicyTarget, rule: USBRule?) {
        for rule in rules where rule.matches(device, secondsOfDay: secondsOfDay) { return (rule.target, rule) }
        return (.block, nil)
    }

    /// Judges the host device at the bottom of `stack` (whatever filters stand above it) by what
    /// it is, USBGuard's view (its descriptors and strings, the host port "B-P"), before anything
    /// claims it: a device the policy does not allow is refused and the stack closed, so dom0's
    /// drivers keep it. A stack of soft devices passes.
    public func admit(_ stack: any USBDevice) throws(DeviceSpecError) {
        var device = stack
        while let filter = device as? USBFilter { device = filter.next }
        guard let host = device as? any USBPassthroughDevice else { return }
        let (target, rule) = evaluate(host.attributes)
        guard target != .allow else { return }
        stack.close()
        throw DeviceSpecError("the host device \(Self.name(host.attributes)) at \(host.busPort) is \(refusal(target, rule))")
    }

    /// `1234:5678 "Stick"`: a device as messages name it.
    static func name(_ a: USBDeviceAttributes) -> String {
        "\(USBDeviceIDPattern(vendor: a.vendorID, product: a.productID))" + (a.name.isEmpty ? "" : " \"\(a.name)\"")
    }

    /// Why a device is refused and what to do: "blocked by rule FILE:LINE (TEXT); ...".
    func refusal(_ target: USBPolicyTarget, _ rule: USBRule?) -> String {
        let why = rule.map { "rule \($0.file):\($0.line) (\($0.text))" } ?? "the implicit default (no rule of \(file) matches it)"
        return "\(target == .reject ? "rejected" : "blocked") by \(why); if a guest may have it, add an allow rule for it to \(file)"
            + (rule == nil ? "" : " above that one")
    }

    /// Checks `device` (its descriptors as the guest would see them) plugged at `viaPort`.
    public func check(device: any USBDevice, viaPort: String, connectType: String = "") -> (target: USBPolicyTarget, rule: USBRule?) {
        evaluate(USBDeviceAttributes(descriptors: device.descriptors, viaPort: viaPort, connectType: connectType))
    }

    /// Seconds since local midnight. (USBGuard's own `localtime` takes the time of day from
    /// `time() % 86400`, which is UTC; SoftDev follows the man page: local time.)
    public static func localSecondsOfDay() -> Int {
        var now = time(nil)
        var parts = tm()
        localtime_r(&now, &parts)
        return Int(parts.tm_hour) * 3600 + Int(parts.tm_min) * 60 + Int(parts.tm_sec)
    }
}
