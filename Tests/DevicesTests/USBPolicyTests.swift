import Core
import Devices
import Foundation
import XCTest

/// USBGuard's rule language: the man page's examples, the set operators on `with-interface`,
/// quoting, conditions, the device hash, errors with line and column, and the `policy` filter.
final class USBPolicyTests: XCTestCase {
    /// A mass-storage stick 1234:5678 "Stick", serial 0001.
    static let stick = USBDescriptors(
        device: [18, 1, 0, 2, 0, 0, 0, 64, 0x34, 0x12, 0x78, 0x56, 0, 1, 1, 2, 3, 1],
        configurations: [[9, 2, 32, 0, 1, 1, 0, 0x80, 50, 9, 4, 0, 0, 2, 8, 6, 0x50, 0, 7, 5, 0x81, 2, 0, 2, 0, 7, 5, 0x02, 2, 0, 2, 0]],
        strings: [1: "SoftDev", 2: "Stick", 3: "0001"])

    /// A device with the given interfaces.
    func device(_ interfaces: [(UInt8, UInt8, UInt8)], port: String = "1-2") -> USBDeviceAttributes {
        USBDeviceAttributes(vendorID: 0x1234, productID: 0x5678, name: "Stick", serial: "0001", viaPort: port,
                            interfaces: interfaces.map { USBInterfaceClass($0.0, $0.1, $0.2) }, hash: "h")
    }

    func target(_ rules: String, _ device: USBDeviceAttributes, secondsOfDay: Int = 12 * 3600) throws -> USBPolicyTarget {
        try USBPolicy(parsing: rules).evaluate(device, secondsOfDay: secondsOfDay).target
    }

    func error(_ rules: String) -> USBPolicyError? {
        do { _ = try USBPolicy(parsing: rules, file: "rules.conf"); return nil } catch { return error }
    }

    func testHashIsUSBGuardsInput() throws {
        // Checked against Python's hashlib: SHA-256 of "Stick" "1234" "5678" "0001" and the raw descriptors.
        let a = USBDeviceAttributes(descriptors: Self.stick, viaPort: "1-2")
        XCTAssertEqual(a.hash, "+TGO82IbMwFIgo4DjXFQaM0H3FTt4DhVoJFMxGD5Xb8=")
        XCTAssertEqual(USBDeviceAttributes.hash(name: "", vendorID: 0, productID: 0, serial: "", descriptors: Array(repeating: 0x61, count: 992)),
                       "jXFtcOKPZIEgWQg+2bTCGbSjt5UW2X8sWfB7lY1i++c=", "1000 bytes, more than one block (Python's hashlib)")
        XCTAssertEqual(a.name, "Stick"); XCTAssertEqual(a.serial, "0001")
        XCTAssertEqual(a.interfaces, [USBInterfaceClass(8, 6, 0x50)])
        XCTAssertEqual(try target("allow hash \"+TGO82IbMwFIgo4DjXFQaM0H3FTt4DhVoJFMxGD5Xb8=\"", a), .allow)
    }

