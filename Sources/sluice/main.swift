import ArgumentParser
import Foundation
import Logging
import SluiceAgent
import SluiceBPF
import SluiceControl
import SluiceModel


struct Sluice: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "sluice",
        abstract: "A kernel-assisted, per-node service mesh.",
        subcommands: [AgentCommand.self, ControlCommand.self, ValidateCommand.self, CompileCommand.self, ApplyCommand.self,
                      GetCommand.self, DeleteCommand.self, DiffCommand.self, StatusCommand.self, ProxyConfigCommand.self, AnalyzeCommand.self, WorkloadCommand.self])
}

struct AgentCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "agent", abstract: "Run the node agent.")

    @Option(name: .customLong("local-config"), help: "Directory of Istio YAML to serve (mesh config from files).")
    var localConfig: String?
    @Option(help: "Control plane address HOST:15012: certificates come from its CA and, without --local-config, the mesh from its agent stream.")
    var control: String?
    @Option(name: .customLong("stream-port"), help: "The control plane's agent stream port (gRPC, mutual TLS; same host as --control).")
    var streamPort: Int = 15010
    @Option(name: .customLong("trust-domain"), help: "The mesh's trust domain, until the control plane sends one (with --control).")
    var trustDomain = "cluster.local"
    @Option(help: "Directory of WorkloadEntry YAML for this host's workloads (sluice workload add writes it), registered with the control plane.")
    var workloads: String?
    @Option(name: .customLong("ca-root"), help: "The mesh root (PEM) the control plane's certificate chains to (with --control).")
    var caRoot: String?
    @Option(name: .customLong("join-token"), help: "File with this node's one-time join token (with --control).")
    var joinToken: String?
    @Option(name: .customLong("control-server-name"), help: "The name in the control plane's certificate.")
    var controlServerName = "sluice-control"
    @Option(name: .customLong("jwks-ca"), help: "PEM file of extra roots to trust when fetching RequestAuthentication jwksUri sets (besides the system's).")
    var jwksCA: String?
    @Option(name: .customLong("jwks-refresh"), help: "How often remote JWKS are fetched again (Istio duration, default 5m).")
    var jwksRefresh: String = "5m"
    @Option(name: .customLong("tunnel-port"), help: "HBONE port: where this agent accepts mutual-TLS tunnels and reaches other nodes' agents (with --control).")
    var tunnelPort: UInt16 = 15008
    @Option(help: "This node's name.") var node: String?
    @Option(help: "Data-plane worker threads (default: one per core).") var workers: Int?
    @Option(name: .customLong("state-dir"), help: "Where the agent keeps its state.") var stateDir: String = "/var/lib/sluice"
    @Option(help: "Admin address.") var admin: String = "127.0.0.1:15000"
    @Option(help: "Prometheus metrics address.") var metrics: String = "0.0.0.0:15020"
    @Option(help: "Readiness address (/healthz/ready).") var readiness: String = "0.0.0.0:15021"
    @Option(name: .customLong("drain-timeout"), help: "How long open connections may finish after SIGTERM.")
    var drainTimeout: String = "5s"
    @Option(name: .customLong("max-connections"), help: "Open connections per listener.") var maxConnections: Int = 1 << 20
    @Option(name: .customLong("buffer-size"), help: "Bytes per receive buffer (data-plane tuning).")
    var bufferSize: Int = 64 << 10
    @Option(name: .customLong("buffers"), help: "Receive buffers per worker, a power of two (data-plane tuning).")
    var buffers: Int = 256
    @Option(name: .customLong("max-request-head-bytes"), help: "Largest HTTP/1.1 request head (431 beyond).")
    var maxRequestHeadBytes: Int = 16 << 10
    @Option(name: .customLong("max-request-headers"), help: "Most header fields in an HTTP/1.1 request (431 beyond).")
    var maxRequestHeaders: Int = 100
    @Option(name: .customLong("max-uri-bytes"), help: "Longest HTTP/1.1 request target (414 beyond).")
    var maxURIBytes: Int = 8 << 10
    @Option(name: .customLong("header-timeout"), help: "Time a client has to send a whole request head (slowloris).")
    var headerTimeout: String = "10s"
    @Option(name: .customLong("credentials-dir"),
            help: "Gateway certificates named by credentialName: <dir>/<name>/tls.crt, tls.key and ca.crt.")
    var credentialsDir: String = Agent.defaultCredentials
    @Option(name: .customLong("log-level"), help: "trace, debug, info, warning, error.") var logLevel: String = "info"
    @Option(help: "The workloads' cgroup2 directory (absolute, or relative to the cgroup2 mount): capture and balance its connections with BPF.")
    var cgroup: String?
    @Option(name: .customLong("bpf-dir"), help: "Directory of the BPF objects (default: beside the build, then /usr/lib/sluice/bpf).")
    var bpfDir: String?
    @Option(name: .customLong("pin-dir"), help: "bpffs directory for Sluice's pinned programs and maps.")
    var pinDir: String = "/sys/fs/bpf/sluice"
    @Option(name: .customLong("exclude"), parsing: .singleValue, help: "An IPv4 address or CIDR never to capture (repeatable).")
    var exclude: [String] = []
    @Option(name: .customLong("outbound-port"), help: "Port of the agent's listener for captured connections (127.0.0.1).")
    var outboundPort: UInt16 = 15001
    @Option(name: .customLong("dns-port"), help: "Port of the agent's DNS listener for captured queries (127.0.0.1); 0: leave DNS alone.")
    var dnsPort: UInt16 = 15053
    @Option(name: .customLong("dns-upstream"), help: "Resolver for names outside the mesh, HOST:PORT (default: /etc/resolv.conf).")
    var dnsUpstream: String?
    @Flag(name: .customLong("uninstall-bpf"), help: "Detach and unpin Sluice's BPF programs and maps, then exit.")
    var uninstallBPF = false

    func validate() throws {
        if uninstallBPF { return }
        if localConfig == nil && control == nil {
            throw ValidationError("give --local-config DIR (the mesh from files) or --control HOST:15012 (the mesh from the control plane)")
        }
        if let control, EndpointAddress(parsing: control) == nil && !control.contains(":") {
            throw ValidationError("--control '\(control)' is not HOST:PORT")
        }
        if !(1...65535).contains(streamPort) { throw ValidationError("--stream-port must be 1...65535") }
        if workloads != nil && (control == nil || localConfig != nil) {
            throw ValidationError("--workloads registers workloads with the control plane: it needs --control and no --local-config")
        }
        if let u = dnsUpstream, EndpointAddress(parsing: u) == nil {
            throw ValidationError("--dns-upstream '\(u)' is not HOST:PORT")
        }
        if let w = workers, !(1...256).contains(w) { throw ValidationError("--workers must be between 1 and 256") }
        if parseIstioDuration(drainTimeout) == nil { throw ValidationError("--drain-timeout '\(drainTimeout)' is not a duration like 5s") }
        if maxConnections < 1 { throw ValidationError("--max-connections must be positive") }
        if !(4096...(16 << 20)).contains(bufferSize) { throw ValidationError("--buffer-size must be 4096...16777216") }
        if !(1024...(1 << 20)).contains(maxRequestHeadBytes) {
            throw ValidationError("--max-request-head-bytes must be 1024...1048576")
        }
        if !(1...10_000).contains(maxRequestHeaders) { throw ValidationError("--max-request-headers must be 1...10000") }
        if !(64...(1 << 20)).contains(maxURIBytes) || maxURIBytes >= maxRequestHeadBytes {
            throw ValidationError("--max-uri-bytes must be 64...1048576 and below --max-request-head-bytes")
        }
        if control != nil && caRoot == nil {
            throw ValidationError("--control needs --ca-root: the mesh root the control plane's certificate chains to")
        }
        guard let r = parseIstioDuration(jwksRefresh), r > .zero else {
            throw ValidationError("--jwks-refresh '\(jwksRefresh)' is not a positive duration (e.g. 5m)")
        }
        guard let t = parseIstioDuration(headerTimeout), t > .zero else {
            throw ValidationError("--header-timeout must be a duration such as 10s or 500ms")
        }
        if !(8...32768).contains(buffers) || buffers.nonzeroBitCount != 1 {
            throw ValidationError("--buffers must be a power of two between 8 and 32768")
        }
    }

    func run() throws {
        if uninstallBPF {
            do {
                try Datapath.uninstall(pinDirectory: pinDir)
            } catch {
                FileHandle.standardError.write(Data("sluice agent: \(error)\n".utf8))
                throw ExitCode(1)
            }
            print("removed Sluice's BPF programs and maps from \(pinDir)")
            return
        }
        Agent.blockTerminationSignals()
        let logger = startLogging(logLevel, label: "sluice.agent")
        var options = Agent.Options(localConfig: localConfig, node: node, workers: workers ?? Agent.defaultWorkers,
                                    metricsAddress: metrics, readinessAddress: readiness, adminAddress: admin,
                                    drainTimeout: parseIstioDuration(drainTimeout)!,
                                    connectionLimit: maxConnections, bufferCount: UInt16(buffers),
                                    bufferSize: bufferSize)
        options.cgroup = cgroup
        options.maxRequestHeadBytes = maxRequestHeadBytes
        options.maxRequestHeaders = maxRequestHeaders
        options.maxURIBytes = maxURIBytes
        options.headerTimeout = parseIstioDuration(headerTimeout)!
        options.credentialsDirectory = credentialsDir
        options.jwksTrust = jwksCA
        options.jwksRefresh = parseIstioDuration(jwksRefresh)!
        if let control {
            var c = CertificateManager.Options(control: control, rootCA: caRoot!, joinToken: joinToken, node: "",
                                               trustDomain: "", directory: stateDir + "/certs")
            c.serverName = controlServerName
            options.certificates = c
            let host = String(control[..<(control.lastIndex(of: ":") ?? control.endIndex)])
            options.control = .init(host: host, port: streamPort, serverName: controlServerName, rootCA: caRoot!,
                                    trustDomain: trustDomain)
            options.control?.workloadsDirectory = workloads
            options.tunnelPort = tunnelPort
        }
        options.bpfDirectory = bpfDir
        options.pinDirectory = pinDir
        options.captureExclusions = exclude
        options.outboundPort = outboundPort
        options.dnsPort = dnsPort
        options.dnsUpstream = dnsUpstream.flatMap(EndpointAddress.init(parsing:))
        options.stateDirectory = stateDir
        let agent = Agent(options: options, logger: logger)
        do {
            try agent.start()
        } catch {
            for line in "\(error)".split(separator: "\n") {
                FileHandle.standardError.write(Data("sluice agent: \(line)\n".utf8))
            }
            throw ExitCode(1)
        }
        agent.runUntilSignal()
    }
}

