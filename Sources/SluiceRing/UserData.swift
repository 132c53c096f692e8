/// The 64-bit tag of one io_uring operation: which connection slot, which incarnation of that slot, and
/// what operation. Packing it avoids retaining an object per operation.
public struct UserData: Hashable, Sendable {
    public var raw: UInt64

    @inline(__always)
    public init(slot: UInt32, generation: UInt32, op: UInt8) {
        raw = UInt64(slot) | (UInt64(generation & 0xFF_FFFF) << 32) | (UInt64(op) << 56)
    }

    @inline(__always) public init(raw: UInt64) { self.raw = raw }

    @inline(__always) public var slot: UInt32 { UInt32(truncatingIfNeeded: raw) }
    @inline(__always) public var generation: UInt32 { UInt32(truncatingIfNeeded: raw >> 32) & 0xFF_FFFF }
    @inline(__always) public var op: UInt8 { UInt8(truncatingIfNeeded: raw >> 56) }
}
