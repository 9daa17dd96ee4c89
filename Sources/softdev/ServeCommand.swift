import ArgumentParser
import Core
import Daemon
import Devices
import Foundation
import Glibc
import Logging

/// `softdev serve`: the daemon.
struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve soft devices to guests (blkif, netif, usbif) and hosts (NBD, network links) until SIGTERM or SIGINT.",
        discussion: """
            Serves every device attached under /local/domain/<me>/backend/softdev-<type> (softdev-vbd for disks, softdev-vif \
            for network cards, softdev-vusb for USB controllers), by `softdev attach`, the config file's device tables \
            ([[disk]], [[nic]], [[usb]]) or any toolstack; picks up attach and detach \
            while it runs, and unplugs a guest's devices when the guest shuts down, crashes or is destroyed. With --hypervisor local \
            and no local hypervisor running at --local-dir, the daemon runs one itself.
            The config file is TOML; see the README ("softdev serve") for every key.
            """)

    @OptionGroup var hypervisorOptions: HypervisorOptions

    @Option(help: ArgumentHelp("A TOML config file: hypervisor, poll-us, log-level, each class's backend options ([blkif]) and devices ([[disk]]), [[export]] tables, [nbd] listen, [metrics] listen.", valueName: "file"))
    var config: String?

    @Option(name: .customLong("nbd"), help: ArgumentHelp(
        "Listen for NBD clients here: unix:PATH (mode 0600) or tcp:HOST:PORT. Repeatable; replaces the config's [nbd] listen. Default with exports: \(SoftDevDaemon.defaultNBDSocket).",
        valueName: "address"))
    var nbdListen: [String] = []

    @Option(name: .customLong("export"), help: ArgumentHelp(
        "Serve a device stack over NBD under a name, e.g. --export 'disk=stats | file(path=disk.img)'. Repeatable.",
        valueName: "name=spec"))
    var exports: [String] = []

    @Option(name: .customLong("link"), help: ArgumentHelp(
        "Join two network endpoints through a stack, without a guest, e.g. --link 'tap(name=a) | filter(expr=\"tcp\") | tap(name=b)' (the first element stands in for the guest). Repeatable; added to the config's [[link]] tables.",
        valueName: "spec"))
    var links: [String] = []

    @Option(name: .customLong("poll-us"), help: ArgumentHelp(
        "How long an idle ring thread or NBD connection polls for the next request before it sleeps, in microseconds; 0 never polls (saves CPU, costs latency at queue depth 1). Default: the config's poll-us, else \(AdaptivePoller.defaultMicroseconds).",
        valueName: "us"))
    var pollMicroseconds: Int?

    @Option(name: .customLong("log-level"), help: ArgumentHelp(
        "The least severe messages to write: \(ServeConfig.logLevels.joined(separator: ", ")). Default: the config's log-level, else info (debug adds each device's xenbus state steps).",
        valueName: "level"))
    var logLevel: String?

    @Option(name: .customLong("metrics"), help: ArgumentHelp(
        "Keep metrics of every device served and answer Prometheus at http://HOST:PORT/metrics. Replaces the config's [metrics] listen. Default: off.",
        valueName: "host:port"))
    var metricsListen: String?

    func run() throws {
        FrameMemory.keepFreedMemory()
        var settings = try config.map { try ServeConfig.load(path: $0) } ?? ServeConfig()
        // The command line wins over the config file.
        if !nbdListen.isEmpty { settings.nbdListen = nbdListen }
        do {
            if let logLevel { settings.logLevel = try ServeConfig.parseLogLevel(logLevel, place: "--log-level") }
            if let metricsListen { settings.metricsListen = try MetricsListenAddress.parse(metricsListen, place: "--metrics") }
        } catch { throw ValidationError(error.description) }
        if let us = pollMicroseconds {
            guard AdaptivePoller.microsecondRange.contains(us) else { throw ValidationError("--poll-us \(us): use 0 to 1000000 microseconds") }
            settings.pollMicroseconds = us
        }
        for text in exports {
            guard let eq = text.firstIndex(of: "="), eq != text.startIndex else {
                throw ValidationError("--export \(text): expected NAME=SPEC, e.g. --export 'disk=file(path=disk.img)'")
            }
            let name = String(text[..<eq]), spec = String(text[text.index(after: eq)...])
            guard !settings.exports.contains(where: { $0.name == name }) else { throw ValidationError("--export: the name '\(name)' is used twice") }
            settings.exports.append(.init(name: name, device: spec))
        }
        for spec in links {
            do { try NetLink.check(spec) } catch { throw ValidationError("--link \(spec): \(error)") }
            settings.links.append(spec)
        }
        // Stop on SIGTERM/SIGINT: block them here (the threads the daemon starts inherit the
        // mask) and wait for one on this thread.
        let signals = StopSignals.block()

        let choice = hypervisorOptions.choice(configured: settings.hypervisor, configuredDirectory: settings.localDirectory)
        // One line per event to stderr, as daemons log under a service manager.
        let logger = DaemonLog.logger(level: settings.logLevel)
        let daemon = try SoftDevDaemon(config: settings, choice: choice, logger: logger)
        try daemon.start()
        logger.notice("signal \(signals.wait()): stopping")
        daemon.stop()
        logger.notice("stopped")
    }
}