struct ValidateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "validate", abstract: "Check mesh configuration offline.")
    @Option(name: .shortAndLong, help: "File or directory of YAML.") var file: String

    func run() throws {
        let loaded = ConfigLoader.load(path: file)
        var diagnostics = loaded.diagnostics
        if loaded.errors.isEmpty {
            do { diagnostics += try MeshCompiler(loaded.resources).warnings } catch { diagnostics += error.diagnostics }
        }
        for d in diagnostics { print(d) }
        let errors = diagnostics.filter { $0.severity == .error }.count
        print("\(loaded.resources.count) resources, \(errors) errors, \(diagnostics.count - errors) warnings")
        if errors > 0 { throw ExitCode(1) }
    }
}

struct CompileCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "compile", abstract: "Print the snapshot one node's agent would serve, as canonical JSON.")
    @Option(name: .shortAndLong, help: "File or directory of YAML.") var file: String
    @Option(help: "The node, as WorkloadEntry annotations `sluice.dev/node` name it.") var node: String

    func run() throws {
        let loaded = ConfigLoader.load(path: file)
        var diagnostics = loaded.diagnostics
        var snapshot: NodeSnapshot?
        if loaded.errors.isEmpty {
            do {
                let compiler = try MeshCompiler(loaded.resources)
                diagnostics += compiler.warnings
                snapshot = compiler.snapshot(for: node)
            } catch {
                diagnostics += error.diagnostics
            }
        }
        for d in diagnostics { FileHandle.standardError.write(Data("\(d)\n".utf8)) }
        guard let snapshot else { throw ExitCode(1) }
        FileHandle.standardOutput.write(snapshot.canonicalJSON(pretty: true))
        FileHandle.standardOutput.write(Data("\n".utf8))
    }
}

