import SluiceModel

/// The part of DNS (RFC 1035) the agent answers itself: a standard query with one question for a mesh host,
/// answered with the service's addresses. Everything else is relayed to the host's resolver untouched, so this
/// parser only has to recognise what it answers and refuse the rest. Hand-written: the whole of it is a header,
/// one name and two integers, and no DNS library is among the project's dependencies.
public struct DNSQuery: Sendable, Equatable {
    public static let typeA: UInt16 = 1
    public static let typeAAAA: UInt16 = 28
    public static let classIN: UInt16 = 1
    static let maxNameLength = 255

    public var id: UInt16
    /// Recursion desired, copied into the answer.
    public var recursionDesired: Bool
    /// Lower-cased, without the trailing dot.
    public var name: String
    public var type: UInt16
    public var qclass: UInt16
    /// The question section's bytes, echoed in the answer.
    var question: ArraySlice<UInt8>

    /// Parses `bytes` as a standard query with exactly one question; nil for anything else (responses, other
    /// opcodes, several questions, compressed or over-long names, truncated input).
    public init?(_ bytes: [UInt8]) {
        guard bytes.count >= 12 else { return nil }
        func u16(_ i: Int) -> UInt16 { UInt16(bytes[i]) << 8 | UInt16(bytes[i + 1]) }
        let flags = u16(2)
        let isResponse = flags & 0x8000 != 0, opcode = (flags >> 11) & 0xF
        // One question; an additional record is allowed (EDNS's OPT, which resolvers add) and not echoed.
        guard !isResponse, opcode == 0, u16(4) == 1, u16(6) == 0, u16(8) == 0, u16(10) <= 1 else { return nil }
        var i = 12
        var labels: [String] = []
        var length = 0
        while true {
            guard i < bytes.count else { return nil }
            let n = Int(bytes[i])
            if n == 0 {
                i += 1
                break
            }
            // 0xC0: a compression pointer, which a query's only name has no reason to use.
            guard n <= 63, i + 1 + n <= bytes.count else { return nil }
            length += n + 1
            guard length <= Self.maxNameLength else { return nil }
            labels.append(String(decoding: bytes[(i + 1)..<(i + 1 + n)], as: UTF8.self).lowercased())
            i += 1 + n
        }
        guard i + 4 <= bytes.count else { return nil }
        id = u16(0)
        recursionDesired = flags & 0x0100 != 0
        name = labels.joined(separator: ".")
        type = u16(i)
        qclass = u16(i + 2)
        question = bytes[12..<(i + 4)]
    }

    /// The response: `addresses` of the asked family as answers (none is NODATA: the name exists, not with
    /// that type), or NXDOMAIN when `addresses` is nil.
    public func answer(_ addresses: [IPAddress]?, ttl: UInt32 = 30) -> [UInt8] {
        let records = (addresses ?? []).filter { ip in
            type == Self.typeA ? ip.isIPv4 : type == Self.typeAAAA ? !ip.isIPv4 : false  // other types: NODATA
        }
        let rcode: UInt16 = addresses == nil ? 3 : 0
        let flags: UInt16 = 0x8000 | 0x0400 | (recursionDesired ? 0x0100 : 0) | 0x0080 | rcode  // QR AA RD RA
        var out: [UInt8] = []
        out.reserveCapacity(12 + question.count + records.count * 28)
        func put16(_ v: UInt16) { out += [UInt8(v >> 8), UInt8(v & 0xFF)] }
        func put32(_ v: UInt32) { put16(UInt16(v >> 16)); put16(UInt16(v & 0xFFFF)) }
        put16(id)
        put16(flags)
        put16(1)
        put16(UInt16(records.count))
        put16(0)
        put16(0)
        out += question
        for ip in records {
            put16(0xC00C)  // the name: a pointer to the question's
            put16(type)
            put16(Self.classIN)
            put32(ttl)
            switch ip {
            case .v4(let raw):
                put16(4)
                withUnsafeBytes(of: raw) { out += $0 }  // already in network order
            case .v6(let hi, let lo):
                put16(16)
                withUnsafeBytes(of: (hi, lo)) { out += $0 }
            }
        }
        return out
    }
}
