import Foundation
import SluiceModel

/// What an agent serves now, as it answers a ConfigDumpRequest (the JSON in `ConfigDump.snapshot`) and as
/// `sluice proxy-config` shows it: the installed snapshot, the ports its listeners hold, the health of each cluster's
/// endpoints, and the certificates it holds (never their keys).
public struct AgentConfigDump: Sendable, Codable, Equatable {
    public var node: String
    public var agentVersion: String
    /// The mesh revision of the snapshot the agent serves (0 when it serves a local config).
    public var version: Int64
    public var snapshot: NodeSnapshot
    public var listeners: [BoundListener]
    /// Per cluster name, whether each of its endpoints (in the snapshot's order) is taking traffic.
    public var endpointHealth: [String: [Bool]]
    public var secrets: [Secret]

    public struct BoundListener: Sendable, Codable, Equatable {
        public var name: String
        /// The port bound (the snapshot's, or the one the kernel gave for port 0); nil when not bound.
        public var port: UInt16?
        public init(name: String, port: UInt16?) {
            self.name = name
            self.port = port
        }
    }

    /// A certificate the agent holds, as `istioctl proxy-config secret` lists them.
    public struct Secret: Sendable, Codable, Equatable {
        /// The SPIFFE identity, or `ROOTCA` for the trust bundle.
        public var name: String
        /// `Cert Chain` or `CA`.
        public var type: String
        /// ACTIVE when the agent serves it; MISSING when it is wanted but not (yet) obtained.
        public var status: String
        public var valid: Bool
        public var serialNumber: String?
        public var notBefore: Date?
        public var notAfter: Date?

        public init(name: String, type: String, status: String, valid: Bool, serialNumber: String?, notBefore: Date?,
                    notAfter: Date?) {
            self.name = name
            self.type = type
            self.status = status
            self.valid = valid
            self.serialNumber = serialNumber
            self.notBefore = notBefore
            self.notAfter = notAfter
        }
    }

    public init(node: String, agentVersion: String, version: Int64, snapshot: NodeSnapshot, listeners: [BoundListener],
                endpointHealth: [String: [Bool]], secrets: [Secret]) {
        self.node = node
        self.agentVersion = agentVersion
        self.version = version
        self.snapshot = snapshot
        self.listeners = listeners
        self.endpointHealth = endpointHealth
        self.secrets = secrets
    }

    public func encoded() -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        encoder.dateEncodingStrategy = .iso8601
        return (try? encoder.encode(self)) ?? Data()
    }

    public static func decode(_ data: Data) throws -> AgentConfigDump {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return try decoder.decode(AgentConfigDump.self, from: data)
    }
}
