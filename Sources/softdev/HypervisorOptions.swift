import ArgumentParser
import Core
import Daemon

extension HypervisorKind: ExpressibleByArgument {}

/// `--hypervisor` and `--local-dir`, shared by every command that talks to a hypervisor.
struct HypervisorOptions: ParsableArguments {
    @Option(help: ArgumentHelp(
        "auto, xen or local. auto picks Xen when this runs in a Xen domain (dom0 or a driver domain: /dev/xen/xenbus or xenstored is there), else the local emulated hypervisor. Default: the config file's, else auto.",
        valueName: "kind"))
    var hypervisor: HypervisorKind?

    @Option(help: ArgumentHelp("The local hypervisor's directory (its hypervisor.sock and xenstored.sock). Default: $SOFTDEV_LOCAL_HYPERVISOR or /run/softdev/local.",
                               valueName: "dir"))
    var localDir: String?

    func choice(configured: HypervisorKind? = nil, configuredDirectory: String? = nil) -> HypervisorChoice {
        // The command line wins over the config file, which wins over the default (auto).
        let kind = hypervisor ?? configured ?? .auto
        let directory = localDir ?? configuredDirectory
        return HypervisorChoice(kind: kind, localAddress: directory.map { LocalHypervisorAddress(directory: $0) } ?? .default)
    }
}
