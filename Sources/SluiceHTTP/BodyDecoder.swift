/// Delimits a message body as it streams in, whatever the receive buffers' boundaries: it reports which bytes of
/// each buffer are body data (to be forwarded as they are, without copying) and where the message ends. Memory
/// per body is this struct, whatever the body's size.
public struct BodyDecoder: Sendable {
    /// Longest chunk-size line (size, extensions) and trailer section accepted.
    public static let maxChunkLine = 1024
    public static let maxTrailerBytes = 16 << 10

    enum State: Sendable, Equatable {
        case length(remaining: UInt64)
        /// Everything until the connection closes is body.
        case untilClose
        /// Reading a chunk-size line.
        case size(value: UInt64, digits: Int, inExtension: Bool, lineBytes: Int, sawCR: Bool)
        case data(remaining: UInt64)
        /// After chunk data: CR then LF.
        case dataCR, dataLF
        /// After the last chunk: trailer lines until an empty one.
        case trailer(lineBytes: Int, total: Int, sawCR: Bool)
        case done
    }

    var state: State
    public var isDone: Bool { state == .done }

    public init(_ framing: BodyFraming) {
        switch framing {
        case .none: state = .done
        case .contentLength(let n): state = n == 0 ? .done : .length(remaining: n)
        case .chunked: state = .size(value: 0, digits: 0, inExtension: false, lineBytes: 0, sawCR: false)
        case .untilClose: state = .untilClose
        }
    }

    /// Consumes `bytes` up to the end of the body; `onData` gets each range of body data. Returns how many bytes
    /// belonged to this body (the rest, if any, is the next message: pipelining).
    public mutating func feed(_ b: UnsafeRawBufferPointer, onData: (Range<Int>) -> Void) throws(HTTP1Error) -> Int {
        var i = 0
        while i < b.count {
            switch state {
            case .done:
                return i
            case .untilClose:
                onData(i..<b.count)
                return b.count
            case .length(let remaining):
                let n = Int(min(UInt64(b.count - i), remaining))
                onData(i..<(i + n))
                i += n
                state = remaining == UInt64(n) ? .done : .length(remaining: remaining - UInt64(n))
            case .data(let remaining):
                let n = Int(min(UInt64(b.count - i), remaining))
                onData(i..<(i + n))
                i += n
                state = remaining == UInt64(n) ? .dataCR : .data(remaining: remaining - UInt64(n))
            case .dataCR:
                guard b[i] == 0x0D else { throw .badRequest("chunk data longer than its size") }
                state = .dataLF
                i += 1
            case .dataLF:
                guard b[i] == 0x0A else { throw .badRequest("bare CR after chunk data") }
                state = .size(value: 0, digits: 0, inExtension: false, lineBytes: 0, sawCR: false)
                i += 1
            case .size(var value, var digits, var inExtension, var lineBytes, let sawCR):
                let c = b[i]
                i += 1
                lineBytes += 1
                if lineBytes > Self.maxChunkLine { throw .badRequest("chunk-size line too long") }
                if sawCR {
                    guard c == 0x0A else { throw .badRequest("bare CR in a chunk-size line") }
                    guard digits > 0 else { throw .badRequest("missing chunk size") }
                    state = value == 0 ? .trailer(lineBytes: 0, total: 0, sawCR: false) : .data(remaining: value)
                    continue
                }
                if c == 0x0D {
                    state = .size(value: value, digits: digits, inExtension: inExtension, lineBytes: lineBytes, sawCR: true)
                    continue
                }
                if c == 0x0A || c == 0 { throw .badRequest("bad byte in a chunk-size line") }
                if inExtension {
                    // chunk-ext: ignored, but only printable bytes.
                    guard c >= 0x20 || c == 0x09, c != 0x7F else { throw .badRequest("control byte in a chunk extension") }
                } else if let v = Self.hex(c) {
                    digits += 1
                    // 16 hex digits overflow 64 bits; a size that large is an attack, not a body.
                    guard digits <= 15 else { throw .badRequest("chunk size too large") }
                    value = value << 4 | UInt64(v)
                } else if c == 0x3B && digits > 0 {  // ';'
                    inExtension = true
                } else if (c == 0x20 || c == 0x09) && digits > 0 {
                    inExtension = true  // BWS before ';'
                } else {
                    throw .badRequest("bad chunk size")
                }
                state = .size(value: value, digits: digits, inExtension: inExtension, lineBytes: lineBytes, sawCR: false)
            case .trailer(let lineBytes, let total, let sawCR):
                let c = b[i]
                i += 1
                if total + 1 > Self.maxTrailerBytes { throw .headersTooLarge }
                if sawCR {
                    guard c == 0x0A else { throw .badRequest("bare CR in trailers") }
                    state = lineBytes == 0 ? .done : .trailer(lineBytes: 0, total: total + 1, sawCR: false)
                    continue
                }
                if c == 0x0D {
                    state = .trailer(lineBytes: lineBytes, total: total + 1, sawCR: true)
                } else if c == 0x0A || c == 0 {
                    throw .badRequest("bad byte in trailers")
                } else {
                    state = .trailer(lineBytes: lineBytes + 1, total: total + 1, sawCR: false)
                }
            }
        }
        return i
    }

    @inline(__always) static func hex(_ c: UInt8) -> UInt8? {
        switch c {
        case 0x30...0x39: c - 0x30
        case 0x41...0x46: c - 0x41 + 10
        case 0x61...0x66: c - 0x61 + 10
        default: nil
        }
    }
}
