import Core

/// `policy(rules=FILE, via-port=PORT)`: checks the device below against a USBGuard rules file
/// when the stack opens and refuses to open (naming the rule, or the implicit default) when the
/// device is blocked or rejected; an allowed device passes unchanged. Over a host device, the
/// check is made on what the device is before anything claims it (``USBDevice/claim()`` comes
/// after the whole stack opened), so a refused device stays with dom0's drivers. The daemon
/// checks a host device with ``USBPolicy/admit(_:)`` when it is offered to a guest; this filter
/// makes the same check in a spec.
public final class USBPolicyFilter: USBFilter, @unchecked Sendable {
    public override var name: String { "policy" }
    public let policy: USBPolicy
    /// The rule that allowed the device.
    public let rule: USBRule

    public init(next: any USBDevice, policy: USBPolicy, viaPort: String = "") throws(DeviceSpecError) {
        let attributes = USBDeviceAttributes(descriptors: next.descriptors, viaPort: viaPort)
        let (target, rule) = policy.evaluate(attributes)
        guard target == .allow, let rule else {
            throw DeviceSpecError("policy(rules=\(policy.file)): the device \(USBPolicy.name(attributes)) is \(policy.refusal(target, rule))")
        }
        self.policy = policy
        self.rule = rule
        super.init(next: next)
    }
}

extension USBPolicyFilter {
    public static let descriptor = DeviceDescriptor(
        deviceClass: .usb, name: "policy", kind: .filter,
        summary: "Opens only a device that a USBGuard rules file allows (first matching rule; none: blocked).",
        parameters: [
            DeviceParameter("rules", required: true, "The rules file, in USBGuard's language (usbguard-rules.conf(5))."),
            DeviceParameter("via-port", "The port the rules' via-port sees, e.g. 1-2 (default empty)."),
        ],
        open: { parameters, next throws(DeviceSpecError) in
            let path = try parameters.required("rules")
            let policy: USBPolicy
            do throws(USBPolicyError) { policy = try USBPolicy(contentsOf: path) } catch { throw DeviceSpecError("policy: \(error)") }
            return try USBPolicyFilter(next: next as! any USBDevice, policy: policy, viaPort: parameters.string("via-port") ?? "")
        })
}