Sluice.main()

struct ControlCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "control",
        abstract: "Run the control plane: the mesh CA (15012), the agent stream (15010) and the config API (15017).")
    @Option(name: .customLong("trust-domain"), help: "The mesh's SPIFFE trust domain.") var trustDomain = "cluster.local"
    @Option(help: "Address to serve on (TLS).") var listen = "0.0.0.0:15012"
    @Option(name: .customLong("state-dir"), help: "Where the root CA (if generated) and the serving certificate are kept.")
    var stateDir = "/var/lib/sluice-control"
    @Option(help: "Istio YAML to apply to the store at start (objects created, or replaced where they differ).")
    var config: String?
    @Option(help: "Where the mesh is kept: sqlite:PATH[?sync=full] (default sqlite:STATE_DIR/mesh.db).") var store: String?
    @Option(help: "Address of the config API (HTTPS, Kubernetes conventions; kubectl works with STATE_DIR/admin.kubeconfig).")
    var api = "0.0.0.0:15017"
    @Option(help: "Address of the agent stream (gRPC, mutual TLS with node certificates).") var stream = "0.0.0.0:15010"
    @Option(name: .customLong("cleanup-grace"), help: "How long a node may be offline before the workloads it registered are removed.")
    var cleanupGrace = "10s"
    @Option(help: "File of TOKEN,NAME,ROLE lines (role admin or view; a spiffe:// ID instead of a token grants a mesh certificate).")
    var tokens: String?
    @Option(name: .customLong("join-tokens"), help: "File of 'TOKEN NODE' lines; each token admits its node once.")
    var joinTokens: String?
    @Option(name: .customLong("ca-dir"), help: "Plug-in CA (Istio's cacerts): ca-cert.pem, ca-key.pem, root-cert.pem[, cert-chain.pem].")
    var caDir: String?
    @Option(name: .customLong("max-cert-lifetime"), help: "Longest certificate the CA issues.") var maxCertLifetime = "24h"
    @Option(help: "Prometheus metrics address (sluice_ca_requests_total).") var metrics = "127.0.0.1:15014"
    @Option(name: .customLong("log-level"), help: "trace, debug, info, warning, error.") var logLevel: String = "info"

    func validate() throws {
        guard let d = parseIstioDuration(maxCertLifetime), d >= .seconds(1) else {
            throw ValidationError("--max-cert-lifetime must be a duration of at least 1s, such as 24h")
        }
        guard let g = parseIstioDuration(cleanupGrace), g >= .zero else {
            throw ValidationError("--cleanup-grace must be a duration such as 10s")
        }
    }

    func run() throws {
        Agent.blockTerminationSignals()
        let logger = startLogging(logLevel, label: "sluice.control")
        var o = ControlPlane.Options()
        o.trustDomain = trustDomain
        o.listen = listen
        o.stateDirectory = stateDir
        o.config = config
        o.store = store
        o.api = api
        o.stream = stream
        o.cleanupGrace = parseIstioDuration(cleanupGrace)!
        o.tokens = tokens
        o.joinTokens = joinTokens
        o.caDirectory = caDir
        o.maxCertificateLifetime = parseIstioDuration(maxCertLifetime)!
        let control: ControlPlane
        do {
            control = try ControlPlane(options: o, logger: logger)
        } catch {
            FileHandle.standardError.write(Data("sluice control: \(error)\n".utf8))
            throw ExitCode(1)
        }
        let endpoints = HTTPEndpoints()
        do {
            _ = try endpoints.serve(metrics) { [service = control.service] _, path in
                path == "/metrics" ? (200, "text/plain; version=0.0.4; charset=utf-8", service.renderMetrics()) : nil
            }
        } catch {
            FileHandle.standardError.write(Data("sluice control: \(error)\n".utf8))
            throw ExitCode(1)
        }
        _ = Agent.waitForTerminationSignal()
        logger.info("stopping")
        endpoints.shutdown()
        control.stop()
    }
}