    func testManPageExamples() throws {
        // 1. Only a device with just a mass-storage interface.
        let onlyStorage = "allow with-interface equals { 08:*:* }"
        XCTAssertEqual(try target(onlyStorage, device([(8, 6, 0x50)])), .allow)
        XCTAssertEqual(try target(onlyStorage, device([(8, 6, 0x50), (3, 1, 1)])), .block, "a hidden keyboard is blocked")
        // 2. A Yubikey on one port, anything else on that port rejected.
        let yubikey = """
            allow 1050:0011 name "Yubico Yubikey II" serial "0001234567" via-port "1-2" hash "044b5e168d40ee0245478416caf3d998"
            reject via-port "1-2"
            """
        var key = USBDeviceAttributes(vendorID: 0x1050, productID: 0x0011, name: "Yubico Yubikey II", serial: "0001234567", viaPort: "1-2",
                                      interfaces: [USBInterfaceClass(3, 1, 1)], hash: "044b5e168d40ee0245478416caf3d998")
        XCTAssertEqual(try target(yubikey, key), .allow)
        key.hash = "another"
        XCTAssertEqual(try target(yubikey, key), .reject)
        key.viaPort = "1-3"
        XCTAssertEqual(try target(yubikey, key), .block, "no rule: the implicit block")
        // 3. Suspicious combinations.
        let suspicious = """
            allow with-interface equals { 08:*:* }
            reject with-interface all-of { 08:*:* 03:00:* }
            reject with-interface all-of { 08:*:* 03:01:* }
            reject with-interface all-of { 08:*:* e0:*:* }
            reject with-interface all-of { 08:*:* 02:*:* }
            """
        let policy = try USBPolicy(parsing: suspicious, file: "rules.conf")
        let decision = policy.evaluate(device([(8, 6, 0x50), (3, 1, 1)]))
        XCTAssertEqual(decision.target, .reject)
        XCTAssertEqual(decision.rule?.line, 3)
        XCTAssertEqual(decision.rule?.text, "reject with-interface all-of { 08:*:* 03:01:* }")
        XCTAssertEqual(policy.evaluate(device([(8, 6, 0x50), (0xe0, 1, 1)])).rule?.line, 4)
        XCTAssertEqual(policy.evaluate(device([(8, 6, 0x50), (0xff, 0, 0)])).target, .block)
        // 4 and 5: conditions SoftDev does not evaluate are refused, not guessed.
        let e4 = try XCTUnwrap(error("allow with-interface one-of { 03:00:01 03:01:01 } if !allowed-matches(with-interface one-of { 03:00:01 03:01:01 })"))
        XCTAssertEqual(e4.line, 1); XCTAssertEqual(e4.column, 55)
        XCTAssertTrue(e4.message.contains("allowed-matches is not supported"), e4.description)
        let e5 = try XCTUnwrap(error("# roulette\nallow if random(0.1666)\nreject"))
        XCTAssertEqual(e5.description, "rules.conf:2:10: the condition random is not supported by SoftDev (it evaluates true, false and localtime(...))")
    }

    func testSetOperatorsOnInterfaces() throws {
        let composite = device([(8, 6, 0x50), (3, 1, 1)])
        let cases: [(String, Bool)] = [
            ("with-interface 08:*:*", false),                              // one value is `equals`: exactly one interface
            ("with-interface 08:06:50", false),
            ("with-interface one-of { 08:*:* }", true),
            ("with-interface one-of { e0:*:* 03:01:01 }", true),
            ("with-interface all-of { 08:*:* }", true),
            ("with-interface all-of { 08:*:* 02:*:* }", false),
            ("with-interface none-of { 03:*:* }", false),
            ("with-interface none-of { e0:*:* 02:*:* }", true),
            ("with-interface equals { 03:*:* 08:*:* }", true),              // order does not matter
            ("with-interface equals { 08:*:* 03:*:* ff:*:* }", false),      // counts differ
            // USBGuard's equals counts the values and checks each rule value against the device's:
            // two values, each matching an interface, match although the keyboard is uncovered.
            ("with-interface equals { 08:*:* 08:*:* }", true),
            ("with-interface equals-ordered { 08:*:* 03:01:* }", true),
            ("with-interface equals-ordered { 03:01:* 08:*:* }", false),
            ("with-interface match-all { 08:*:* }", false),                 // the keyboard is not covered
            ("with-interface match-all { 08:*:* 03:*:* }", true),
            ("with-interface match-all { 08:*:* 03:*:* ff:*:* e0:*:* }", true),   // a superset is fine
            ("with-interface match-all { 08:06:* 03:01:02 }", false),       // 03:01:01 is not 03:01:02
            ("with-interface match-all { 08:06:50 03:01:01 }", true),
        ]
        for (attribute, expected) in cases {
            let rule = "allow \(attribute)"
            XCTAssertEqual(try target(rule, composite) == .allow, expected, rule)
        }
        // `*` subclass: any subclass and protocol; protocol `*` alone too.
        XCTAssertEqual(try target("allow with-interface 03:*:*", device([(3, 0, 0)])), .allow)
        XCTAssertEqual(try target("allow with-interface 03:01:*", device([(3, 0, 1)])), .block)
        XCTAssertEqual(try target("allow with-interface 03:01:*", device([(3, 1, 2)])), .allow)
        // No interfaces: match-all and none-of hold, one-of and equals do not.
        XCTAssertEqual(try target("allow with-interface match-all { 03:*:* }", device([])), .allow)
        XCTAssertEqual(try target("allow with-interface one-of { 03:*:* }", device([])), .block)
    }

