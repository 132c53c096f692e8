import CSluiceLinux
import Glibc

/// Where cgroup2 and bpffs live on this host, mounting them only when the host has none.
public enum Mounts {
    /// The first cgroup2 mount in `/proc/self/mountinfo` (systemd hosts: `/sys/fs/cgroup`), or nil.
    public static func cgroup2() -> String? {
        guard let text = try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") {
            // `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS`
            let halves = line.split(separator: " - ", maxSplits: 1)
            guard halves.count == 2, halves[1].hasPrefix("cgroup2 ") else { continue }
            let fields = halves[0].split(separator: " ")
            if fields.count >= 5 { return String(fields[4]) }
        }
        return nil
    }

    /// A cgroup2 mount, mounting one at `fallback` when the host has none (LINUX-NOTES: cgroup v1 hosts).
    public static func ensureCgroup2(fallback: String = "/run/sluice/cgroup2") throws(BPFError) -> String {
        if let existing = cgroup2() { return existing }
        try makeDirectories(fallback)
        guard mount("none", fallback, "cgroup2", 0, nil) == 0 else {
            throw .errno("mount cgroup2 at \(fallback)", errno)
        }
        return fallback
    }

    /// This process's cgroup2 directory (from `/proc/self/cgroup`'s `0::` line), under `mount`.
    public static func ownCgroup(mount: String) -> String? {
        guard let text = try? String(contentsOfFile: "/proc/self/cgroup", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("0::") {
            return mount + String(line.dropFirst(3))
        }
        return nil
    }

    /// True when `path` is a mounted bpffs.
    public static func isBPFFS(_ path: String = "/sys/fs/bpf") -> Bool {
        var fs = statfs()
        return statfs(path, &fs) == 0 && UInt(fs.f_type) == UInt(BPF_FS_MAGIC)
    }

    /// Makes sure `/sys/fs/bpf` is a bpffs, mounting it when it is not.
    public static func ensureBPFFS(_ path: String = "/sys/fs/bpf") throws(BPFError) {
        if isBPFFS(path) { return }
        try makeDirectories(path)
        guard mount("bpf", path, "bpf", 0, nil) == 0 else { throw .errno("mount bpffs at \(path)", errno) }
    }

    static func makeDirectories(_ path: String) throws(BPFError) {
        var built = ""
        for part in path.split(separator: "/") {
            built += "/\(part)"
            if mkdir(built, 0o755) != 0 && errno != EEXIST { throw .errno("mkdir \(built)", errno) }
        }
    }
}