/// logfmt to standard error at `level` (trace ... error); returns the command's logger.
func startLogging(_ level: String, label: String) -> Logger {
    let minimum = Logger.Level(rawValue: level) ?? .info
    LoggingSystem.bootstrap { label in
        var h = LogfmtHandler(label: label)
        h.logLevel = minimum
        return h
    }
    return Logger(label: label)
}

// MARK: - the config API's client verbs (kubectl's habits)

struct ClientOptions: ParsableArguments {
    @Option(help: "kubeconfig to use (default: $KUBECONFIG, /var/lib/sluice-control/admin.kubeconfig, ~/.kube/config).")
    var kubeconfig: String?
    @Option(help: "The config API's URL (https://HOST:15017), instead of the kubeconfig's.") var server: String?
    @Option(help: "Bearer token for the config API.") var token: String?
    @Option(name: .customLong("certificate-authority"), help: "PEM file of the roots the API's certificate chains to.")
    var certificateAuthority: String?
    @Option(name: .shortAndLong, help: "Namespace for objects that name none (default: the kubeconfig context's).")
    var namespace: String?

    /// The CLI bound to the API these options name; exits 1 with the reason when they name none.
    func cli() throws -> CLI {
        let scratch = NSTemporaryDirectory() + "sluice-cli-\(getpid())"
        try? FileManager.default.createDirectory(atPath: scratch, withIntermediateDirectories: true,
                                                 attributes: [.posixPermissions: 0o700])
        atexit { try? FileManager.default.removeItem(atPath: NSTemporaryDirectory() + "sluice-cli-\(getpid())") }
        do {
            let endpoint = try APIEndpoint.resolve(kubeconfig: kubeconfig, server: server, token: token,
                                                   certificateAuthority: certificateAuthority, scratch: scratch)
            return CLI(client: try APIClient(endpoint), namespace: namespace)
        } catch {
            FileHandle.standardError.write(Data("error: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}

func readObjects(_ path: String) throws -> [(object: JSONValue, file: String)] {
    do { return try CLI.objects(from: path) } catch {
        FileHandle.standardError.write(Data("error: \(error)\n".utf8))
        throw ExitCode(1)
    }
}

struct ApplyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "apply", abstract: "Create or update mesh configuration from files (as kubectl apply).")
    @OptionGroup var client: ClientOptions
    @Option(name: .shortAndLong, help: "File or directory of YAML, or - for standard input.") var filename: String
    @Option(name: .customLong("dry-run"), help: "server: validate against the stored mesh and change nothing.")
    var dryRun: String?

    func validate() throws {
        if let d = dryRun, !["server", "none"].contains(d) { throw ValidationError("--dry-run must be server or none") }
    }

    func run() throws {
        let status = try client.cli().apply(try readObjects(filename), dryRun: dryRun == "server")
        if status != 0 { throw ExitCode(status) }
    }
}

struct GetCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "get", abstract: "Show mesh configuration (as kubectl get).")
    @OptionGroup var client: ClientOptions
    @Argument(help: "Kind (virtualservice, vs, dr, se, we, gw, ap, pa, ra, ...), then names.") var words: [String]
    @Flag(name: [.customShort("A"), .customLong("all-namespaces")], help: "Every namespace.") var allNamespaces = false
    @Option(name: [.customShort("l"), .customLong("selector")], help: "Label selector.") var selector: String?
    @Option(name: .shortAndLong, help: "yaml, json, wide or name (default: a table).") var output: String?

    func validate() throws {
        if words.isEmpty { throw ValidationError("name a kind: sluice get virtualservices") }
        if let o = output, CLI.Output(rawValue: o) == nil { throw ValidationError("-o must be yaml, json, wide or name") }
    }

    func run() throws {
        let status = try client.cli().get(kind: words[0], names: Array(words.dropFirst()), allNamespaces: allNamespaces,
                                          labelSelector: selector, output: output.flatMap(CLI.Output.init) ?? .table)
        if status != 0 { throw ExitCode(status) }
    }
}

struct DeleteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "delete", abstract: "Delete mesh configuration (-f FILE, or KIND NAME...), or a node (node NAME).",
        discussion: """
            `sluice delete node NAME` removes the workloads the node's agent registered, ends its stream, and refuses \
            its certificate until the node joins again with a new join token (what the stored mesh itself places on \
            the node stays).
            """)
    @OptionGroup var client: ClientOptions
    @Option(name: .shortAndLong, help: "File or directory of YAML, or - for standard input.") var filename: String?
    @Flag(name: .customLong("ignore-not-found"), help: "Objects already gone are not errors.") var ignoreNotFound = false
    @Argument(help: "KIND NAME... (without -f).") var words: [String] = []

    func validate() throws {
        if !((filename != nil && words.isEmpty) || (filename == nil && words.count >= 2)) {
            throw ValidationError("give -f FILE, or KIND NAME...")
        }
    }

    func run() throws {
        let cli = try client.cli()
        let status = if let filename {
            cli.delete(try readObjects(filename), ignoreNotFound: ignoreNotFound)
        } else {
            cli.delete(kind: words[0], names: Array(words.dropFirst()), ignoreNotFound: ignoreNotFound)
        }
        if status != 0 { throw ExitCode(status) }
    }
}

