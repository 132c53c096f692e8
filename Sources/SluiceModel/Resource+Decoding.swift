/// Decodes Istio and Sluice resources from YAML (multi-document) or JSON text.
public enum ResourceDecoder {
    /// Largest file accepted; a mesh's config is split over many files long before this.
    public static let maxFileBytes = 16 << 20

    static let networkingVersions: Set<String> = [
        "networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3",
    ]
    static let sluiceVersions: Set<String> = ["sluice.dev/v1"]
    static let securityVersions: Set<String> = ["security.istio.io/v1", "security.istio.io/v1beta1"]

    /// Decodes every document of `text`. Returns the resources that decoded without errors and all diagnostics.
    public static func decode(_ text: String, file: String) -> (resources: [Resource], diagnostics: [Diagnostic]) {
        guard text.utf8.count <= maxFileBytes else {
            return ([], [Diagnostic(.error, file: file, line: nil, resource: nil, path: "",
                                    message: "file is larger than \(maxFileBytes >> 20) MiB",
                                    hint: "split the configuration into several files")])
        }
        var resources: [Resource] = []
        var diagnostics: [Diagnostic] = []
        do {
            try YAMLTree.documents(text) { doc in
                let sink = DiagnosticSink(file: file)
                if let r = decodeDocument(doc, sink: sink), !sink.hasErrors { resources.append(r) }
                diagnostics += sink.diagnostics
            }
        } catch {
            diagnostics.append(Diagnostic(.error, file: file, line: error.line, resource: nil, path: "",
                                          message: "not valid YAML: \(error.message)"))
        }
        return (resources, diagnostics)
    }

    static func decodeDocument(_ node: YAMLNode, sink: DiagnosticSink) -> Resource? {
        let root = YAMLReader(node: node, path: "", sink: sink)
        if let s = node.scalar, s.isEmpty || s == "null" { return nil }  // empty document
        guard root.expectMapping() else { return nil }
        root.checkKeys(["apiVersion", "kind", "metadata", "spec", "status"])
        guard let apiVersion = root.requiredString("apiVersion", hint: "e.g. networking.istio.io/v1"),
            let kindText = root.requiredString("kind")
        else { return nil }
        let meta = decodeMeta(root.child("metadata"), sink: sink)
        sink.resource = "\(kindText) \(meta?.namespace ?? "default")/\(meta?.name ?? "?")"
        guard let kind = ResourceKind(rawValue: kindText) else {
            sink.warning("kind", root.child("kind")?.line,
                         "kind '\(kindText)' is not supported yet and is ignored",
                         hint: "supported kinds: \(ResourceKind.allCases.map(\.rawValue).joined(separator: ", "))",
                         code: .unknownField)
            return nil
        }
        let expectedVersions: Set<String> = switch kind {
        case .healthCheck, .rateLimitPolicy, .meshConfig: sluiceVersions
        case .authorizationPolicy, .peerAuthentication, .requestAuthentication: securityVersions
        default: networkingVersions
        }
        guard expectedVersions.contains(apiVersion) else {
            sink.error("apiVersion", root.child("apiVersion")?.line,
                       "apiVersion '\(apiVersion)' does not define \(kindText)",
                       hint: "use \(expectedVersions.sorted().first!)")
            return nil
        }
        guard let meta else { return nil }
        guard let spec = root.child("spec"), spec.expectMapping() else {
            sink.error("spec", root.line, "required field 'spec' is missing or not a mapping")
            return nil
        }
        let decoded: Resource.Spec?
        switch kind {
        case .gateway: decoded = Gateway.decode(spec).map { .gateway($0) }
        case .virtualService: decoded = VirtualService.decode(spec).map { .virtualService($0) }
        case .destinationRule: decoded = DestinationRule.decode(spec).map { .destinationRule($0) }
        case .serviceEntry: decoded = ServiceEntry.decode(spec).map { .serviceEntry($0) }
        case .workloadEntry: decoded = WorkloadEntry.decode(spec).map { .workloadEntry($0) }
        case .healthCheck: decoded = HealthCheck.decode(spec).map { .healthCheck($0) }
        case .authorizationPolicy: decoded = AuthorizationPolicy.decode(spec).map { .authorizationPolicy($0) }
        case .peerAuthentication: decoded = PeerAuthentication.decode(spec).map { .peerAuthentication($0) }
        case .requestAuthentication: decoded = RequestAuthentication.decode(spec).map { .requestAuthentication($0) }
        case .rateLimitPolicy: decoded = RateLimitPolicy.decode(spec).map { .rateLimitPolicy($0) }
        case .meshConfig: decoded = MeshConfig.decode(spec).map { .meshConfig($0) }
        }
        guard let decoded else { return nil }
        return Resource(metadata: meta, spec: decoded, source: SourceLocation(file: sink.file, line: node.line))
    }

    static func decodeMeta(_ r: YAMLReader?, sink: DiagnosticSink) -> ObjectMeta? {
        guard let r, r.expectMapping() else {
            sink.error("metadata", nil, "required field 'metadata' is missing", hint: "add metadata.name")
            return nil
        }
        r.checkKeys(["name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
                     "creationTimestamp"])
        guard let name = r.requiredString("name") else { return nil }
        if !isDNSLabel(name, maxLength: 253, allowDots: true) {
            sink.error("metadata.name", r.child("name")?.line, "'\(name)' is not a valid name",
                       hint: "use lower-case letters, digits, '-' and '.'")
        }
        let ns = r.string("namespace") ?? "default"
        return ObjectMeta(name: name, namespace: ns, labels: r.stringMap("labels"),
                          annotations: r.stringMap("annotations"))
    }
}

func isDNSLabel(_ s: String, maxLength: Int, allowDots: Bool) -> Bool {
    guard !s.isEmpty, s.utf8.count <= maxLength else { return false }
    for c in s.utf8 {
        let ok = (c >= 97 && c <= 122) || (c >= 48 && c <= 57) || c == 45 || (allowDots && c == 46)
        if !ok { return false }
    }
    return s.utf8.first != 45 && s.utf8.last != 45
}

/// Hosts in Istio: FQDN or short name, optional leading `*.` wildcard, or `*`.
func isValidHost(_ host: String) -> Bool {
    if host == "*" { return true }
    var h = Substring(host)
    if h.hasPrefix("*.") { h = h.dropFirst(2) }
    guard !h.isEmpty, h.utf8.count <= 253 else { return false }
    for label in h.split(separator: ".", omittingEmptySubsequences: false) {
        guard !label.isEmpty, label.utf8.count <= 63 else { return false }
        for c in label.utf8 {
            let ok = (c >= 97 && c <= 122) || (c >= 65 && c <= 90) || (c >= 48 && c <= 57) || c == 45 || c == 95
            if !ok { return false }
        }
    }
    return true
}
