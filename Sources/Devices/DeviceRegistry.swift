import Core

/// One parameter a device accepts, with the help text shown by `softdev devices`.
public struct DeviceParameter: Sendable {
    public var name: String
    public var help: String
    public var isRequired: Bool
    public init(_ name: String, required: Bool = false, _ help: String) {
        self.name = name; self.isRequired = required; self.help = help
    }
}

/// What the registry knows about one device or filter: its name, its parameters with their
/// help, and how to open it. Each device file declares its own (nbdkit's registration table).
public struct DeviceDescriptor: Sendable {
    public enum Kind: Sendable { case device, filter }
    public var name: String
    public var kind: Kind
    public var summary: String
    public var parameters: [DeviceParameter]
    /// Opens the device; `next` is the device below for a filter and nil for a device.
    public var open: @Sendable (_ parameters: DeviceParameters, _ next: (any BlockDevice)?) throws(DeviceSpecError) -> any BlockDevice

    public init(name: String, kind: Kind, summary: String, parameters: [DeviceParameter],
                open: @escaping @Sendable (DeviceParameters, (any BlockDevice)?) throws(DeviceSpecError) -> any BlockDevice) {
        self.name = name; self.kind = kind; self.summary = summary; self.parameters = parameters; self.open = open
    }

    /// Checks the names of `element`'s parameters against this descriptor.
    func parameters(of element: DeviceSpec.Element) throws(DeviceSpecError) -> DeviceParameters {
        var values: [String: String] = [:]
        for parameter in element.parameters {
            guard parameters.contains(where: { $0.name == parameter.key }) else {
                let known = parameters.isEmpty ? "it takes none" : "parameters: " + parameters.map(\.name).joined(separator: ", ")
                throw DeviceSpecError("\(name): unknown parameter '\(parameter.key)' (\(known))")
            }
            guard values.updateValue(parameter.value, forKey: parameter.key) == nil else {
                throw DeviceSpecError("\(name): parameter '\(parameter.key)' is given twice")
            }
        }
        return DeviceParameters(device: name, values: values)
    }

    /// The usage line, e.g. `file(path=..., readonly=...)`.
    public var usage: String {
        parameters.isEmpty ? name : "\(name)(" + parameters.map { "\($0.name)=..." }.joined(separator: ", ") + ")"
    }
}

/// Every device and filter SoftDev has, and the way a spec becomes a device stack.
///
/// ```swift
/// let disk = try DeviceRegistry.open("stats | file(path=disk.img, direct=auto)")
/// ```
public enum DeviceRegistry {
    /// All devices and filters, by name.
    public static let all: [DeviceDescriptor] = [
        FileDevice.descriptor, MemoryDevice.descriptor, NullDevice.descriptor, StatsFilter.descriptor,
        ReadOnlyFilter.descriptor, OffsetFilter.descriptor, PartitionFilter.descriptor, ErrorFilter.descriptor,
        LogFilter.descriptor, DelayFilter.descriptor, NBDDevice.descriptor,
    ].sorted { $0.name < $1.name }

    public static func descriptor(named name: String) -> DeviceDescriptor? {
        all.first { $0.name == name }
    }

    /// Parses `spec` and opens its stack, innermost device first.
    public static func open(_ spec: String) throws(DeviceSpecError) -> any BlockDevice {
        try open(DeviceSpec(parsing: spec))
    }

    /// Opens `spec`'s stack; `readOnly` (a disk attached read-only) puts `readonly` on top of a
    /// stack that can write.
    public static func open(_ spec: String, readOnly: Bool) throws(DeviceSpecError) -> any BlockDevice {
        let device = try open(spec)
        return readOnly && device.capabilities.contains(.write) ? ReadOnlyFilter(next: device) : device
    }

    /// Checks `spec` without opening anything: its syntax, its device names, the order of
    /// devices and filters, and the parameter names (what a config file or `softdev attach` can
    /// check before the stack is opened elsewhere).
    public static func check(_ spec: String) throws(DeviceSpecError) {
        let parsed = try DeviceSpec(parsing: spec)
        for (element, descriptor) in zip(parsed.elements, try descriptors(for: parsed)) {
            _ = try descriptor.parameters(of: element)
        }
    }

    /// The descriptor of each element, checked: every name is known, filters stand above a
    /// device and the last element is a device.
    static func descriptors(for spec: DeviceSpec) throws(DeviceSpecError) -> [DeviceDescriptor] {
        // Check every name first, so that a typo is reported before anything is opened.
        var descriptors: [DeviceDescriptor] = []
        for element in spec.elements {
            guard let descriptor = descriptor(named: element.name) else {
                let known = all.map(\.name).joined(separator: ", ")
                throw DeviceSpecError("unknown device '\(element.name)' (known: \(known))")
            }
            descriptors.append(descriptor)
        }
        for (index, descriptor) in descriptors.enumerated() {
            let isLast = index == descriptors.count - 1
            if descriptor.kind == .filter && isLast {
                throw DeviceSpecError("\(descriptor.name) is a filter and needs a device below it: \(descriptor.name) | file(path=...)")
            }
            if descriptor.kind == .device && !isLast {
                throw DeviceSpecError("\(descriptor.name) is a device, not a filter: nothing can be stacked below it (in '\(spec)')")
            }
        }
        return descriptors
    }

    /// Opens the stack `spec` describes. If any element fails, what was opened is closed again.
    public static func open(_ spec: DeviceSpec) throws(DeviceSpecError) -> any BlockDevice {
        let descriptors = try descriptors(for: spec)
        var device: (any BlockDevice)?
        for (element, descriptor) in zip(spec.elements, descriptors).reversed() {
            do {
                device = try descriptor.open(descriptor.parameters(of: element), device)
            } catch {
                device?.close()
                throw error
            }
        }
        return device!
    }

    /// A text table of every device, its parameters and their help (for `softdev devices`).
    public static var help: String {
        var text = ""
        for descriptor in all {
            text += "\(descriptor.usage)\n    \(descriptor.summary)\n"
            for parameter in descriptor.parameters {
                text += "    \(parameter.name)\(parameter.isRequired ? " (required)" : ""): \(parameter.help)\n"
            }
            text += "\n"
        }
        return text
    }
}
