import CSluiceLinux
import Glibc
import Synchronization

/// Where every metric series lives: a family (name, type, help) and a label set map to slots in each worker's
/// ``MetricShard``. Series are created at config time, or by a worker the first time it meets a label value only
/// known at run time (a response code): then the worker takes this registry's lock once for that series and keeps
/// its slot. Series are never removed, so a slot index a worker holds stays valid for the life of the process.
public final class MetricsRegistry: Sendable {
    public enum Kind: String, Sendable { case counter, gauge, histogram }

    struct Family: Sendable {
        var name: String
        var help: String
        var kind: Kind
        var buckets: [Double]
        var series: [(labels: String, slot: Int)]
    }

    struct State: Sendable {
        var families: [Family] = []
        var familyIndex: [String: Int] = [:]
        var seriesIndex: [String: Int] = [:]
        var nextSlot = 0
        var shards: [MetricShard] = []
    }

    public let capacity: Int
    private let state = Mutex(State())

    /// - Parameter capacity: slots per shard. Untouched slots cost no resident memory (calloc'd pages).
    public init(capacity: Int = 1 << 18) { self.capacity = capacity }

    /// A new shard for one worker; only that worker writes to it.
    public func makeShard() -> MetricShard {
        let shard = MetricShard(capacity: capacity)
        state.withLock { $0.shards.append(shard) }
        return shard
    }

    public func counter(_ name: String, help: String, labels: [(String, String)]) -> Int {
        series(name, help: help, kind: .counter, buckets: [], labels: labels)
    }

    public func gauge(_ name: String, help: String, labels: [(String, String)]) -> Int {
        series(name, help: help, kind: .gauge, buckets: [], labels: labels)
    }

    /// A histogram's slot is its first bucket; then the other buckets, `+Inf`, the sum and the count follow.
    public func histogram(_ name: String, help: String, buckets: [Double], labels: [(String, String)]) -> Histogram {
        Histogram(base: series(name, help: help, kind: .histogram, buckets: buckets, labels: labels), bounds: buckets)
    }

    private func series(_ name: String, help: String, kind: Kind, buckets: [Double], labels: [(String, String)]) -> Int {
        let labelText = labels.map { "\($0.0)=\"\(escapeLabel($0.1))\"" }.joined(separator: ",")
        let key = name + "{" + labelText + "}"
        return state.withLock { s in
            if let slot = s.seriesIndex[key] { return slot }
            let width = kind == .histogram ? buckets.count + 3 : 1
            precondition(s.nextSlot + width <= capacity, "metric shard capacity exhausted")
            let slot = s.nextSlot
            s.nextSlot += width
            s.seriesIndex[key] = slot
            if let fi = s.familyIndex[name] {
                s.families[fi].series.append((labelText, slot))
            } else {
                s.familyIndex[name] = s.families.count
                s.families.append(Family(name: name, help: help, kind: kind, buckets: buckets, series: [(labelText, slot)]))
            }
            return slot
        }
    }

    /// Sum of every series of a counter or gauge family over all shards (gauges as signed values).
    public func total(_ name: String) -> Int64 {
        state.withLock { s in
            guard let fi = s.familyIndex[name] else { return 0 }
            return s.families[fi].series.reduce(Int64(0)) { acc, series in
                acc &+ Int64(bitPattern: s.shards.reduce(UInt64(0)) { $0 &+ $1.load(series.slot) })
            }
        }
    }

    /// Sum of one slot over all shards.
    public func value(_ slot: Int) -> UInt64 {
        state.withLock { s in s.shards.reduce(0) { $0 &+ $1.load(slot) } }
    }

    /// Prometheus text exposition (version 0.0.4) of every series, merged over the workers' shards.
    /// Runs on the scrape thread; reads shards with relaxed loads and never blocks a worker.
    public func render() -> String {
        let (families, shards) = state.withLock { ($0.families, $0.shards) }
        var out = ""
        out.reserveCapacity(families.count * 256)
        func sum(_ slot: Int) -> UInt64 { shards.reduce(0) { $0 &+ $1.load(slot) } }
        for f in families.sorted(by: { $0.name < $1.name }) {
            out += "# HELP \(f.name) \(f.help)\n# TYPE \(f.name) \(f.kind.rawValue)\n"
            for (labels, slot) in f.series {
                switch f.kind {
                case .counter:
                    out += "\(f.name){\(labels)} \(sum(slot))\n"
                case .gauge:
                    out += "\(f.name){\(labels)} \(Int64(bitPattern: sum(slot)))\n"
                case .histogram:
                    var cumulative: UInt64 = 0
                    let sep = labels.isEmpty ? "" : ","
                    for (i, b) in f.buckets.enumerated() {
                        cumulative &+= sum(slot + i)
                        out += "\(f.name)_bucket{\(labels)\(sep)le=\"\(formatBound(b))\"} \(cumulative)\n"
                    }
                    cumulative &+= sum(slot + f.buckets.count)
                    out += "\(f.name)_bucket{\(labels)\(sep)le=\"+Inf\"} \(cumulative)\n"
                    out += "\(f.name)_sum{\(labels)} \(formatBound(Double(sum(slot + f.buckets.count + 1)) / 1000))\n"
                    out += "\(f.name)_count{\(labels)} \(sum(slot + f.buckets.count + 2))\n"
                }
            }
        }
        return out
    }
}

func escapeLabel(_ s: String) -> String {
    var out = ""
    for c in s {
        switch c {
        case "\\": out += "\\\\"
        case "\"": out += "\\\""
        case "\n": out += "\\n"
        default: out.append(c)
        }
    }
    return out
}

func formatBound(_ b: Double) -> String {
    b == b.rounded() && abs(b) < 1e15 ? String(Int64(b)) : String(b)
}

/// One worker's counters. Single writer (the worker, with plain relaxed stores: no locked instructions on the
/// hot path), any number of readers (the scrape thread, with relaxed loads).
public final class MetricShard: @unchecked Sendable {
    let slots: UnsafeMutablePointer<UInt64>
    let capacity: Int

    init(capacity: Int) {
        self.capacity = capacity
        slots = calloc(capacity, 8)!.assumingMemoryBound(to: UInt64.self)
    }

    deinit { free(slots) }

    @inline(__always)
    public func add(_ slot: Int, _ value: UInt64 = 1) { sl_add_relaxed_u64(slots + slot, value) }

    /// Gauges are stored as two's-complement in a counter slot; each worker's shard holds its own part.
    @inline(__always)
    public func addSigned(_ slot: Int, _ value: Int64) { sl_add_relaxed_u64(slots + slot, UInt64(bitPattern: value)) }

    @inline(__always)
    public func observe(_ h: Histogram, _ value: Double) {
        var i = 0
        while i < h.bounds.count && value > h.bounds[i] { i += 1 }
        add(h.base + i)
        // The sum is kept in thousandths so that sub-unit observations are not lost to rounding.
        add(h.base + h.bounds.count + 1, UInt64(max(0, (value * 1000).rounded())))
        add(h.base + h.bounds.count + 2)
    }

    public func load(_ slot: Int) -> UInt64 { sl_load_relaxed_u64(slots + slot) }
}

public struct Histogram: Sendable {
    public let base: Int
    public let bounds: [Double]
}
