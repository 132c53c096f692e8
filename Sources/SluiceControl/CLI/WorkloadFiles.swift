import Foundation
import SluiceModel

/// `sluice workload add|remove`: the WorkloadEntry files of this host's workloads, one per file
/// (`DIR/NAMESPACE.NAME.yaml`), which the agent's `--workloads` registers with the control plane.
public enum WorkloadFiles {
    public static func path(_ name: String, _ namespace: String, _ directory: String) -> String {
        "\(directory)/\(namespace).\(name).yaml"
    }

    /// Writes the entry after validating it with `sluice validate`'s decoder; returns the file.
    public static func add(name: String, namespace: String, serviceAccount: String, address: String, labels: String,
                           ports: String, cgroup: String?, unit: String?, directory: String) throws -> String {
        func pairs(_ text: String, _ flag: String) throws -> [(String, String)] {
            try text.split(separator: ",").map { p in
                let kv = p.split(separator: "=", maxSplits: 1).map(String.init)
                guard kv.count == 2, !kv[0].isEmpty else { throw CLIError("--\(flag) '\(p)' is not KEY=VALUE") }
                return (kv[0], kv[1])
            }
        }
        var portMap: [String: JSONValue] = [:]
        for (k, v) in try pairs(ports, "ports") {
            guard let n = Int64(v), (1...65535).contains(n) else { throw CLIError("--ports \(k)=\(v): not a port") }
            portMap[k] = .int(n)
        }
        var annotations: [String: JSONValue] = [:]
        if let cgroup { annotations[SluiceAnnotation.cgroup] = .string(cgroup) }
        if let unit { annotations[SluiceAnnotation.unit] = .string(unit) }
        var spec: [String: JSONValue] = [
            "address": .string(address), "serviceAccount": .string(serviceAccount),
            "labels": .object(Dictionary(try pairs(labels, "labels").map { ($0.0, JSONValue.string($0.1)) },
                                         uniquingKeysWith: { _, b in b })),
        ]
        if !portMap.isEmpty { spec["ports"] = .object(portMap) }
        let entry: JSONValue = .object([
            "apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": .object(["name": .string(name), "namespace": .string(namespace), "annotations": .object(annotations)]),
            "spec": .object(spec),
        ])
        let file = path(name, namespace, directory)
        let (_, diagnostics) = ResourceDecoder.decode(entry.yaml, file: file)
        let errors = diagnostics.filter { $0.severity == .error }
        guard errors.isEmpty else { throw CLIError(errors.map(\.description).joined(separator: "\n")) }
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        // Aside, then renamed: the agent never reads half a file.
        let tmp = "\(directory)/.\(namespace).\(name).yaml.tmp"
        guard FileManager.default.createFile(atPath: tmp, contents: Data(entry.yaml.utf8)), rename(tmp, file) == 0 else {
            throw CLIError("cannot write \(file)")
        }
        return file
    }

    public static func remove(name: String, namespace: String, directory: String) throws {
        let file = path(name, namespace, directory)
        guard FileManager.default.fileExists(atPath: file) else { throw CLIError("\(file) does not exist") }
        try FileManager.default.removeItem(atPath: file)
    }
}
