import Core
import Glibc
import Synchronization

/// `GET /metrics` over HTTP/1.1 for Prometheus: a blocking responder on a thread of its own,
/// one connection at a time (a scraper comes every few seconds; nothing here is worth an event
/// loop). Each connection gets one answer and is closed: 200 with the registry's text for
/// `/metrics`, 404 for another path, 405 for another method, 400 for anything that is not a
/// request line. A client that sends garbage, stalls or goes away costs at most `clientTimeout`
/// of this thread and never touches the daemon's other threads.
///
/// ```swift
/// let endpoint = MetricsEndpoint(host: "127.0.0.1", port: 9100, metrics: registry) { refreshGauges() }
/// try endpoint.start()
/// ```
public final class MetricsEndpoint: @unchecked Sendable {
    public let host: String
    public let port: UInt16
    public let metrics: MetricsRegistry
    /// Seconds a client may take to send its request or read the answer.
    public let clientTimeout: Int
    /// Runs before each scrape's text is made: sets the gauges read at scrape time.
    private let beforeScrape: @Sendable () -> Void
    private var listener: Int32 = -1
    private var thread: PosixThread?
    private let stopping = Atomic<Bool>(false)
    /// The largest request head we read; a scraper's is a few hundred bytes.
    private static let maxRequestBytes = 8192

    public init(host: String, port: UInt16, metrics: MetricsRegistry, clientTimeout: Int = 2,
                beforeScrape: @escaping @Sendable () -> Void = {}) {
        self.host = host; self.port = port; self.metrics = metrics; self.clientTimeout = clientTimeout
        self.beforeScrape = beforeScrape
    }

    /// Binds, listens and starts answering.
    public func start() throws(MetricsEndpointError) {
        listener = try Self.listen(host, port)
        do {
            thread = try PosixThread("the metrics endpoint") { [self] in acceptLoop() }
        } catch {
            close(listener)
            listener = -1
            throw MetricsEndpointError("\(error)")
        }
    }

    /// The port bound (the one the kernel picked for port 0).
    public var boundPort: UInt16? { TCPListener.boundPort(listener) }

    /// Stops answering; a scrape being answered finishes first.
    public func stop() {
        guard let thread, !stopping.exchange(true, ordering: .relaxed) else { return }
        // Wakes accept() with EINVAL on Linux.
        shutdown(listener, Int32(SHUT_RDWR))
        thread.join()
        close(listener)
    }

    private static func listen(_ host: String, _ port: UInt16) throws(MetricsEndpointError) -> Int32 {
        do { return try TCPListener.open(host: host, port: port, backlog: 16) } catch { throw MetricsEndpointError(error.message) }
    }

    private func acceptLoop() {
        while !stopping.load(ordering: .relaxed) {
            let client = accept(listener, nil, nil)
            guard client >= 0 else {
                // Out of descriptors or a connection reset before accept: wait a little, go on.
                if errno != EINTR && errno != ECONNABORTED && !stopping.load(ordering: .relaxed) { usleep(10_000) }
                continue
            }
            // Not inherited by the programs a test or a device may start.
            _ = fcntl(client, F_SETFD, FD_CLOEXEC)
            answer(client)
            close(client)
        }
    }

    private func answer(_ client: Int32) {
        var timeout = timeval(tv_sec: clientTimeout, tv_usec: 0)
        setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        guard let head = readHead(client) else { return }
        // The request line: METHOD SP TARGET SP HTTP/x.y; the headers do not matter here.
        let line = head.prefix { $0 != UInt8(ascii: "\r") && $0 != UInt8(ascii: "\n") }
        let parts = line.split(separator: UInt8(ascii: " "), omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        guard parts.count == 3, parts[2].hasPrefix("HTTP/1."), parts[1].hasPrefix("/") else {
            return respond(client, "400 Bad Request", "expected a request line such as: GET /metrics HTTP/1.1\n")
        }
        guard parts[0] == "GET" || parts[0] == "HEAD" else {
            return respond(client, "405 Method Not Allowed", "use GET\n", extra: "Allow: GET, HEAD\r\n")
        }
        let path = parts[1].prefix { $0 != "?" }
        guard path == "/metrics" else { return respond(client, "404 Not Found", "the metrics are at /metrics\n") }
        beforeScrape()
        respond(client, "200 OK", metrics.text(), type: "text/plain; version=0.0.4; charset=utf-8", head: parts[0] == "HEAD")
    }

    /// The request up to its blank line, or nil if the client closed, stalled or sent too much.
    private func readHead(_ client: Int32) -> [UInt8]? {
        var head: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 1024)
        while head.count < Self.maxRequestBytes {
            let n = buffer.withUnsafeMutableBytes { recv(client, $0.baseAddress, $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return nil }
            head += buffer[..<n]
            if Self.hasBlankLine(head) { return head }
        }
        return nil
    }

    /// "\n\n" or "\n\r\n": the end of the head (bare LFs tolerated, as most servers do).
    private static func hasBlankLine(_ bytes: [UInt8]) -> Bool {
        let lf = UInt8(ascii: "\n"), cr = UInt8(ascii: "\r")
        for i in bytes.indices.dropLast() where bytes[i] == lf {
            if bytes[i + 1] == lf || (bytes[i + 1] == cr && i + 2 < bytes.count && bytes[i + 2] == lf) { return true }
        }
        return false
    }

    private func respond(_ client: Int32, _ status: String, _ body: String, extra: String = "") {
        respond(client, status, Array(body.utf8), type: "text/plain; charset=utf-8", extra: extra)
    }

    private func respond(_ client: Int32, _ status: String, _ body: [UInt8], type: String, extra: String = "", head: Bool = false) {
        let header = "HTTP/1.1 \(status)\r\nContent-Type: \(type)\r\nContent-Length: \(body.count)\r\n\(extra)Connection: close\r\n\r\n"
        guard send(client, Array(header.utf8)), !head else { return }
        _ = send(client, body)
    }

    /// Writes all of `bytes`; false if the client went away (MSG_NOSIGNAL: no SIGPIPE for the daemon).
    private func send(_ client: Int32, _ bytes: [UInt8]) -> Bool {
        bytes.withUnsafeBytes { raw in
            var sent = 0
            while sent < raw.count {
                let n = Glibc.send(client, raw.baseAddress! + sent, raw.count - sent, Int32(MSG_NOSIGNAL))
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { return false }
                sent += n
            }
            return true
        }
    }
}

/// Why the metrics endpoint could not start.
public struct MetricsEndpointError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
