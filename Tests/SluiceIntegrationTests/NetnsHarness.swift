import Foundation
import Glibc
import XCTest

/// A small network of nodes for multi-node tests (root only): each node is a network namespace with its own
/// address on one bridge, and its own cgroup for the processes it runs. The bridge lives in a namespace of its
/// own too, so nothing is added to the host's namespace. Everything is removed by ``tearDown()`` — and a run
/// that died before removing its namespaces is swept by the next one (names carry the creating process's pid).
///
/// Reuse: `let net = try NetnsHarness(nodes: 3)`, `net.address(1)`, `try net.start(1, [...])`, `net.tearDown()`.
final class NetnsHarness {
    static let prefix = "sltest"
    let id: String
    let subnet: String
    let nodes: Int
    private(set) var processes: [Process] = []
    private var cgroups: [String] = []
    private let cgroupRoot: String

    /// - Parameter nodes: how many; node `i` gets address `10.77.S.(i+1)/24` where S is derived from the pid.
    init(nodes: Int) throws {
        Self.sweepStale()
        let pid = getpid()
        id = "\(Self.prefix)\(pid)"
        subnet = "10.77.\(Int(pid) % 250 + 1)"
        self.nodes = nodes
        cgroupRoot = Self.cgroupMount() + "/\(id)"
        do {
            try Self.ip(["netns", "add", bridgeNamespace])
            try Self.ip(["-n", bridgeNamespace, "link", "add", "br0", "type", "bridge"])
            try Self.ip(["-n", bridgeNamespace, "link", "set", "br0", "up"])
            try FileManager.default.createDirectory(atPath: cgroupRoot, withIntermediateDirectories: true)
            for i in 0..<nodes {
                let ns = namespace(i)
                try Self.ip(["netns", "add", ns])
                try Self.ip(["link", "add", "\(id)a\(i)", "type", "veth", "peer", "name", "\(id)b\(i)"])
                try Self.ip(["link", "set", "\(id)a\(i)", "netns", ns])
                try Self.ip(["link", "set", "\(id)b\(i)", "netns", bridgeNamespace])
                try Self.ip(["-n", ns, "link", "set", "\(id)a\(i)", "name", "eth0"])
                try Self.ip(["-n", ns, "addr", "add", "\(address(i))/24", "dev", "eth0"])
                try Self.ip(["-n", ns, "link", "set", "eth0", "up"])
                try Self.ip(["-n", ns, "link", "set", "lo", "up"])
                try Self.ip(["-n", bridgeNamespace, "link", "set", "\(id)b\(i)", "master", "br0"])
                try Self.ip(["-n", bridgeNamespace, "link", "set", "\(id)b\(i)", "up"])
                let cg = "\(cgroupRoot)/node\(i)"
                // Two leaves per node: the agent's, and its workloads' (which the agent captures).
                try FileManager.default.createDirectory(atPath: cg + "/agent", withIntermediateDirectories: true)
                try FileManager.default.createDirectory(atPath: cg + "/workloads", withIntermediateDirectories: true)
                cgroups.append(cg)
            }
        } catch {
            tearDown()
            throw error
        }
    }

    var bridgeNamespace: String { "\(id)-br" }
    func namespace(_ i: Int) -> String { "\(id)-n\(i)" }
    func address(_ i: Int) -> String { "\(subnet).\(i + 1)" }
    /// Node `i`'s cgroup for its agent (and other infrastructure), and the one for its workloads.
    func cgroup(_ i: Int) -> String { cgroups[i] + "/agent" }
    func workloadCgroup(_ i: Int) -> String { cgroups[i] + "/workloads" }

