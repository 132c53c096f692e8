/// Compiles a whole configuration into one node's snapshot in one call: a ``MeshCompiler`` that is used once.
/// Agents reading `--local-config` use this; the control plane keeps a ``MeshCompiler`` to serve deltas.
public struct SnapshotCompiler: Sendable {
    public var node: String

    public init(node: String = "local") {
        self.node = node
    }

    public func compile(_ resources: [Resource]) throws(ConfigErrors) -> NodeSnapshot {
        try MeshCompiler(resources).snapshot(for: node)
    }
}
