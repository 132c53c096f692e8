#!/usr/bin/env python3
"""Kernel-path benchmark (root): the Sluice agent captures a test cgroup and balances a service in the kernel.

  * TCP throughput through a kernel-balanced service address vs the backend dialled directly (iperf3)
  * connect() latency added by the programs: 100,000 connects each from a cgroup without programs and from the
    captured one (a miss in the services map, and a hit that is rewritten), medians compared
  * for the record: a connection captured to the agent by the BPF programs vs the same agent path reached
    through an iptables-legacy REDIRECT rule (nat OUTPUT, for one loopback service address only)

Addresses are on loopback (services in 127.96.0.0/16). Prints one JSON object; everything it creates (cgroups,
pins, processes) is removed at the end.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.environ.get("SLUICE_BUILD", "release")
SLUICE = os.path.join(ROOT, f".build/{BUILD}/sluice")
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
# Throughput on this VM varies ~10% run to run; more paired rounds than the peer benchmark.
ROUNDS = int(os.environ.get("BENCH_BPF_ROUNDS", "7"))
CONNECTS = int(os.environ.get("BENCH_CONNECTS", "100000"))
P_IPERF, P_CLOSED, P_GATEWAY = 26201, 26209, 26301
PIN = "/sys/fs/bpf/sluice-bench"
tmp = tempfile.mkdtemp(prefix="sluice-bench-bpf-")
procs = []
cleanups = []


def cgroup2_mount():
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.startswith("cgroup2 "):
                return left.split()[4]
    os.makedirs("/run/sluice/cgroup2", exist_ok=True)
    subprocess.run(["mount", "-t", "cgroup2", "none", "/run/sluice/cgroup2"], check=True)
    return "/run/sluice/cgroup2"


def in_cgroup(cg, cmd, **kw):
    """Runs `cmd` as a process of cgroup `cg`."""
    return subprocess.run(["/bin/sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", *cmd], **kw)


CONNECT_LOOP = """
import socket, sys, time, json
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
times = []
clock = time.perf_counter_ns
for _ in range(n):
    s = socket.socket()
    t = clock()
    try:
        s.connect((host, port))
    except ConnectionRefusedError:
        pass
    times.append(clock() - t)
    s.close()
times.sort()
print(json.dumps({"median_ns": times[len(times) // 2], "p90_ns": times[len(times) * 9 // 10]}))
"""


def connect_latency(cg, host, port):
    out = in_cgroup(cg, [sys.executable, "-c", CONNECT_LOOP, host, str(port), str(CONNECTS)],
                    capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def iperf(cg, host, port):
    out = in_cgroup(cg, ["iperf3", "-c", host, "-p", str(port), "-t", str(SECONDS), "-J"],
                    capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9


def main():
    if os.geteuid() != 0:
        raise SystemExit("bench_bpf.py needs root (BPF programs on a cgroup)")
    mount = cgroup2_mount()
    captured, plain = f"{mount}/sluice-bench-captured", f"{mount}/sluice-bench-plain"
    for cg in (captured, plain):
        os.makedirs(cg, exist_ok=True)
    mesh = os.path.join(tmp, "mesh")
    os.makedirs(mesh)
    with open(os.path.join(mesh, "mesh.yaml"), "w") as f:
        f.write("""apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: client, namespace: bench, annotations: {sluice.dev/node: bench-node}}
spec: {address: 127.0.0.2, labels: {app: client}}
""")
        # `proxied`: outlier detection needs the agent, so the programs send it there; it forwards at L4.
        f.write(f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: proxied, namespace: bench}}
spec:
  hosts: [proxied.bench.svc.cluster.local]
  addresses: [127.96.20.3]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 5201, name: tcp, protocol: TCP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {P_IPERF}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: proxied, namespace: bench}}
spec:
  host: proxied.bench.svc.cluster.local
  trafficPolicy: {{outlierDetection: {{consecutiveGatewayErrors: 5}}}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: redirect, namespace: bench}}
spec:
  servers: [{{port: {{number: {P_GATEWAY}, name: tcp, protocol: TCP}}, bind: 127.0.0.1, hosts: ['*']}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: redirect, namespace: bench}}
spec:
  hosts: ['*']
  gateways: [redirect]
  tcp: [{{route: [{{destination: {{host: iperf.bench.svc.cluster.local}}}}]}}]
""")
        for name, vip, port, backend in [("iperf", "127.96.20.1", 5201, P_IPERF), ("closed", "127.96.20.2", 9, P_CLOSED)]:
            f.write(f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: bench}}
spec:
  hosts: [{name}.bench.svc.cluster.local]
  addresses: [{vip}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: tcp, protocol: TCP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {backend}}}}}]