    /// Starts `arguments` inside node `i`'s namespace and its agent cgroup (or its workloads' cgroup); its output
    /// goes to `log` if given.
    @discardableResult
    func start(_ i: Int, _ arguments: [String], log: String? = nil, workload: Bool = false) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sh")
        p.arguments = ["-c", "echo $$ > \(workload ? workloadCgroup(i) : cgroup(i))/cgroup.procs && exec \(enter(i)) \(Self.quoted(arguments))"]
        if let log {
            FileManager.default.createFile(atPath: log, contents: nil)
            let h = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
            p.standardOutput = h
            p.standardError = h
        } else {
            p.standardOutput = FileHandle(forWritingAtPath: "/dev/null")
            p.standardError = FileHandle(forWritingAtPath: "/dev/null")
        }
        try p.run()
        processes.append(p)
        return p
    }

    /// Runs `arguments` in node `i` to completion; returns its output and status.
    func run(_ i: Int, _ arguments: [String]) throws -> (output: String, status: Int32) {
        try Harness.run("/usr/bin/nsenter", ["--net=/run/netns/\(namespace(i))"] + arguments)
    }

    /// Runs `arguments` as a workload of node `i` (in the cgroup its agent captures, or in its child `cgroup`) to
    /// completion.
    func runWorkload(_ i: Int, _ arguments: [String], cgroup child: String? = nil) throws -> (output: String, status: Int32) {
        let cg = workloadCgroup(i) + (child.map { "/" + $0 } ?? "")
        return try Harness.run("/bin/sh", ["-c", "echo $$ > \(cg)/cgroup.procs && exec \(enter(i)) \(Self.quoted(arguments))"])
    }

    /// Enters only node `i`'s network namespace (`ip netns exec` would also mount a /sys of its own, hiding the
    /// cgroup2 and bpffs mounts an agent needs).
    func enter(_ i: Int) -> String { "nsenter --net=/run/netns/\(namespace(i))" }

    static func quoted(_ arguments: [String]) -> String {
        arguments.map { "'" + $0.replacingOccurrences(of: "'", with: "'\\''") + "'" }.joined(separator: " ")
    }

    /// Stops every process, then removes the namespaces (with their links and the bridge) and cgroups.
    func tearDown() {
        for p in processes where p.isRunning {
            p.terminate()
        }
        for p in processes { p.waitUntilExit() }
        processes = []
        for i in 0..<nodes { try? Self.ip(["netns", "del", namespace(i)]) }
        try? Self.ip(["netns", "del", bridgeNamespace])
        for cg in cgroups { Self.removeCgroup(cg) }
        Self.removeCgroup(cgroupRoot)
    }

    /// Skips a root-only test when not root — except under CI (`CI=true`), where it fails: CI is root, so a
    /// root-only test that cannot run there is a broken environment, not a reason to pass.
    static func requireRoot() throws {
        guard getuid() != 0 else { return }
        if ProcessInfo.processInfo.environment["CI"] == "true" { XCTFail("root-only test cannot run without root in CI") }
        throw XCTSkip("needs root (network namespaces)")
    }

    /// Removes namespaces and cgroups of earlier runs whose process is gone.
    static func sweepStale() {
        let list = (try? Harness.run("/usr/sbin/ip", ["netns", "list"]).output) ?? ""
        for line in list.split(separator: "\n") {
            let name = String(line.split(separator: " ").first ?? "")
            guard name.hasPrefix(prefix), let pid = Int32(name.dropFirst(prefix.count).prefix { $0.isNumber }),
                kill(pid, 0) != 0 else { continue }
            try? ip(["netns", "del", name])
        }
        let root = cgroupMount()
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: root)) ?? [] where entry.hasPrefix(prefix) {
            guard let pid = Int32(entry.dropFirst(prefix.count)), kill(pid, 0) != 0 else { continue }
            removeCgroup("\(root)/\(entry)")
        }
    }

    static func ip(_ args: [String]) throws {
        let (out, status) = try Harness.run("/usr/sbin/ip", args)
        if status != 0 {
            throw NSError(domain: "netns", code: Int(status),
                          userInfo: [NSLocalizedDescriptionKey: "ip \(args.joined(separator: " ")) failed: \(out)"])
        }
    }

    /// Where cgroup2 is mounted (the unified hierarchy).
    static func cgroupMount() -> String {
        let mounts = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
        for line in mounts.split(separator: "\n") where line.contains(" - cgroup2 ") {
            return String(line.split(separator: " ")[4])
        }
        return "/sys/fs/cgroup"
    }

    /// Moves any process left in `path` (and its children) to the root cgroup and removes the directories.
    static func removeCgroup(_ path: String) {
        var isDirectory: ObjCBool = false
        for child in (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
        where FileManager.default.fileExists(atPath: "\(path)/\(child)", isDirectory: &isDirectory) && isDirectory.boolValue {
            removeCgroup("\(path)/\(child)")
        }
        if let procs = try? String(contentsOfFile: path + "/cgroup.procs", encoding: .utf8) {
            for pid in procs.split(separator: "\n") {
                try? String(pid).write(toFile: cgroupMount() + "/cgroup.procs", atomically: false, encoding: .utf8)
            }
        }
        rmdir(path)
    }
}

/// The harness itself: nodes reach each other over the bridge, the host does not see them, nothing is left.
final class NetnsHarnessTests: XCTestCase {
    func testNodesTalkOverTheBridgeAndEverythingIsRemoved() throws {
        try NetnsHarness.requireRoot()
        let net = try NetnsHarness(nodes: 3)
        defer { net.tearDown() }
        // A listener on node 2, a client on node 0.
        let script = "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
            + "s.bind(('\(net.address(2))',9000));s.listen();c,a=s.accept();c.sendall(('hello '+a[0]).encode());c.close()"
        try net.start(2, ["python3", "-c", script])
        var reply = ""
        for _ in 0..<50 {
            let (out, status) = try net.run(0, ["python3", "-c", "import socket;s=socket.create_connection(('\(net.address(2))',9000),timeout=2);print(s.recv(100).decode())"])
            if status == 0 { reply = out; break }
            Thread.sleep(forTimeInterval: 0.1)
        }
        XCTAssertEqual(reply.trimmingCharacters(in: .whitespacesAndNewlines), "hello \(net.address(0))")
        // Nothing of the test network is in the host's namespace.
        let host = try Harness.run("/usr/sbin/ip", ["-o", "addr"]).output + (try Harness.run("/usr/sbin/ip", ["-o", "link"]).output)
        XCTAssertFalse(host.contains(net.subnet + ".") || host.contains(net.id), host)
        // Each node's processes run in its cgroup.
        let (cg, _) = try net.run(1, ["cat", "/proc/self/cgroup"])
        XCTAssertFalse(cg.isEmpty)
        net.tearDown()
        let left = try Harness.run("/usr/sbin/ip", ["netns", "list"]).output
        XCTAssertFalse(left.contains(net.id), left)
        XCTAssertFalse(FileManager.default.fileExists(atPath: NetnsHarness.cgroupMount() + "/\(net.id)"))
    }
}
