/// TLS as Istio configures it: what a client (DestinationRule `trafficPolicy.tls`) or a gateway server
/// (`servers[].tls`) presents and expects.

/// DestinationRule `tls`: how connections to the destination are secured.
public struct ClientTLSSettings: Sendable, Hashable, Codable {
    public enum Mode: String, Sendable, Hashable, Codable {
        case disable = "DISABLE", simple = "SIMPLE", mutual = "MUTUAL", istioMutual = "ISTIO_MUTUAL"
    }
    public var mode: Mode
    public var credentialName: String?
    public var clientCertificate: String?
    public var privateKey: String?
    public var caCertificates: String?
    public var subjectAltNames: [String]
    public var sni: String?
    public var insecureSkipVerify: Bool
}

/// Gateway `servers[].tls`: what the gateway terminates or passes through.
public struct ServerTLSSettings: Sendable, Hashable, Codable {
    public enum Mode: String, Sendable, Hashable, Codable {
        case passthrough = "PASSTHROUGH", simple = "SIMPLE", mutual = "MUTUAL", autoPassthrough = "AUTO_PASSTHROUGH"
        case istioMutual = "ISTIO_MUTUAL", optionalMutual = "OPTIONAL_MUTUAL"
    }
    public enum ProtocolVersion: String, Sendable, Hashable, Codable {
        case auto = "TLS_AUTO", v1_0 = "TLSV1_0", v1_1 = "TLSV1_1", v1_2 = "TLSV1_2", v1_3 = "TLSV1_3"
    }
    public var mode: Mode
    public var httpsRedirect: Bool
    public var credentialName: String?
    public var serverCertificate: String?
    public var privateKey: String?
    public var caCertificates: String?
    public var subjectAltNames: [String]
    public var minProtocolVersion: ProtocolVersion?
    public var maxProtocolVersion: ProtocolVersion?
    public var cipherSuites: [String]
}

extension ClientTLSSettings {
    static func decode(_ r: YAMLReader) -> ClientTLSSettings? {
        guard r.expectMapping() else { return nil }
        r.checkKeys(["mode", "credentialName", "clientCertificate", "privateKey", "caCertificates", "subjectAltNames",
                     "sni", "insecureSkipVerify", "caCrl"])
        let s = ClientTLSSettings(
            mode: r.enumValue("mode", Mode.self) ?? .disable, credentialName: r.string("credentialName"),
            clientCertificate: r.string("clientCertificate"), privateKey: r.string("privateKey"),
            caCertificates: r.string("caCertificates"), subjectAltNames: r.strings("subjectAltNames"),
            sni: r.string("sni"), insecureSkipVerify: r.bool("insecureSkipVerify") ?? false)
        // The proxy does not originate TLS yet: accepting SIMPLE or MUTUAL would send the bytes in plaintext to a
        // destination the user asked to reach encrypted.
        if s.mode == .simple || s.mode == .mutual {
            r.sink.error("\(r.path).mode", r.child("mode")?.line ?? r.line,
                         "tls mode \(s.mode.rawValue) is refused: this version of Sluice does not originate TLS, and "
                             + "the connection would leave in plaintext",
                         hint: "let the application speak TLS itself (the bytes pass through as TCP), or use "
                             + "ISTIO_MUTUAL for mesh workloads")
        }
        r.refuseUnenforced(["subjectAltNames", "caCrl"],
                           hint: "mesh endpoints are verified against the identity of their serviceAccount")
        r.notEnforced(["sni", "insecureSkipVerify"])
        if s.mode == .mutual && s.credentialName == nil && (s.clientCertificate == nil || s.privateKey == nil) {
            r.sink.error("\(r.path).mode", r.child("mode")?.line ?? r.line,
                         "MUTUAL needs the client's certificate and key",
                         hint: "set credentialName, or clientCertificate and privateKey")
        }
        if s.credentialName != nil && (s.clientCertificate != nil || s.privateKey != nil || s.caCertificates != nil) {
            r.sink.error(r.path, r.line, "credentialName and clientCertificate/privateKey/caCertificates are mutually exclusive")
        }
        if s.mode == .istioMutual && (s.clientCertificate != nil || s.privateKey != nil) {
            r.sink.error("\(r.path).mode", r.line, "ISTIO_MUTUAL uses the workload's mesh certificate; drop clientCertificate and privateKey")
        }
        return s
    }
}

extension ServerTLSSettings {
    static func decode(_ r: YAMLReader, port: Gateway.Port) -> ServerTLSSettings? {
        guard r.expectMapping() else { return nil }
        r.checkKeys(["mode", "httpsRedirect", "credentialName", "serverCertificate", "privateKey", "caCertificates",
                     "subjectAltNames", "minProtocolVersion", "maxProtocolVersion", "cipherSuites", "caCrl",
                     "verifyCertificateSpki", "verifyCertificateHash", "credentialNames"])
        let s = ServerTLSSettings(
            mode: r.enumValue("mode", Mode.self) ?? .passthrough, httpsRedirect: r.bool("httpsRedirect") ?? false,
            credentialName: r.string("credentialName"), serverCertificate: r.string("serverCertificate"),
            privateKey: r.string("privateKey"), caCertificates: r.string("caCertificates"),
            subjectAltNames: r.strings("subjectAltNames"),
            minProtocolVersion: r.enumValue("minProtocolVersion", ProtocolVersion.self),
            maxProtocolVersion: r.enumValue("maxProtocolVersion", ProtocolVersion.self),
            cipherSuites: r.strings("cipherSuites"))
        // Each narrows which clients or certificates are accepted: not applying one would accept more than asked.
        r.refuseUnenforced(["subjectAltNames", "caCrl", "verifyCertificateSpki", "verifyCertificateHash", "credentialNames"],
                           hint: "credentialNames: use credentialName")
        let terminates = s.mode == .simple || s.mode == .mutual || s.mode == .optionalMutual
        if terminates && s.credentialName == nil && (s.serverCertificate == nil || s.privateKey == nil) {
            r.sink.error("\(r.path).mode", r.child("mode")?.line ?? r.line,
                         "\(s.mode.rawValue) terminates TLS and needs the server's certificate and key",
                         hint: "set credentialName, or serverCertificate and privateKey")
        }
        if (s.mode == .mutual) && s.credentialName == nil && s.caCertificates == nil {
            r.sink.error("\(r.path).caCertificates", r.line, "MUTUAL needs caCertificates to verify clients",
                         hint: "set caCertificates, or a credentialName whose secret holds the CA")
        }
        if let lo = s.minProtocolVersion, let hi = s.maxProtocolVersion, lo != .auto, hi != .auto,
            lo.rawValue > hi.rawValue
        {
            r.sink.error("\(r.path).minProtocolVersion", r.line, "minProtocolVersion is above maxProtocolVersion")
        }
        if s.httpsRedirect && port.protocol != .http {
            r.sink.warning("\(r.path).httpsRedirect", r.line, "httpsRedirect applies to HTTP servers only",
                          code: .ineffectiveSetting)
        }
        return s
    }
}