struct DiffCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "diff", abstract: "Show what apply would change (exit 0: none, 1: differences, 2: error).")
    @OptionGroup var client: ClientOptions
    @Option(name: .shortAndLong, help: "File or directory of YAML, or - for standard input.") var filename: String

    func run() throws {
        let status = try client.cli().diff(try readObjects(filename))
        if status != 0 { throw ExitCode(status) }
    }
}

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Each connected agent's sync state (as istioctl proxy-status).")
    @OptionGroup var client: ClientOptions
    @Option(name: .shortAndLong, help: "json for the raw list.") var output: String?

    func run() throws {
        let status = try client.cli().status(json: output == "json")
        if status != 0 { throw ExitCode(status) }
    }
}

struct ProxyConfigCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "proxy-config",
        abstract: "What a node's agent serves now: listeners, clusters, routes, endpoints, secrets or all (as istioctl proxy-config).")
    @OptionGroup var client: ClientOptions
    @Argument(help: "NODE then the section (the other order, as istioctl's, works too).") var words: [String]
    @Option(name: .shortAndLong, help: "json, yaml or wide (default: a table).") var output: String?

    var parsed: (node: String, section: CLI.ProxyConfigSection)? {
        guard words.count == 2 else { return nil }
        if let s = CLI.ProxyConfigSection(rawValue: words[1]) { return (words[0], s) }
        if let s = CLI.ProxyConfigSection(rawValue: words[0]) { return (words[1], s) }
        return nil
    }

    func validate() throws {
        guard parsed != nil else {
            throw ValidationError("give NODE and one of: " + CLI.ProxyConfigSection.allCases.map(\.rawValue).joined(separator: ", "))
        }
        if let o = output, !["json", "yaml", "wide"].contains(o) { throw ValidationError("-o must be json, yaml or wide") }
    }

    func run() throws {
        guard let (node, section) = parsed else { throw ExitCode(2) }
        let status = try client.cli().proxyConfig(node: node, section: section,
                                                  output: output.flatMap(CLI.Output.init) ?? .table)
        if status != 0 { throw ExitCode(status) }
    }
}

