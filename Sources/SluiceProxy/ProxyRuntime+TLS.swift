import SluiceModel
import SluiceTLS

/// A snapshot the data plane cannot serve as it stands (the last good one keeps serving).
public struct RuntimeError: Error, CustomStringConvertible {
    public let description: String
}

extension ProxyRuntime {
    /// Where `credentialName` certificates live: `<dir>/<name>/tls.crt`, `tls.key` and (for MUTUAL) `ca.crt`,
    /// the files of the Kubernetes Secret an Istio gateway would read.
    public static let defaultCredentials = "/etc/sluice/credentials"

    /// A TLS listener's certificates, loaded from their files; nil for plaintext listeners.
    static func certificates(_ l: NodeSnapshot.Listener, directory: String) throws(RuntimeError) -> TLSServerNames? {
        guard !l.tls.isEmpty else { return nil }
        var entries: [TLSServerNames.Entry] = []
        for c in l.tls {
            let dir = c.credentialName.map { "\(directory)/\($0)" }
            guard let chain = c.certificateChain ?? dir.map({ "\($0)/tls.crt" }),
                let key = c.privateKey ?? dir.map({ "\($0)/tls.key" })
            else {
                throw RuntimeError(description: "listener \(l.name): hosts \(c.hosts) have no certificate")
            }
            let ca = c.caCertificates ?? (c.mode == .simple ? nil : dir.map { "\($0)/ca.crt" })
            do {
                let context = try TLSContext(
                    certificateChain: chain, privateKey: key, clientCA: c.mode == .simple ? nil : ca,
                    clientCertificateOptional: c.mode == .optionalMutual, minVersion: version(c.minProtocolVersion),
                    maxVersion: version(c.maxProtocolVersion), cipherSuites: c.cipherSuites,
                    alpn: l.protocol == .http ? ["http/1.1"] : ["h2", "http/1.1"])
                entries.append(.init(hosts: c.hosts, context: context))
            } catch {
                throw RuntimeError(description: "listener \(l.name), hosts \(c.hosts.joined(separator: ",")): \(error)")
            }
        }
        return TLSServerNames(entries)
    }

    private static func version(_ v: ServerTLSSettings.ProtocolVersion?) -> TLSVersion? {
        switch v {
        case .v1_3: return .v1_3
        // Below 1.2 is refused: OpenSSL 3's default security level does not allow it, nor does Sluice.
        case .v1_0, .v1_1, .v1_2: return .v1_2
        case .auto, nil: return nil
        }
    }
}
