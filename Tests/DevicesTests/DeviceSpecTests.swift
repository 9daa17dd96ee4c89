import Core
@testable import Devices
import XCTest

final class DeviceSpecTests: XCTestCase {
    func testParsesAStackOutermostFirst() throws {
        let spec = try DeviceSpec(parsing: "stats | file(path=disk.img, readonly=true)")
        XCTAssertEqual(spec.elements, [
            DeviceSpec.Element(name: "stats"),
            DeviceSpec.Element(name: "file", parameters: [.init(key: "path", value: "disk.img"), .init(key: "readonly", value: "true")]),
        ])
    }

    func testQuotedValuesKeepSpacesAndEscapes() throws {
        let spec = try DeviceSpec(parsing: #"file( path = "a b.img" , size="x\"y" )"#)
        XCTAssertEqual(spec.elements[0].parameters, [.init(key: "path", value: "a b.img"), .init(key: "size", value: "x\"y")])
        XCTAssertEqual(try DeviceSpec(parsing: spec.description), spec, "the canonical form parses back")
        XCTAssertEqual(spec.description, #"file(path="a b.img", size="x\"y")"#)
    }

    func testSizesArePowersOf1024() {
        XCTAssertEqual(DeviceParameters.parseSize("512"), 512)
        XCTAssertEqual(DeviceParameters.parseSize("64K"), 65536)
        XCTAssertEqual(DeviceParameters.parseSize("64M"), 64 << 20)
        XCTAssertEqual(DeviceParameters.parseSize("1G"), 1 << 30)
        XCTAssertEqual(DeviceParameters.parseSize("2TiB"), 2 << 40)
        XCTAssertEqual(DeviceParameters.parseSize("4g"), 4 << 30)
        XCTAssertNil(DeviceParameters.parseSize("12Q"))
        XCTAssertNil(DeviceParameters.parseSize("G"))
        XCTAssertNil(DeviceParameters.parseSize("-1"))
        XCTAssertNil(DeviceParameters.parseSize("99999999999T"), "overflow is not a size")
    }

    func testOpensEachExample() throws {
        let memory = try DeviceRegistry.open("memory(size=1G)")
        XCTAssertTrue(memory is MemoryDevice)
        XCTAssertEqual(memory.geometry.size, 1 << 30)
        let null = try DeviceRegistry.open("null(size=64M)")
        XCTAssertEqual(null.geometry.size, 64 << 20)
        let stack = try DeviceRegistry.open("stats | memory(size=1M)")
        XCTAssertEqual(stack.name, "stats")
        XCTAssertTrue((stack as? StatsFilter)?.next is MemoryDevice)
        XCTAssertEqual(stack.geometry.size, 1 << 20)
    }

    func testErrorsPointAtTheProblem() {
        func message(_ spec: String) -> String? {
            do { _ = try DeviceRegistry.open(spec); return nil } catch { return error.message }
        }
        XCTAssertEqual(message("fiel(path=x)"), "unknown device 'fiel' (known: cas, compress, cow, crypt, delay, error, file, fua, ids, log, memory, nbd, null, offset, partition, readonly, stats, timetravel)")
        XCTAssertEqual(message("file(readonly=true)"), "file: missing parameter 'path'")
        XCTAssertEqual(message("memory(size=12Q)"), "memory: size '12Q' is not a size (use e.g. 512M, 4G)")
        XCTAssertEqual(message("stats"), "stats is a filter and needs a device below it: stats | file(path=...)")
        XCTAssertEqual(message("null(szie=1M)"), "null: unknown parameter 'szie' (parameters: size)")
        XCTAssertEqual(message("null(size=1M, size=2M)"), "null: parameter 'size' is given twice")
        XCTAssertEqual(message("memory(size=1000)"), "memory: size '1000' must be a positive multiple of 512 bytes")
        XCTAssertEqual(message("file(path=x, direct=maybe)"), "file: direct 'maybe' is not one of auto, on, off")
        XCTAssertEqual(message("memory(size=1M) | null(size=1M)"),
                       "memory is a device, not a filter: nothing can be stacked below it (in 'memory(size=1M) | null(size=1M)')")
        XCTAssertEqual(message("memory(size=1M"), "expected ',' or ')' at column 15 of 'memory(size=1M', found the end")
        XCTAssertEqual(message("memory(size=)"), "expected a value for 'size' (quote it if it has spaces or , ( ) | =) at column 13 of 'memory(size=)', found ')'")
        XCTAssertEqual(message("file(path=/nonexistent/x)"), "file(path=/nonexistent/x): cannot open: No such file or directory")
    }

    func testTheREADMEExamplesParseAndNameKnownParameters() throws {
        let examples = [
            "stats | file(path=disk.img)",
            "readonly | partition(partition=2) | file(path=disk.img)",
            "log(logfile=io.jsonl) | error(error-rate=1%, error-seed=7) | memory(size=1G)",
            "delay(delay-read=2ms, delay-write=5ms) | nbd(hostname=storage1, export=disk)",
            #"offset(offset=1M, range=1G) | file(path="/images/my disk.img", direct=off)"#,
            #"cow(base="file(path=base.img, readonly=true)") | file(path=overlay.img, size=11G)"#,
        ]
        for example in examples {
            for element in try DeviceSpec(parsing: example).elements {
                let descriptor = try XCTUnwrap(DeviceRegistry.descriptor(named: element.name), example)
                for parameter in element.parameters {
                    XCTAssertTrue(descriptor.parameters.contains { $0.name == parameter.key }, "\(example): \(parameter.key)")
                }
            }
        }
    }

    func testHelpListsEveryDeviceAndParameter() {
        for descriptor in DeviceRegistry.all {
            XCTAssertTrue(DeviceRegistry.help.contains(descriptor.usage))
            for parameter in descriptor.parameters { XCTAssertTrue(DeviceRegistry.help.contains("    \(parameter.name)")) }
        }
        XCTAssertEqual(DeviceRegistry.all.filter { $0.deviceClass == .block }.map(\.name),
                       ["cas", "compress", "cow", "crypt", "delay", "error", "file", "fua", "ids", "log", "memory", "nbd", "null", "offset", "partition", "readonly", "stats", "timetravel"])
        XCTAssertEqual(DeviceRegistry.all.filter { $0.deviceClass == .net }.map(\.name), ["filter", "generator", "null", "pcap", "stats", "switch", "tap"])
        XCTAssertEqual(DeviceRegistry.all.filter { $0.deviceClass == .usb }.map(\.name),
                       ["host", "interfaces", "keyboard", "log", "policy", "readonly-storage", "storage", "usbmon"])
    }
}