struct AnalyzeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "analyze",
        abstract: "Find problems in the stored mesh, or in files together with it (as istioctl analyze; exit 79 on errors).")
    @OptionGroup var client: ClientOptions
    @Option(name: .shortAndLong, help: "File or directory of YAML to analyze with the stored mesh (repeatable).")
    var filename: [String] = []
    @Argument(help: "More files or directories (as istioctl analyze takes them).") var files: [String] = []
    @Option(name: .customLong("use-kube"), help: "false: analyze the files alone, without the server.") var useKube = true
    @Flag(name: [.customShort("A"), .customLong("all-namespaces")], help: "Every namespace.") var allNamespaces = false
    @Option(name: .shortAndLong, help: "json or yaml (default: one line per message).") var output: String?
    @Option(name: .customLong("failure-threshold"), help: "Error or Warning: the least severe message that exits 79.")
    var failureThreshold = "Error"

    func validate() throws {
        if let o = output, Analysis.Output(rawValue: o) == nil || o.isEmpty { throw ValidationError("-o must be json or yaml") }
        if Analysis.Threshold(rawValue: failureThreshold) == nil {
            throw ValidationError("--failure-threshold must be Error or Warning")
        }
        if !useKube && filename.isEmpty && files.isEmpty { throw ValidationError("--use-kube=false needs files to analyze") }
    }

    func run() throws {
        let all = filename + files
        for f in all where ConfigLoader.files(at: f) == nil {
            FileHandle.standardError.write(Data("error: the path \"\(f)\" does not exist\n".utf8))
            throw ExitCode(1)
        }
        let format = output.flatMap(Analysis.Output.init) ?? .text
        let threshold = Analysis.Threshold(rawValue: failureThreshold) ?? .error
        let status: Int32
        if useKube {
            status = try client.cli().analyze(files: all, allNamespaces: allNamespaces, output: format, threshold: threshold)
        } else {
            // The files alone: every namespace they hold unless -n names one.
            status = Analysis.report(Analysis.run(stored: [], files: all), scope: allNamespaces ? nil : client.namespace,
                                     output: format, threshold: threshold, out: { print($0) },
                                     err: { FileHandle.standardError.write(Data(($0 + "\n").utf8)) })
        }
        if status != 0 { throw ExitCode(status) }
    }
}

