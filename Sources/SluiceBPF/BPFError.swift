import Glibc

/// A BPF set-up or update failure, worded for the operator: what failed, on what, and the fix when known.
public struct BPFError: Error, CustomStringConvertible, Sendable {
    public var description: String

    public init(_ description: String) {
        self.description = description
    }

    /// `what` failed with `errno` (positive or negative).
    static func errno(_ what: String, _ code: Int32, hint: String? = nil) -> BPFError {
        let text = String(cString: strerror(abs(code)))
        var d = "\(what): \(text)"
        if let hint { d += " (\(hint))" }
        else if abs(code) == EPERM { d += " (run as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)" }
        return BPFError(d)
    }
}