    /// USBGuard's `with-interface` sees the interfaces of every configuration (and alternate
    /// setting), not only the active one: a device whose second configuration is a keyboard is
    /// judged with the keyboard, so a guest's SET_CONFIGURATION cannot reach an interface the
    /// policy did not see.
    func testWithInterfaceSeesEveryConfiguration() throws {
        var d = Self.stick
        d.device[17] = 2
        d.configurations.append([9, 2, 25, 0, 1, 2, 0, 0x80, 50, 9, 4, 0, 0, 1, 3, 1, 1, 0, 7, 5, 0x81, 3, 8, 0, 10])
        let attributes = USBDeviceAttributes(descriptors: d, viaPort: "1-2")
        XCTAssertEqual(attributes.interfaces, [USBInterfaceClass(8, 6, 0x50), USBInterfaceClass(3, 1, 1)])
        XCTAssertEqual(try target("allow with-interface 08:*:*", attributes), .block)
        XCTAssertEqual(try target("allow with-interface match-all { 08:*:* }", attributes), .block)
        XCTAssertEqual(try target("block with-interface one-of { 03:*:* }\nallow", attributes), .block)
        XCTAssertEqual(try target("allow with-interface match-all { 08:*:* 03:*:* }", attributes), .allow)
    }

    func testIDsStringsCommentsAndFirstMatch() throws {
        let d = device([(8, 6, 0x50)])
        XCTAssertEqual(try target("allow 1234:*", d), .allow)
        XCTAssertEqual(try target("allow *:*", d), .allow)
        XCTAssertEqual(try target("allow id 1234:5679", d), .block)
        XCTAssertEqual(try target("allow id one-of { 0000:0000 1234:5678 }", d), .allow)
        XCTAssertEqual(try target("allow id none-of { 1234:* }", d), .block)
        // Comments, blank lines, the first match wins, a label does not take part.
        let rules = """
            # a comment

               block serial "0001" label "first"   # trailing comment
            allow
            """
        let policy = try USBPolicy(parsing: rules, file: "r")
        XCTAssertEqual(policy.rules.count, 2)
        XCTAssertEqual(policy.evaluate(d).target, .block)
        XCTAssertEqual(policy.evaluate(d).rule?.line, 3)
        XCTAssertEqual(policy.rules[0].label?.values, ["first"])
        // Quoting: escapes, blanks and '#' inside strings.
        let quoted = try USBPolicy(parsing: #"allow name "say \"hi\"\x21 # not a comment\\" serial one-of { "a b" "0001" }"#)
        XCTAssertEqual(quoted.rules[0].name?.values, [#"say "hi"! # not a comment\"#])
        XCTAssertEqual(quoted.rules[0].serial?.values, ["a b", "0001"])
        var named = d; named.name = #"say "hi"! # not a comment\"#
        XCTAssertEqual(quoted.evaluate(named).target, .allow)
        // Strings are compared whole; the via-port, connect type and parent hash too.
        XCTAssertEqual(try target(#"allow name "Stic""#, d), .block)
        XCTAssertEqual(try target(#"allow via-port one-of { "1-1" "1-2" }"#, d), .allow)
        XCTAssertEqual(try target(#"allow with-connect-type "hotplug""#, d), .block)
        XCTAssertEqual(try target(#"allow with-connect-type """#, d), .allow)
        XCTAssertEqual(try target(#"allow parent-hash "x""#, d), .block, "no parent hash known: no match")
    }

    func testConditions() throws {
        let d = device([(8, 6, 0x50)])
        XCTAssertEqual(try target("allow if true", d), .allow)
        XCTAssertEqual(try target("allow if !true", d), .block)
        XCTAssertEqual(try target("allow if false\nreject", d), .reject)
        XCTAssertEqual(try target("allow if one-of { false true }", d), .allow)
        XCTAssertEqual(try target("allow if all-of { false true }", d), .block)
        XCTAssertEqual(try target("allow if none-of { false !true }", d), .allow)
        let office = "allow if localtime(08:00-17:30:00)"
        XCTAssertEqual(try target(office, d, secondsOfDay: 8 * 3600), .allow)
        XCTAssertEqual(try target(office, d, secondsOfDay: 17 * 3600 + 1800), .allow)
        XCTAssertEqual(try target(office, d, secondsOfDay: 17 * 3600 + 1801), .block)
        XCTAssertEqual(try target("allow if !localtime(08:00-17:00)", d, secondsOfDay: 3600), .allow)
        XCTAssertEqual(try target("allow if localtime(12:00)", d, secondsOfDay: 12 * 3600), .allow)
    }

    func testErrorsSayWhereAndWhat() throws {
        let cases: [(String, String)] = [
            ("permit", "rules.conf:1:1: expected a rule target: allow, block or reject, found 'permit'"),
            ("allow\n  allow id 123:5678", "rules.conf:2:12: expected a device id VID:PID (four hex digits each, or *), found '123:5678'"),
            ("allow *:5678", "rules.conf:1:7: expected *:* (a * vendor id needs a * product id), found '*:5678'"),
            ("allow colour \"red\"", "rules.conf:1:7: expected an attribute (id, name, serial, hash, parent-hash, via-port, with-interface, with-connect-type, label, if), found 'colour'"),
            ("allow name \"a\" name \"b\"", "rules.conf:1:16: the attribute 'name' is given twice (a rule has each at most once)"),
            ("allow name \"unterminated", "rules.conf:1:12: expected a closing '\"' for the string opened here"),
            ("allow name \"a\"b", "rules.conf:1:15: expected a blank after the value, found 'b'"),
            ("allow name red", "rules.conf:1:12: expected a string in double quotes, found 'red'"),
            ("allow with-interface { }", "rules.conf:1:24: expected at least one value in the set, found '}'"),
            ("allow with-interface { 08:*:*", "rules.conf:1:30: expected '}' to close the set, found the end of the line"),
            ("allow with-interface 08:*:50", "rules.conf:1:22: expected * as the protocol after a * subclass in '08:*:50' (USBGuard refuses cc:*:pp), found '08:*:50'"),
            ("allow with-interface 8:06:50", "rules.conf:1:22: expected a two-digit hex interface class in '8:06:50', found '8:06:50'"),
            ("allow with-interface some-of { 08:*:* }", "rules.conf:1:22: expected an interface type cc:ss:pp (hex, * for ss or pp), found 'some-of'"),
            ("allow if match-all { true }", "rules.conf:1:7: match-all is not an operator of conditions (all-of, one-of, none-of, equals, equals-ordered)"),
            ("allow if localtime(18:00-08:00)", "rules.conf:1:20: expected a time range whose beginning is not after its end, found '18:00-08:00)'"),
            ("allow if localtime(25:00)", "rules.conf:1:20: expected a time range HH:MM[:SS][-HH:MM[:SS]], found '25:00)'"),
            ("allow if maybe", "rules.conf:1:10: expected a condition: true, false or localtime(...), found 'maybe'"),
            ("allow name \"\\q\"", "rules.conf:1:13: expected an escape (\\\" \\\\ \\' \\n \\t \\r \\a \\b \\f \\v \\xHH), found '\\q\"'"),
            ("allow name", "rules.conf:1:11: expected a value, found the end of the line"),
        ]
        for (rules, message) in cases {
            XCTAssertEqual(error(rules)?.description, message, rules)
        }
        // A file that cannot be read says so.
        XCTAssertThrowsError(try USBPolicy(contentsOf: "/nonexistent/rules.conf")) { e in
            XCTAssertTrue("\(e)".hasPrefix("/nonexistent/rules.conf: cannot read the rules file"), "\(e)")
        }
    }

    /// A device with the stick's descriptors, for the check and the filter.
    final class Stick: USBDevice, @unchecked Sendable {
        let name = "stick"
        let speed = USBSpeed.high
        let descriptors = USBPolicyTests.stick
        var closed = false
        func submit(_ urb: URB) { urb.complete(.stall) }
        func close() { closed = true }
    }

    func testCheckAndPolicyFilter() throws {
        let dir = makeTemporaryDirectory(self)
        let allowPath = dir + "/allow.conf", blockPath = dir + "/block.conf", badPath = dir + "/bad.conf", nonePath = dir + "/none.conf"
        try "allow 1234:5678 with-interface 08:06:50 via-port \"2-1\"\n".write(toFile: allowPath, atomically: true, encoding: .utf8)
        try "allow 1234:5678 via-port \"9-9\"\nreject with-interface one-of { 08:*:* }\n".write(toFile: blockPath, atomically: true, encoding: .utf8)
        try "allow\nallow id 12345:1\n".write(toFile: badPath, atomically: true, encoding: .utf8)
        try "# nothing allowed\n".write(toFile: nonePath, atomically: true, encoding: .utf8)
        let stick = Stick()
        let policy = try USBPolicy(contentsOf: allowPath)
        XCTAssertEqual(policy.check(device: stick, viaPort: "2-1").target, .allow)
        XCTAssertEqual(policy.check(device: stick, viaPort: "2-2").target, .block)
        XCTAssertNil(policy.check(device: stick, viaPort: "2-2").rule)

        let descriptor = try XCTUnwrap(DeviceRegistry.descriptor(named: "policy", of: .usb))
        XCTAssertEqual(descriptor.deviceClass, .usb)
        func open(_ values: [String: String]) throws -> any SoftDevice {
            try descriptor.open(DeviceParameters(device: "policy", values: values), stick)
        }
        let allowed = try XCTUnwrap(try open(["rules": allowPath, "via-port": "2-1"]) as? USBPolicyFilter)
        XCTAssertEqual(allowed.rule.line, 1)
        XCTAssertEqual(allowed.descriptors, stick.descriptors)
        XCTAssertThrowsError(try open(["rules": allowPath])) { e in
            XCTAssertEqual("\(e)", "policy(rules=\(allowPath)): the device 1234:5678 \"Stick\" is blocked by the implicit default (no rule of \(allowPath) matches it); "
                           + "if a guest may have it, add an allow rule for it to \(allowPath)")
        }
        XCTAssertThrowsError(try open(["rules": blockPath])) { e in
            XCTAssertEqual("\(e)", "policy(rules=\(blockPath)): the device 1234:5678 \"Stick\" is rejected by rule \(blockPath):2 (reject with-interface one-of { 08:*:* }); "
                           + "if a guest may have it, add an allow rule for it to \(blockPath) above that one")
        }
        XCTAssertThrowsError(try open(["rules": badPath])) { e in
            XCTAssertEqual("\(e)", "policy: \(badPath):2:10: expected a device id VID:PID (four hex digits each, or *), found '12345:1'")
        }
        XCTAssertThrowsError(try open(["rules": nonePath]))
        // The USB filters in the registry, each documented in `softdev devices`.
        XCTAssertEqual(DeviceRegistry.all.filter { $0.deviceClass == .usb && $0.kind == .filter }.map(\.name),
                       ["interfaces", "log", "policy", "readonly-storage", "usbmon"])
        XCTAssertTrue(DeviceRegistry.help(of: .usb).contains("usbmon(file=..., snaplen=..., bus=..., device=...)"))
        XCTAssertFalse(stick.closed, "the stack's opener closes the device below, not the filter")
    }
}
