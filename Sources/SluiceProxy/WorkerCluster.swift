import SluiceModel
import SluiceRing

/// A worker's private view of one cluster: balancer state, passive outlier detection, active counts. Only the
/// owning worker touches it, so nothing here is locked.
final class WorkerCluster {
    let runtime: ClusterRuntime
    var roundRobin: RoundRobinBalancer
    let random: RandomBalancer
    let leastRequest: LeastRequestBalancer
    var outlier: OutlierDetector?
    var active: [Int]
    var rng: FastRandom
    /// Idle pooled HTTP/1.1 connections per endpoint (slots of the worker's upstream table), most recent last.
    var idle: [[UInt32]]
    /// The worker's HTTP/2 connection per endpoint (shared by all streams routed there).
    var h2: [H2PoolKey: H2Upstream] = [:]
    /// Requests of this worker waiting for a connection while the cluster is at `maxConnections`, oldest first.
    var pending: [(slot: UInt32, generation: UInt32)] = []

    init(runtime: ClusterRuntime, seed: UInt64) {
        self.runtime = runtime
        roundRobin = RoundRobinBalancer(weights: runtime.weights)
        random = RandomBalancer(weights: runtime.weights)
        leastRequest = LeastRequestBalancer(weights: runtime.weights)
        outlier = runtime.config.outlierDetection.map {
            OutlierDetector(settings: $0, endpointCount: runtime.weights.count)
        }
        active = Array(repeating: 0, count: runtime.weights.count)
        idle = Array(repeating: [], count: runtime.weights.count)
        rng = FastRandom(seed: seed)
    }

    /// Picks an endpoint that is healthy, not ejected and not `excluding` (the one that just failed).
    @inline(__always)
    func pick(now: UInt64, clientHash: UInt64, excluding: Int) -> Int? {
        let health = runtime.health
        let outlier = self.outlier
        let available = { (i: Int) -> Bool in
            i != excluding && health.isHealthy(i) && !(outlier?.isEjected(i, now: now) ?? false)
        }
        switch runtime.config.loadBalancer {
        case .consistentHash:
            return runtime.maglev?.pick(hash: clientHash, available)
        case .simple(.random):
            return random.pick(&rng, available)
        case .simple(.leastRequest), .simple(.leastConn):
            let act = active
            return leastRequest.pick(&rng, active: { act[$0] }, available)
        case .simple:
            return roundRobin.pick(available)
        }
    }

    var connectAttempts: Int { min(3, max(1, runtime.weights.count)) }
}
