#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Reads every `*.yaml`, `*.yml` and `*.json` file of a directory (or one file) in name order.
public enum ConfigLoader {
    public struct Result: Sendable {
        public var resources: [Resource]
        public var diagnostics: [Diagnostic]
        public var errors: [Diagnostic] { diagnostics.filter { $0.severity == .error } }
    }

    /// The configuration files `path` names, in load order; nil if `path` does not exist.
    public static func files(at path: String) -> [String]? {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else { return nil }
        guard isDir.boolValue else { return [path] }
        let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
        return names.filter { $0.hasSuffix(".yaml") || $0.hasSuffix(".yml") || $0.hasSuffix(".json") }
            .sorted().map { path + "/" + $0 }
    }

    /// What identifies the configuration's content cheaply, for change detection: names, sizes, modification times.
    public static func fingerprint(_ path: String) -> [String] {
        (files(at: path) ?? []).map { f in
            let a = try? FileManager.default.attributesOfItem(atPath: f)
            let mtime = (a?[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0
            return "\(f) \(a?[.size] ?? 0) \(mtime)"
        }
    }

    public static func load(path: String) -> Result {
        guard let files = files(at: path) else {
            return Result(resources: [], diagnostics: [Diagnostic(.error, file: path, line: nil, resource: nil, path: "",
                                                                  message: "no such file or directory")])
        }
        var result = Result(resources: [], diagnostics: [])
        for f in files {
            guard let data = FileManager.default.contents(atPath: f) else {
                result.diagnostics.append(Diagnostic(.error, file: f, line: nil, resource: nil, path: "",
                                                     message: "cannot read file"))
                continue
            }
            guard data.count <= ResourceDecoder.maxFileBytes else {
                result.diagnostics.append(Diagnostic(.error, file: f, line: nil, resource: nil, path: "",
                                                     message: "file is larger than \(ResourceDecoder.maxFileBytes >> 20) MiB"))
                continue
            }
            guard let text = String(validating: data, as: UTF8.self) else {
                result.diagnostics.append(Diagnostic(.error, file: f, line: nil, resource: nil, path: "",
                                                     message: "file is not valid UTF-8"))
                continue
            }
            let (rs, ds) = ResourceDecoder.decode(text, file: f)
            result.resources += rs
            result.diagnostics += ds
        }
        return result
    }
}
