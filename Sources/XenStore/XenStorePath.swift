/// Path rules of xenstored (cxenstored's `is_valid_nodename` and `canonicalize`).
///
/// A node path is absolute ("/a/b"), has no empty components (no "//", no trailing "/" except
/// the root itself), and uses only letters, digits and "-/_@". A path without the leading "/" is
/// relative to the connection's home, "/local/domain/<domid>". Watches may also name the special
/// paths "@introduceDomain" and "@releaseDomain".
enum XenStorePath {
    static let introduceDomain = "@introduceDomain"
    static let releaseDomain = "@releaseDomain"

    static func domainPath(_ domain: UInt16) -> String { "/local/domain/\(domain)" }

    /// The absolute form of `path` for a connection of `domain`; throws `.invalid` if malformed
    /// or too long.
    static func canonical(_ path: String, domain: UInt16) throws(XenStoreError) -> String {
        let absolute: String
        if path.hasPrefix("/") || path.hasPrefix("@") {
            absolute = path   // "@..." is never relative: only watches may name it, and the check below rejects it
        } else {
            guard path.utf8.count <= XenStoreLimits.relativePathMax else { throw .invalid(path) }
            absolute = domainPath(domain) + "/" + path
        }
        guard isValidAbsolute(absolute) else { throw .invalid(path) }
        return absolute
    }

    /// Like `canonical`, but also accepts the special watch paths.
    static func canonicalWatch(_ path: String, domain: UInt16) throws(XenStoreError) -> String {
        if path == introduceDomain || path == releaseDomain { return path }
        return try canonical(path, domain: domain)
    }

    static func isValidAbsolute(_ path: String) -> Bool {
        let bytes = Array(path.utf8)
        guard bytes.first == UInt8(ascii: "/"), bytes.count <= XenStoreLimits.absolutePathMax else { return false }
        if bytes.count == 1 { return true }
        if bytes.last == UInt8(ascii: "/") { return false }
        var previous: UInt8 = 0
        for b in bytes {
            let ok = (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5a) || (b >= 0x61 && b <= 0x7a)
                || b == UInt8(ascii: "-") || b == UInt8(ascii: "/") || b == UInt8(ascii: "_") || b == UInt8(ascii: "@")
            if !ok { return false }
            if b == UInt8(ascii: "/") && previous == b { return false }
            previous = b
        }
        return true
    }

    /// "/a/b" -> "/a"; "/a" -> "/". The root has no parent.
    static func parent(_ path: String) -> String? {
        guard path != "/", let slash = path.lastIndex(of: "/") else { return nil }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// "/a/b" -> "b".
    static func lastComponent(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return path }
        return String(path[path.index(after: slash)...])
    }

    static func child(_ parent: String, _ name: String) -> String {
        parent == "/" ? "/" + name : parent + "/" + name
    }

    /// True if `path` is `ancestor` or lies below it.
    static func isWithin(_ path: String, _ ancestor: String) -> Bool {
        if ancestor == "/" { return path.hasPrefix("/") }
        return path == ancestor || path.hasPrefix(ancestor + "/")
    }
}
