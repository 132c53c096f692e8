import Foundation
import SluiceModel

/// `sluice analyze`, as `istioctl analyze`: every problem of the stored mesh, or of files together with it (or alone,
/// `--offline`), one line each in istioctl's form:
///
///     Error [SLC0101] (VirtualService bookinfo/reviews reviews.yaml:3) Referenced subset v3 of reviews not found
///
/// The codes are `DiagnosticCode`'s, stable across versions. Exit 79 (istioctl's) when a problem at or above the
/// failure threshold is found, 1 when the analysis could not run.
public struct Analysis: Sendable {
    public enum Output: String, Sendable { case text = "", json, yaml }
    public enum Threshold: String, Sendable { case error = "Error", warning = "Warning" }

    /// istioctl analyze's exit status when it found issues.
    public static let foundIssues: Int32 = 79

    /// One message, as `-o json` prints it.
    public struct Message: Sendable, Hashable {
        public var diagnostic: Diagnostic
        public var origin: String?
        public var reference: String?

        init(_ d: Diagnostic) {
            diagnostic = d
            origin = d.resource
            let stored = d.file == Analysis.storedSource || d.file == APIRequestSource.file
            reference = stored ? nil : d.line.map { "\(d.file):\($0)" } ?? d.file
        }

        public var level: String { diagnostic.severity == .error ? "Error" : "Warning" }

        /// `Error [SLC0101] (VirtualService ns/name file:line) message (at path)`.
        public var text: String {
            let place = [origin, reference].compactMap { $0 }.joined(separator: " ")
            var s = "\(level) [\(diagnostic.code.code)]"
            if !place.isEmpty { s += " (\(place))" }
            s += " \(diagnostic.message)"
            if !diagnostic.path.isEmpty { s += " (at \(diagnostic.path))" }
            return s
        }

        public var json: JSONValue {
            var o: [String: JSONValue] = ["code": .string(diagnostic.code.code), "name": .string(diagnostic.code.name),
                                          "level": .string(level), "message": .string(diagnostic.message)]
            if let origin { o["origin"] = .string(origin) }
            if let reference { o["reference"] = .string(reference) }
            if !diagnostic.path.isEmpty { o["path"] = .string(diagnostic.path) }
            if let hint = diagnostic.hint { o["hint"] = .string(hint) }
            return .object(o)
        }
    }

    /// The source name of objects read from the server (they have no file and line).
    static let storedSource = "<stored>"

    /// Every problem of `stored` objects overlaid with `files`' resources (a file's object replaces the stored one of
    /// the same kind, namespace and name), in a stable order.
    public static func run(stored: [JSONValue], files: [String]) -> [Message] {
        var diagnostics: [Diagnostic] = []
        var fromFiles: [Resource] = []
        for path in files {
            let loaded = ConfigLoader.load(path: path)
            diagnostics += loaded.diagnostics
            fromFiles += loaded.resources
        }
        let replaced = Set(fromFiles.map(\.key))
        var resources: [Resource] = []
        for object in stored {
            let (rs, ds) = ResourceDecoder.decode(object.text, file: storedSource)
            resources += rs.filter { !replaced.contains($0.key) }
            diagnostics += ds
        }
        // A file's object replaces the stored one; twice in the files themselves is a problem the compiler reports.
        resources += fromFiles
        do {
            diagnostics += try MeshCompiler(resources).warnings
        } catch {
            diagnostics += error.diagnostics
        }
        var seen = Set<Diagnostic>()
        return diagnostics.filter { seen.insert($0).inserted }.map(Message.init)
    }
}

extension Analysis {
    /// Prints `messages` within `scope` (a namespace; nil: all) and answers the exit status.
    public static func report(_ messages: [Message], scope: String?, output: Output, threshold: Threshold,
                              out: (String) -> Void, err: (String) -> Void) -> Int32 {
        let messages = messages.filter { m in
            guard let scope, let origin = m.origin else { return true }
            return origin.split(separator: " ").last?.split(separator: "/").first.map(String.init) == scope
        }
        switch output {
        case .json:
            out(String(decoding: (try? JSONSerialization.data(
                withJSONObject: JSONSerialization.jsonObject(with: JSONValue.array(messages.map(\.json)).data),
                options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])) ?? Data("[]".utf8), as: UTF8.self))
        case .yaml:
            let y = JSONValue.array(messages.map(\.json)).yaml
            out(y.hasSuffix("\n") ? String(y.dropLast()) : y)
        case .text:
            for m in messages { out(m.text) }
        }
        let what = scope.map { "namespace: \($0)" } ?? "all namespaces"
        let failing = messages.contains { m in
            m.diagnostic.severity == .error || (threshold == .warning && m.diagnostic.severity == .warning)
        }
        if failing {
            err("Error: Analyzers found issues when analyzing \(what).")
            return foundIssues
        }
        if messages.isEmpty && output == .text { err("\u{2714} No validation issues found when analyzing \(what).") }
        return 0
    }
}

extension CLI {
    /// `sluice analyze [-f FILE...] [-A] [-o json|yaml] [--failure-threshold Error|Warning]`: the stored mesh with the
    /// files over it, within the namespace (`-n`, else the kubeconfig context's) or all (`-A`).
    public func analyze(files: [String], allNamespaces: Bool, output: Analysis.Output, threshold: Analysis.Threshold) -> Int32 {
        let stored: [JSONValue]
        do { stored = try storedObjects() } catch {
            err("\(error)")
            return 1
        }
        return Analysis.report(Analysis.run(stored: stored, files: files), scope: allNamespaces ? nil : defaultNamespace,
                               output: output, threshold: threshold, out: out, err: err)
    }

    /// Every object the server holds, each kind listed across namespaces at its preferred version.
    func storedObjects() throws -> [JSONValue] {
        var objects: [JSONValue] = []
        var kinds = Set<String>()
        for r in APIResource.all where kinds.insert(r.kind).inserted {
            let reply = try client.call("GET", "/apis/\(r.group)/\(r.preferredVersion)/\(r.plural)")
            guard reply.status == 200, let list = reply.json else { throw CLIError(serverError(reply)) }
            for var item in list["items"]?.arrayValue ?? [] {
                // Lists leave out each item's kind and apiVersion (as Kubernetes' do); the decoder needs them.
                item["kind"] = .string(r.kind)
                item["apiVersion"] = .string("\(r.group)/\(r.preferredVersion)")
                objects.append(item)
            }
        }
        return objects
    }
}