""")
    try:
        procs.append(subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(P_IPERF)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        log = open(os.path.join(tmp, "agent.log"), "w+")
        agent = subprocess.Popen([SLUICE, "agent", "--local-config", mesh, "--node", "bench-node", "--cgroup", captured,
                                  "--pin-dir", PIN, "--bpf-dir", os.path.join(ROOT, ".build/bpf"), "--workers", "1",
                                  "--metrics", "127.0.0.1:0", "--readiness", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
                                 stdout=subprocess.DEVNULL, stderr=log)
        procs.append(agent)
        for _ in range(200):
            log.seek(0)
            if "agent ready" in log.read():
                break
            time.sleep(0.05)
        else:
            log.seek(0)
            raise SystemExit("agent did not start:\n" + log.read())
        time.sleep(0.5)  # iperf3 server up
        rule = ["-t", "nat", "OUTPUT", "-p", "tcp", "-d", "127.96.30.1", "--dport", "5201", "-j", "REDIRECT",
                "--to-ports", str(P_GATEWAY)]
        iptables = subprocess.run(["iptables-legacy", rule[0], rule[1], "-A", *rule[2:]], capture_output=True).returncode == 0
        if iptables:
            cleanups.append(lambda: subprocess.run(["iptables-legacy", rule[0], rule[1], "-D", *rule[2:]]))
        direct, balanced, via_bpf, via_iptables = [], [], [], []
        for _ in range(ROUNDS):
            direct.append(iperf(plain, "127.0.0.1", P_IPERF))
            balanced.append(iperf(captured, "127.96.20.1", 5201))
            via_bpf.append(iperf(captured, "127.96.20.3", 5201))
            if iptables:
                via_iptables.append(iperf(plain, "127.96.30.1", 5201))
        base = connect_latency(plain, "127.0.0.1", P_CLOSED)
        miss = connect_latency(captured, "127.0.0.1", P_CLOSED)
        hit = connect_latency(captured, "127.96.20.2", 9)
        result = {
            "iperf_direct_gbps": statistics.median(direct), "iperf_balanced_gbps": statistics.median(balanced),
            "iperf_raw": {"direct": direct, "balanced": balanced, "agent_via_bpf": via_bpf,
                          "agent_via_iptables": via_iptables},
            "iperf_agent_via_bpf_gbps": statistics.median(via_bpf),
            "iperf_agent_via_iptables_gbps": statistics.median(via_iptables) if via_iptables else None,
            "connects": CONNECTS,
            "connect_median_ns": {"no_programs": base["median_ns"], "programs_miss": miss["median_ns"],
                                  "programs_rewrite": hit["median_ns"]},
            "connect_p90_ns": {"no_programs": base["p90_ns"], "programs_miss": miss["p90_ns"],
                               "programs_rewrite": hit["p90_ns"]},
        }
        print(json.dumps(result))
    finally:
        for c in cleanups:
            c()
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run([SLUICE, "agent", "--uninstall-bpf", "--pin-dir", PIN], stdout=subprocess.DEVNULL)
        for cg in (captured, plain):
            try:
                os.rmdir(cg)
            except OSError:
                pass


if __name__ == "__main__":
    main()
