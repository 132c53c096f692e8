/// Deadlines of one worker in a binary min-heap. The worker keeps one io_uring timeout armed for the earliest
/// deadline (``nextToArm(now:)``); entries are never removed early: an owner that no longer wants a timer checks,
/// when it fires, whether its tag is still current (so cancelling costs nothing).
public struct TimerHeap: Sendable {
    public struct Entry: Sendable {
        public var deadline: UInt64
        public var tag: UInt64
    }

    var heap: [Entry] = []
    /// Deadline of the timeout currently armed in the ring (0: none).
    var armed: UInt64 = 0

    public init() {}

    public var count: Int { heap.count }

    public mutating func schedule(at deadline: UInt64, tag: UInt64) {
        heap.append(Entry(deadline: deadline, tag: tag))
        var i = heap.count - 1
        while i > 0 {
            let p = (i - 1) / 2
            guard heap[p].deadline > heap[i].deadline else { break }
            heap.swapAt(p, i)
            i = p
        }
    }

    /// Removes and returns the earliest entry if it is due.
    public mutating func popDue(now: UInt64) -> Entry? {
        guard let top = heap.first, top.deadline <= now else { return nil }
        let last = heap.removeLast()
        if !heap.isEmpty {
            heap[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < heap.count && heap[l].deadline < heap[m].deadline { m = l }
                if r < heap.count && heap[r].deadline < heap[m].deadline { m = r }
                if m == i { break }
                heap.swapAt(i, m)
                i = m
            }
        }
        return top
    }

    /// The deadline a new ring timeout must be armed for, if the earliest entry is earlier than what is armed.
    public mutating func nextToArm() -> UInt64? {
        guard let top = heap.first else { return nil }
        if armed != 0 && armed <= top.deadline { return nil }
        armed = top.deadline
        return top.deadline
    }

    /// The armed timeout fired (or was found stale): the next earliest entry needs arming.
    public mutating func fired() { armed = 0 }
}
