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

    public static func load(path: String) -> Result {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            return Result(resources: [], diagnostics: [Diagnostic(.error, file: path, line: nil, resource: nil, path: "",
                                                                  message: "no such file or directory")])
        }
        var files: [String] = []
        if isDir.boolValue {
            let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
            files = names.filter { $0.hasSuffix(".yaml") || $0.hasSuffix(".yml") || $0.hasSuffix(".json") }
                .sorted().map { path + "/" + $0 }
        } else {
            files = [path]
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
