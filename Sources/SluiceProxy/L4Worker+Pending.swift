/// Requests waiting for an upstream connection while their cluster is at `maxConnections` (Envoy's pending
/// requests, Istio's `http1MaxPendingRequests`, unlimited by default). A waiting request holds no connection and
/// no buffer; it is served, oldest first, when one of this worker's connections to the cluster goes idle or
/// closes, and on the worker's tick (a connection freed by another worker), or ends with its route's timeout.
extension L4Worker {
    /// Queues the exchange of `slot` on `wc`; false when the queue is full (the caller answers 503 overflow).
    func enqueuePending(_ slot: UInt32, _ wc: WorkerCluster) -> Bool {
        let i = Int(slot)
        let limit = wc.runtime.config.httpPool?.http1MaxPendingRequests.flatMap { $0 > 0 ? $0 : nil } ?? Int.max
        guard wc.runtime.pendingRequests.add(1) < Int64(limit) else {
            wc.runtime.pendingRequests.add(-1)
            return false
        }
        hconns[i].ex!.queued = true
        // No attempt was made: the next dispatch is not a retry that should avoid this endpoint.
        hconns[i].ex!.lastEndpoint = -1
        wc.pending.append((slot, hconns[i].generation))
        return true
    }

    /// Dispatches waiting requests of the clusters that freed a connection, while capacity lasts.
    func servePending() {
        while let wc = pendingWake.popLast() {
            while let w = wc.pending.first {
                let i = Int(w.slot)
                guard hconns[i].generation == w.generation, hconns[i].phase == .open, let ex = hconns[i].ex, ex.queued,
                    ex.cluster === wc
                else {
                    wc.pending.removeFirst()
                    continue
                }
                let canOpen = wc.runtime.config.maxConnections.map { wc.runtime.active.current < Int64($0) } ?? true
                guard canOpen || wc.idle.contains(where: { !$0.isEmpty }) else { break }
                wc.pending.removeFirst()
                ex.queued = false
                wc.runtime.pendingRequests.add(-1)
                dispatch(w.slot)
            }
        }
    }

    /// Whether a connection to `wc` should close rather than idle in this worker's pool: the cluster is at its
    /// connection limit and requests wait on another worker, which can open one only once this one is gone.
    func neededElsewhere(_ wc: WorkerCluster) -> Bool {
        wc.pending.isEmpty && wc.runtime.config.maxConnections != nil && wc.runtime.pendingRequests.current > 0
    }

    /// From the tick: idle connections another worker's waiting requests need are closed, and this worker's
    /// waiting requests take connections other workers freed.
    func retryPending() {
        for wc in clusters.values {
            if neededElsewhere(wc) {
                for e in wc.idle.indices {
                    for u in wc.idle[e] where ups[Int(u)].phase == .idle { stopUp(u) }
                    wc.idle[e].removeAll()
                }
            }
            if !wc.pending.isEmpty { pendingWake.append(wc) }
        }
        servePending()
    }
}
