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

/// What the registry knows about one device or filter: its class, its name, its parameters
/// with their help, and how to open it. Each device file declares its own (nbdkit's
/// registration table).
public struct DeviceDescriptor: Sendable {
    public enum Kind: Sendable { case device, filter }
    public var deviceClass: SoftDeviceClass
    public var name: String
    public var kind: Kind
    public var summary: String
    public var parameters: [DeviceParameter]
    /// Opens the device; `next` is the device below for a filter (of the same class) and nil
    /// for a device.
    public var open: @Sendable (_ parameters: DeviceParameters, _ next: (any SoftDevice)?) throws(DeviceSpecError) -> any SoftDevice

    /// A block device or filter: `open` gets the block device below.
    public init(name: String, kind: Kind, summary: String, parameters: [DeviceParameter],
                open: @escaping @Sendable (DeviceParameters, (any BlockDevice)?) throws(DeviceSpecError) -> any BlockDevice) {
        self.init(deviceClass: .block, name: name, kind: kind, summary: summary, parameters: parameters) {
            (parameters, next) throws(DeviceSpecError) in
            // The registry stacks elements of one class only, so the device below is a block device.
            try open(parameters, next.map { $0 as! any BlockDevice })
        }
    }

    /// A device or filter of any class.
    public init(deviceClass: SoftDeviceClass, name: String, kind: Kind, summary: String, parameters: [DeviceParameter],
                open: @escaping @Sendable (DeviceParameters, (any SoftDevice)?) throws(DeviceSpecError) -> any SoftDevice) {
        self.deviceClass = deviceClass; self.name = name; self.kind = kind; self.summary = summary
        self.parameters = parameters; self.open = open
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
    public static let all: [DeviceDescriptor] = ([
        FileDevice.descriptor, MemoryDevice.descriptor, NullDevice.descriptor, StatsFilter.descriptor,
        ReadOnlyFilter.descriptor, OffsetFilter.descriptor, PartitionFilter.descriptor, ErrorFilter.descriptor,
        LogFilter.descriptor, DelayFilter.descriptor, NBDDevice.descriptor, FUAFilter.descriptor, CryptFilter.descriptor,
        COWFilter.descriptor, CompressFilter.descriptor, CASDevice.descriptor, TimeTravelFilter.descriptor, IDSFilter.descriptor,
    ] + networkDevices + usbDevices + usbFilters).sorted { $0.name < $1.name }
    /// The network class's devices and filters (`Devices/Net`).
    static let networkDevices: [DeviceDescriptor] = [
        TapDevice.descriptor, SwitchPort.descriptor, CaptureFilter.descriptor, NetStatsFilter.descriptor,
        PacketFilter.descriptor, NetNullDevice.descriptor, FrameGenerator.descriptor,
    ]
    /// The USB class's soft devices (`Devices/USB`).
    static let usbDevices: [DeviceDescriptor] = [USBStorageDevice.descriptor, USBKeyboard.descriptor, USBHostDevice.descriptor]
    /// The USB class's filters (`Devices/USB`): policy and URB-level mediation.
    static let usbFilters: [DeviceDescriptor] = [
        USBPolicyFilter.descriptor, USBReadOnlyStorageFilter.descriptor, USBInterfacesFilter.descriptor,
        USBLogFilter.descriptor, USBMonFilter.descriptor,
    ]

    public static func descriptor(named name: String) -> DeviceDescriptor? {
        all.first { $0.name == name }
    }

    /// The device or filter `name` of `deviceClass` (a name such as `stats` exists in several
    /// classes), or else of any class (so that the error can say which class it is).
    public static func descriptor(named name: String, of deviceClass: SoftDeviceClass) -> DeviceDescriptor? {
        all.first { $0.name == name && $0.deviceClass == deviceClass } ?? descriptor(named: name)
    }

    /// Parses `spec` and opens its block device stack, innermost device first.
    public static func open(_ spec: String) throws(DeviceSpecError) -> any BlockDevice {
        try open(DeviceSpec(parsing: spec))
    }

    /// Parses `spec` and opens its stack, which must be of class `deviceClass`.
    public static func open(_ spec: String, of deviceClass: SoftDeviceClass) throws(DeviceSpecError) -> any SoftDevice {
        try openStack(DeviceSpec(parsing: spec), of: deviceClass)
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
    public static func check(_ spec: String, of deviceClass: SoftDeviceClass = .block) throws(DeviceSpecError) {
        let parsed = try DeviceSpec(parsing: spec)
        for (element, descriptor) in zip(parsed.elements, try descriptors(for: parsed, of: deviceClass)) {
            _ = try descriptor.parameters(of: element)
        }
    }

    /// The descriptor of each element, checked: every name is known and of `deviceClass`,
    /// filters stand above a device and the last element is a device.
    static func descriptors(for spec: DeviceSpec, of deviceClass: SoftDeviceClass) throws(DeviceSpecError) -> [DeviceDescriptor] {
        // Check every name first, so that a typo is reported before anything is opened.
        var descriptors: [DeviceDescriptor] = []
        for element in spec.elements {
            guard let descriptor = descriptor(named: element.name, of: deviceClass) else {
                let known = all.filter { $0.deviceClass == deviceClass }.map(\.name).joined(separator: ", ")
                throw DeviceSpecError("unknown device '\(element.name)' (known: \(known))")
            }
            guard descriptor.deviceClass == deviceClass else {
                throw DeviceSpecError("\(descriptor.name) is a \(descriptor.deviceClass) device, not a \(deviceClass) device (in '\(spec)')")
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

    /// Opens the block device stack `spec` describes.
    public static func open(_ spec: DeviceSpec) throws(DeviceSpecError) -> any BlockDevice {
        try openStack(spec, of: .block) as! any BlockDevice   // a block stack's top is a block device
    }

    /// Opens the stack `spec` describes, of `deviceClass`. If any element fails, what was
    /// opened is closed again.
    public static func openStack(_ spec: DeviceSpec, of deviceClass: SoftDeviceClass) throws(DeviceSpecError) -> any SoftDevice {
        let descriptors = try descriptors(for: spec, of: deviceClass)
        var device: (any SoftDevice)?
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

    /// A text table of every device, its parameters and their help, by class (for `softdev devices`).
    public static var help: String {
        var text = ""
        for deviceClass in Set(all.map(\.deviceClass)).sorted(by: { $0.name < $1.name }) {
            text += "\(deviceClass) devices and filters:\n\n" + help(of: deviceClass)
        }
        return text
    }

    /// The help of one class's devices.
    public static func help(of deviceClass: SoftDeviceClass) -> String {
        var text = ""
        for descriptor in all where descriptor.deviceClass == deviceClass {
            text += "\(descriptor.usage)\n    \(descriptor.summary)\n"
            for parameter in descriptor.parameters {
                text += "    \(parameter.name)\(parameter.isRequired ? " (required)" : ""): \(parameter.help)\n"
            }
            text += "\n"
        }
        return text
    }
}
