import ArgumentParser
import Core
import Daemon
import Foundation
import XenStore

/// `softdev type DOMAIN PORT TEXT`: keystrokes for a guest's soft USB keyboard.
struct TypeText: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "type",
        abstract: "Type text on the soft USB keyboard plugged into a guest's port (`keyboard` in `softdev attach DOMAIN usb PORT keyboard`).",
        discussion: """
            The daemon (`softdev serve`) turns each character into a key press and release on the keyboard's interrupt \
            endpoint, as a USB keyboard would (US layout: letters, digits, punctuation, space, Tab; \\n is Enter). The text \
            reaches the daemon through its control socket (/run/softdev/control.sock on Xen, beside the local hypervisor's \
            sockets otherwise).
            Example: softdev type guest1 2 'root\\n'
            """)

    @OptionGroup var hypervisorOptions: HypervisorOptions
    @Argument(help: "The guest: its name or domain id.")
    var domain: String
    @Argument(help: "The USB port the keyboard is plugged into.")
    var port: Int
    @Argument(help: "The text; \\n (a backslash and n) is Enter, \\t Tab.")
    var text: String

    func run() throws {
        let choice = hypervisorOptions.choice()
        let store = try choice.openStore()
        let guest = try XenbusToolstack.resolveDomain(store, domain)
        let typed = text.replacingOccurrences(of: "\\n", with: "\n").replacingOccurrences(of: "\\t", with: "\t")
        do {
            try ControlSocket.request(path: ServeLock.controlPath(for: choice),
                                      ["type", "\(guest)", "\(port)", Data(typed.utf8).base64EncodedString()])
        } catch { throw ValidationError("\(error)") }
        print("typed \(typed.count) characters on port \(port) of domain \(guest)")
    }
}
