import CXen
@testable import Core
import XCTest

/// What of the Xen implementation can be checked without Xen: how Xen's grant statuses map to
/// errors, and a clean refusal where Xen is absent. Against a real Xen it runs in the lab
/// (xen-lab-probe and tests/softdev.sh).
final class XenHypervisorTests: XCTestCase {
    func testGrantStatusesMapToGrantErrors() {
        let d: DomainID = 7, r: GrantRef = 42
        XCTAssertNil(XenGrantTable.error(status: Int16(CXEN_GNTST_okay), domain: d, ref: r))
        XCTAssertEqual(XenGrantTable.error(status: Int16(CXEN_GNTST_bad_domain), domain: d, ref: r), .noSuchDomain(d))
        XCTAssertEqual(XenGrantTable.error(status: Int16(CXEN_GNTST_bad_gntref), domain: d, ref: r), .badReference(domain: d, ref: r))
        // Xen's answer for an entry that grants nothing to us ("Bad flags or dom").
        XCTAssertEqual(XenGrantTable.error(status: Int16(CXEN_GNTST_general_error), domain: d, ref: r), .badReference(domain: d, ref: r))
        XCTAssertEqual(XenGrantTable.error(status: Int16(CXEN_GNTST_bad_copy_arg), domain: d, ref: r), .badReference(domain: d, ref: r))
        XCTAssertEqual(XenGrantTable.error(status: Int16(CXEN_GNTST_permission_denied), domain: d, ref: r), .permissionDenied(domain: d, ref: r))
        XCTAssertEqual(XenGrantTable.error(status: Int16(CXEN_GNTST_bad_page), domain: d, ref: r), .badFrame(domain: d, ref: r))
        XCTAssertEqual(XenGrantTable.error(status: -12, domain: d, ref: r), .system(operation: "grant operation (GNTST -12)", errno: EIO))
    }

    func testOpenWithoutXenFailsCleanly() throws {
        try XCTSkipIf(access(XenHypervisor.grantDevice, F_OK) == 0, "this host has Xen's grant device")
        XCTAssertFalse(XenHypervisor.isPresent)
        XCTAssertThrowsError(try XenHypervisor.open()) { error in
            guard case XenHypervisorError.unavailable(let path, let e) = error else { return XCTFail("\(error)") }
            XCTAssertEqual(path, XenHypervisor.grantDevice)
            XCTAssertEqual(e, ENOENT)
        }
    }
}
