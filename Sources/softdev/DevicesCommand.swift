import ArgumentParser
import Devices

struct Devices: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List the soft devices and their parameters.")
    func run() { print(DeviceRegistry.help) }
}