struct WorkloadCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "workload", abstract: "Register this host's workloads (files the agent's --workloads reads).",
        subcommands: [WorkloadAdd.self, WorkloadRemove.self])
}

struct WorkloadAdd: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "add", abstract: "Write a WorkloadEntry for a workload of this host.")
    @Argument var name: String
    @Option(name: .shortAndLong) var namespace = "default"
    @Option(name: .customLong("service-account")) var serviceAccount: String
    @Option var address: String
    @Option(help: "k=v,k=v") var labels = ""
    @Option(help: "name=port,name=port") var ports = ""
    @Option(help: "The workload's cgroup2 directory.") var cgroup: String?
    @Option(help: "The workload's systemd unit (NAME.service).") var unit: String?
    @Option(help: "The agent's --workloads directory.") var dir = "/etc/sluice/workloads"

    func validate() throws {
        if (cgroup == nil) == (unit == nil) { throw ValidationError("give one of --cgroup PATH or --unit NAME.service") }
    }

    func run() throws {
        do {
            let file = try WorkloadFiles.add(name: name, namespace: namespace, serviceAccount: serviceAccount, address: address,
                                             labels: labels, ports: ports, cgroup: cgroup, unit: unit, directory: dir)
            print("workloadentry.networking.istio.io/\(name) written to \(file)")
        } catch {
            FileHandle.standardError.write(Data("error: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}

struct WorkloadRemove: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "remove", abstract: "Remove a workload's WorkloadEntry file.")
    @Argument var name: String
    @Option(name: .shortAndLong) var namespace = "default"
    @Option(help: "The agent's --workloads directory.") var dir = "/etc/sluice/workloads"

    func run() throws {
        do {
            try WorkloadFiles.remove(name: name, namespace: namespace, directory: dir)
            print("workloadentry.networking.istio.io/\(name) removed")
        } catch {
            FileHandle.standardError.write(Data("error: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}
