import Crypto
import Foundation
import SluiceModel

/// The agent stream's port on `sluice control` (gRPC, mutual TLS with the node certificate). The CA and the join
/// stay on 15012: a node joins before it holds a certificate, and gRPC's TLS layer can only require one.
public let agentStreamPort = 15010

/// Names and digests of snapshot items as the agent stream carries them.
public enum Wire {
    /// The largest message the control plane sends an agent (a full snapshot of a node that reaches much of a big
    /// mesh is tens of MiB; gRPC's default limit is 4 MiB).
    public static let maxDeltaBytes = 256 << 20
    /// The largest message an agent may send (its answers are small; a config dump is the largest).
    public static let maxAgentMessageBytes = 16 << 20

    /// `kind/name`: an item's name in digest maps.
    public static func name(_ key: SnapshotItem.Key) -> String { "\(key.kind.wireName)/\(key.name)" }

    public static func key(_ name: String) -> SnapshotItem.Key? {
        guard let slash = name.firstIndex(of: "/"), let kind = SnapshotItem.Kind(wireName: String(name[..<slash])) else {
            return nil
        }
        return SnapshotItem.Key(kind: kind, name: String(name[name.index(after: slash)...]))
    }

    /// SHA-256 of the item's canonical JSON, first 16 bytes in hex: equal digests, equal items.
    public static func digest(_ payload: Data) -> String {
        SHA256.hash(data: payload).prefix(16).map { String(format: "%02x", $0) }.joined()
    }

    public static func meshJSON(_ mesh: MeshConfig) -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        return (try? encoder.encode(mesh)) ?? Data()
    }

    /// Every item's digest by ``name(_:)``, and the mesh settings' digest: what a Hello carries.
    public static func digests(_ snapshot: NodeSnapshot) -> (items: [String: String], mesh: String) {
        var out: [String: String] = [:]
        out.reserveCapacity(snapshot.items.count)
        for item in snapshot.items { out[name(item.key)] = digest(item.payload()) }
        return (out, digest(meshJSON(snapshot.mesh)))
    }

    /// The node a node certificate's SPIFFE ID names (`spiffe://TD/ns/sluice-nodes/sa/NODE`), with its trust domain.
    public static func node(fromIdentity uri: String) -> (trustDomain: String, node: String)? {
        guard uri.hasPrefix("spiffe://") else { return nil }
        let parts = uri.dropFirst("spiffe://".count).split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 5, parts[1] == "ns", parts[2] == "sluice-nodes", parts[3] == "sa", !parts[4].isEmpty else {
            return nil
        }
        return (String(parts[0]), String(parts[4]))
    }
}

extension Sluice_V1_Item {
    public init(_ item: SnapshotItem) {
        self.init()
        kind = item.key.kind.wireName
        name = item.key.name
        payload = item.payload()
        digest = Wire.digest(payload)
    }

    /// The item, checked: its kind is known, it decodes, and its name is the one it carries.
    public func decoded() throws(WireError) -> SnapshotItem {
        guard let k = SnapshotItem.Kind(wireName: kind) else { throw WireError("unknown item kind '\(kind)'") }
        let item: SnapshotItem
        do { item = try SnapshotItem(kind: k, payload: payload) } catch {
            throw WireError("\(kind) \(name) does not decode: \(error)")
        }
        guard item.key.name == name else { throw WireError("\(kind) \(name) carries the item \(item.key.name)") }
        return item
    }
}

public struct WireError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ d: String) { description = d }
}

extension NodeSnapshot {
    /// This snapshot with a pushed delta applied (what the agent serves next). Throws, changing nothing, when any part
    /// of it does not decode.
    public func applying(_ delta: Sluice_V1_Delta) throws(WireError) -> NodeSnapshot {
        var byKey: [SnapshotItem.Key: SnapshotItem] = [:]
        if !delta.replace { for item in items { byKey[item.key] = item } }
        for k in delta.removals {
            guard let kind = SnapshotItem.Kind(wireName: k.kind) else { throw WireError("unknown item kind '\(k.kind)'") }
            byKey[SnapshotItem.Key(kind: kind, name: k.name)] = nil
        }
        for u in delta.upserts {
            let item = try u.decoded()
            byKey[item.key] = item
        }
        var mesh = self.mesh
        if !delta.mesh.isEmpty {
            do { mesh = try JSONDecoder().decode(MeshConfig.self, from: delta.mesh) } catch {
                throw WireError("the mesh settings do not decode: \(error)")
            }
        }
        return NodeSnapshot(node: node, mesh: mesh, items: byKey.values)
    }
}
