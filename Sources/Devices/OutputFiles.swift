import Glibc
import Synchronization

/// A file that records are appended to through a buffer under one lock, written out when the
/// buffer passes 64 KiB and at `close` (the capture filters: `pcap`, `usbmon`). A failed write
/// stops the recording with one message on standard error; the device goes on.
final class BufferedOutputFile: @unchecked Sendable {
    private struct State {
        var fd: Int32
        var buffer: [UInt8] = []
        var failed = false
    }
    private let state: Mutex<State>
    /// The filter's name for messages, e.g. "pcap(file=c.pcap)".
    let owner: String
    static let flushThreshold = 1 << 16

    /// Creates (truncates) `path`; nil with `errno` set when it cannot.
    init?(creating path: String, owner: String) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return nil }
        self.owner = owner
        var s = State(fd: fd)
        s.buffer.reserveCapacity(Self.flushThreshold * 2)
        state = Mutex(s)
    }

    /// Appends what `record` writes into the buffer (nothing once closed or failed).
    func append(_ record: (inout [UInt8]) -> Void) {
        state.withLock { s in
            guard s.fd >= 0, !s.failed else { return }
            record(&s.buffer)
            if s.buffer.count >= Self.flushThreshold { flush(&s) }
        }
    }

    /// Writes out what is buffered and closes the file.
    func close() {
        state.withLock { s in
            guard s.fd >= 0 else { return }
            flush(&s)
            Glibc.close(s.fd)
            s.fd = -1
        }
    }

    private func flush(_ s: inout State) {
        var done = 0
        while done < s.buffer.count && !s.failed {
            let n = s.buffer.withUnsafeBytes { write(s.fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0 {
                if errno == EINTR { continue }
                fputs("\(owner): write failed, capture stopped: \(String(cString: strerror(errno)))\n", stderr)
                s.failed = true
            } else {
                done += n
            }
        }
        s.buffer.removeAll(keepingCapacity: true)
    }
}

/// A text file written a line at a time, each flushed as it is written so that it can be
/// followed while the device runs (the `log` filters of every class).
final class LineOutputFile: @unchecked Sendable {
    private let file: Mutex<UnsafeMutablePointer<FILE>?>

    /// Opens (truncates, or appends to) `path`; nil with `errno` set when it cannot.
    init?(path: String, append: Bool) {
        guard let f = fopen(path, append ? "a" : "w") else { return nil }
        file = Mutex(f)
    }

    func write(_ line: String) {
        file.withLock { file in
            guard let file else { return }
            fputs(line, file)
            fflush(file)
        }
    }

    func close() {
        file.withLock { file in
            if let f = file { fclose(f) }
            file = nil
        }
    }
}
