/// Values by HTTP/2 stream id, in a linear-probing table indexed by `id >> 1` (a connection's streams are
/// numbered 1, 3, 5... by one side, so consecutive streams fall in consecutive slots). Lookups happen several
/// times per request; `Dictionary`'s seeded SipHash made them 3% of an HTTP/2 request's CPU.
public struct StreamMap<Value>: Sequence {
    private var keys: [Int32]
    private var slots: [Value?]
    public private(set) var count = 0

    public init() {
        keys = Array(repeating: -1, count: 8)
        slots = Array(repeating: nil, count: 8)
    }

    public var isEmpty: Bool { count == 0 }

    @inline(__always) private var mask: Int { keys.count - 1 }

    @inline(__always) private func home(_ key: Int32) -> Int { Int(key >> 1) & mask }

    /// The slot holding `key`, if any.
    @inline(__always) private func find(_ key: Int32) -> Int? {
        var i = home(key)
        while keys[i] != -1 {
            if keys[i] == key { return i }
            i = (i + 1) & mask
        }
        return nil
    }

    public subscript(key: Int32) -> Value? {
        get { find(key).flatMap { slots[$0] } }
        _modify {
            let at = find(key)
            // Moved out so the caller's changes do not copy the value's storage.
            var value: Value? = nil
            if let at { swap(&value, &slots[at]) }
            defer {
                if let at {
                    if value == nil { remove(at: at) } else { swap(&value, &slots[at]) }
                } else if let v = value {
                    insert(key, v)
                }
            }
            yield &value
        }
    }

    @discardableResult
    public mutating func removeValue(forKey key: Int32) -> Value? {
        guard let at = find(key) else { return nil }
        let v = slots[at]
        remove(at: at)
        return v
    }

    public mutating func removeAll() {
        keys = Array(repeating: -1, count: 8)
        slots = Array(repeating: nil, count: 8)
        count = 0
    }


    private mutating func insert(_ key: Int32, _ value: Value) {
        precondition(key >= 0, "stream ids are not negative")
        if (count + 1) * 2 > keys.count { grow() }
        var i = home(key)
        while keys[i] != -1 { i = (i + 1) & mask }
        keys[i] = key
        slots[i] = value
        count += 1
    }

    /// Empties slot `at`, moving later entries of its probe run back so every key stays reachable.
    private mutating func remove(at: Int) {
        var hole = at
        keys[hole] = -1
        slots[hole] = nil
        count -= 1
        var i = (hole + 1) & mask
        while keys[i] != -1 {
            let h = home(keys[i])
            // Entry i may move into the hole if its home is not in the (cyclic) range (hole, i].
            let between = hole <= i ? (h > hole && h <= i) : (h > hole || h <= i)
            if !between {
                keys[hole] = keys[i]
                slots.swapAt(hole, i)
                keys[i] = -1
                hole = i
            }
            i = (i + 1) & mask
        }
    }

    private mutating func grow() {
        let oldKeys = keys
        var oldSlots = slots
        keys = Array(repeating: -1, count: oldKeys.count * 2)
        slots = Array(repeating: nil, count: oldKeys.count * 2)
        count = 0
        for k in oldKeys.indices where oldKeys[k] != -1 {
            var v: Value? = nil
            swap(&v, &oldSlots[k])
            insert(oldKeys[k], v!)
        }
    }

    public func makeIterator() -> Iterator { Iterator(map: self) }

    /// Walks the slots in place (no boxed iterator on the per-connection paths that scan streams).
    public struct Iterator: IteratorProtocol {
        let map: StreamMap
        var k = 0

        public mutating func next() -> (key: Int32, value: Value)? {
            while k < map.keys.count {
                defer { k += 1 }
                if map.keys[k] != -1, let v = map.slots[k] { return (map.keys[k], v) }
            }
            return nil
        }
    }
}
