#!/usr/bin/env python3
"""Sluice peer benchmark. Starts iperf3, nginx (HTTP backend), haproxy and the Sluice agent on loopback, then
measures in interleaved rounds:

  * single-stream TCP throughput (iperf3, Gbit/s)
  * new-connection rate (wrk, one TCP connection per request: `Connection: close`)
  * RSS per idle proxied connection (10,000 idle connections) and the idle RSS of each proxy

and prints medians and ratios against haproxy and direct. Loopback only; every process is stopped at the end.
"""
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import rss_kib, start, stop_all, wait_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLUICE = os.path.join(ROOT, ".build/release/sluice")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
import resource
# A proxied connection costs the proxy two descriptors: 10,000 need a limit above 20,000.
_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
IDLE_CONNS = int(os.environ.get("BENCH_IDLE_CONNS", str(min(10000, (_NOFILE - 300) // 2))))

P_IPERF, P_NGINX, P_SINK = 25201, 25202, 25203
P_HA = {"iperf": 25301, "http": 25302, "sink": 25303}
P_SL = {"iperf": 25401, "http": 25402, "sink": 25403}

tmp = tempfile.mkdtemp(prefix="sluice-bench-")



def setup():
    start(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(P_IPERF)])
    nginx_conf = os.path.join(tmp, "nginx.conf")
    with open(nginx_conf, "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err;
events {{ worker_connections 65536; }}
http {{ access_log off;
  server {{ listen 127.0.0.1:{P_NGINX} reuseport backlog=65535; keepalive_timeout 0;
    location / {{ return 200 "ok\\n"; }} }} }}
""")
    start(["nginx", "-c", nginx_conf, "-p", tmp])
    start([sys.executable, os.path.join(ROOT, "Tests/Fixtures/backend.py"), f"sink:{P_SINK}"])
    ha_conf = os.path.join(tmp, "haproxy.cfg")
    with open(ha_conf, "w") as f:
        f.write(f"""global
  nbthread 1
  maxconn {IDLE_CONNS + 50}
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
""")
        for name, port in P_HA.items():
            backend = {"iperf": P_IPERF, "http": P_NGINX, "sink": P_SINK}[name]
            f.write(f"listen {name}\n  bind 127.0.0.1:{port}\n  server s1 127.0.0.1:{backend}\n")
    start(["haproxy", "-f", ha_conf])
    mesh = os.path.join(tmp, "mesh")
    os.makedirs(mesh)
    with open(os.path.join(mesh, "mesh.yaml"), "w") as f:
        servers = "".join(f"  - port: {{number: {p}, name: {n}, protocol: TCP}}\n    bind: 127.0.0.1\n    hosts: ['*']\n"
                          for n, p in P_SL.items())
        f.write(f"apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: bench}}\nspec:\n  servers:\n{servers}")
        for n, p in P_SL.items():
            backend = {"iperf": P_IPERF, "http": P_NGINX, "sink": P_SINK}[n]
            f.write(f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {n}}}
spec:
  hosts: [{n}.bench.svc.cluster.local]
  gateways: [bench]
  tcp:
  - match: [{{port: {p}}}]
    route: [{{destination: {{host: {n}.bench.svc.cluster.local}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {n}}}
spec:
  hosts: [{n}.bench.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 80, name: tcp, protocol: TCP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {backend}}}}}]
""")
    agent = start([SLUICE, "agent", "--local-config", mesh, "--workers", "1", "--metrics", "127.0.0.1:25420",
                   "--readiness", "127.0.0.1:25421", "--admin", "127.0.0.1:25422"],
                  stderr=open(os.path.join(tmp, "agent.log"), "w"))
    for p in [P_IPERF, P_NGINX, P_SINK, *P_HA.values(), *P_SL.values()]:
        wait_port(p)
    haproxy_pid = int(subprocess.check_output(["pgrep", "-n", "-f", f"haproxy -f {ha_conf}"]).split()[0])
    return agent.pid, haproxy_pid


def iperf(port):
    out = subprocess.check_output(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(SECONDS), "-J"])
    return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 1e9


def conn_rate(port):
    out = subprocess.check_output(["wrk", "-t1", "-c32", f"-d{SECONDS}s", "-H", "Connection: close",
                                   f"http://127.0.0.1:{port}/"], text=True)
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if errors:
        print(f"  wrk on {port}: socket errors {errors.group(1)}", file=sys.stderr)
    return float(m.group(1))


def idle_rss(pid, port):
    """Opens IDLE_CONNS idle connections through the proxy; returns (idle RSS KiB before, KiB per connection)."""
    time.sleep(0.5)
    before = rss_kib(pid)
    socks = []
    for _ in range(IDLE_CONNS):
        socks.append(socket.create_connection(("127.0.0.1", port)))
    time.sleep(2)  # let the proxy accept and connect upstream for all of them
    after = rss_kib(pid)
    for s in socks:
        s.close()
    time.sleep(1)
    return before, (after - before) / IDLE_CONNS


def config_decode_rate(resources=10000):
    """Decode + validate + compile `resources` Istio resources with `sluice validate`; returns resources/s."""
    d = os.path.join(tmp, "config-bench")
    os.makedirs(d, exist_ok=True)
    services = resources // 3
    with open(os.path.join(d, "mesh.yaml"), "w") as f:
        for i in range(services):
            eps = "".join(f"  - {{address: 10.{i // 250 % 250}.{i % 250}.{e + 1}, labels: {{version: v{e % 2 + 1}}}}}\n"
                          for e in range(10))
            f.write(f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc{i}, namespace: bench}}
spec:
  hosts: [svc{i}.bench.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: tcp, protocol: TCP}}]
  endpoints:
{eps}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc{i}, namespace: bench}}
spec:
  host: svc{i}.bench.svc.cluster.local
  trafficPolicy:
    loadBalancer: {{simple: LEAST_REQUEST}}
    outlierDetection: {{consecutiveGatewayErrors: 5, interval: 10s, baseEjectionTime: 30s}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: svc{i}, namespace: bench}}
spec:
  hosts: [svc{i}.bench.svc.cluster.local]
  tcp:
  - route:
    - {{destination: {{host: svc{i}.bench.svc.cluster.local, subset: v1}}, weight: 90}}
    - {{destination: {{host: svc{i}.bench.svc.cluster.local, subset: v2}}, weight: 10}}
""")
    best = None
    for _ in range(3):
        start = time.perf_counter()
        out = subprocess.run([SLUICE, "validate", "-f", d], capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if out.returncode != 0:
            raise SystemExit("config benchmark input did not validate:\n" + out.stdout[-2000:])
        best = elapsed if best is None else min(best, elapsed)
    return services * 3 / best, best


def control_plane():
    """Runs SluiceBench (decode, compile for one node, incremental fan-out); returns its JSON figures."""
    out = subprocess.run([os.path.join(os.path.dirname(SLUICE), "SluiceBench")], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def print_control_plane(cp):
    print("\ncontrol plane (in-process, `.build/release/SluiceBench`):\n")
    print("| metric | figure | target |")
    print("|---|---|---|")
    print(f"| decode + validate, services + WorkloadEntries + routes ({cp['decode_resources']:,} resources) | "
          f"{cp['decode_resources_per_s']:,.0f} resources/s | >= 20,000/s |")
    print(f"| decode + validate, services with 10 inline endpoints + DR + VS ({cp['decode_heavy_resources']:,}) | "
          f"{cp['decode_heavy_resources_per_s']:,.0f} resources/s | >= 20,000/s |")
    print(f"| compile {cp['resources']:,} resources (10k services, 100k endpoints, 2k VS) for one node | "
          f"{cp['compile_for_one_node_ms']:.0f} ms ({cp['compile_mesh_ms']:.0f} mesh + "
          f"{cp['snapshot_one_node_ms']:.0f} node snapshot; node sees {cp['node0_services']:,} services, "
          f"{cp['node0_endpoints']:,} endpoints) | <= 500 ms |")
    print(f"| one service gains an endpoint: deltas for {cp['incremental_nodes_reached_median']} of {cp['nodes']} "
          f"nodes | {cp['incremental_endpoint_ms_median']:.1f} ms median, {cp['incremental_endpoint_ms_max']:.1f} max "
          f"| <= 50 ms |")
    print(f"| one service changes its port | {cp['incremental_port_ms_median']:.1f} ms median | <= 50 ms |")
    if "ca_signatures_per_s" in cp:
        print(f"| CA: CSR signatures on one core (verify, issue a SPIFFE certificate, PEM) | "
              f"{cp['ca_signatures_per_s']:,.0f}/s | >= 500/s |")


def http_l7():
    """Runs bench_http.py (HTTP/1.1 through each proxy with wrk); returns its JSON figures."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "Benchmarks/bench_http.py")], capture_output=True,
                         text=True, check=True)
    sys.stderr.write(out.stderr)
    return json.loads(out.stdout)


def kernel_path():
    """Runs bench_bpf.py (root): kernel-balanced throughput and the connect latency the programs add."""
    out = subprocess.run([sys.executable, os.path.join(ROOT, "Benchmarks/bench_bpf.py")], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def print_kernel_path(k):
    c = k["connect_median_ns"]
    print(f"\nkernel path (`Benchmarks/bench_bpf.py`, agent capturing a test cgroup):\n")
    print("| metric | without programs | with Sluice's programs | ratio / added | target |")
    print("|---|---|---|---|---|")
    print(f"| TCP throughput, iperf3 {SECONDS}s, Gbit/s (direct vs service address balanced in the kernel) | "
          f"{k['iperf_direct_gbps']:.2f} | {k['iperf_balanced_gbps']:.2f} | "
          f"{k['iperf_balanced_gbps'] / k['iperf_direct_gbps']:.2f}x | >= 0.97x |")
    print(f"| connect() median over {k['connects']:,}, not a service (map miss) | {c['no_programs'] / 1000:.2f} us | "
          f"{c['programs_miss'] / 1000:.2f} us | {(c['programs_miss'] - c['no_programs']) / 1000:+.2f} us | <= 5 us |")
    if k.get("iperf_agent_via_iptables_gbps"):
        print(f"| through the agent (L4 forward), captured by BPF vs by an iptables REDIRECT rule, Gbit/s | "
              f"{k['iperf_agent_via_iptables_gbps']:.2f} (iptables) | {k['iperf_agent_via_bpf_gbps']:.2f} (BPF) | "
              f"{k['iperf_agent_via_bpf_gbps'] / k['iperf_agent_via_iptables_gbps']:.2f}x | for the record |")
    print(f"| connect() median over {k['connects']:,}, a service (backend chosen, destination rewritten) | "
          f"{c['no_programs'] / 1000:.2f} us | {c['programs_rewrite'] / 1000:.2f} us | "
          f"{(c['programs_rewrite'] - c['no_programs']) / 1000:+.2f} us | <= 5 us |")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--kernel-path":
        print_kernel_path(kernel_path())
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--control-plane":
        print_control_plane(control_plane())
        return
    if not os.path.exists(SLUICE):
        raise SystemExit("build first: make build-release")
    agent_pid, haproxy_pid = setup()
    results = {"iperf_gbps": {"direct": [], "haproxy": [], "sluice": []},
               "conn_rate": {"direct": [], "haproxy": [], "sluice": []}}
    targets = {"direct": (P_IPERF, P_NGINX), "haproxy": (P_HA["iperf"], P_HA["http"]),
               "sluice": (P_SL["iperf"], P_SL["http"])}
    for r in range(ROUNDS):
        for name, (ip, hp) in targets.items():
            g = iperf(ip)
            results["iperf_gbps"][name].append(g)
            c = conn_rate(hp)
            results["conn_rate"][name].append(c)
            print(f"round {r + 1} {name:8s} iperf {g:7.2f} Gbit/s   new conns {c:9.0f}/s", file=sys.stderr)
    sl_idle, sl_per = idle_rss(agent_pid, P_SL["sink"])
    ha_idle, ha_per = idle_rss(haproxy_pid, P_HA["sink"])
    cfg_rate, cfg_seconds = config_decode_rate()
    cp = control_plane()
    h7 = http_l7()
    kp = kernel_path() if os.geteuid() == 0 else None
    med = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in results.items()}
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, kernel {platform.release()}",
        "rounds": ROUNDS, "seconds": SECONDS, "raw": results, "median": med,
        "rss": {"sluice_idle_kib": sl_idle, "sluice_kib_per_conn": sl_per,
                "haproxy_idle_kib": ha_idle, "haproxy_kib_per_conn": ha_per, "connections": IDLE_CONNS},
        "config": {"resources_per_second": cfg_rate, "seconds_for_9999": cfg_seconds},
        "control_plane": cp,
        "http": h7,
        "kernel_path": kp,
    }
    os.makedirs(os.path.join(ROOT, "Benchmarks/out"), exist_ok=True)
    with open(os.path.join(ROOT, "Benchmarks/out/results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    t, c = med["iperf_gbps"], med["conn_rate"]
    print(f"\n{summary['date']} on {summary['machine']}; medians of {ROUNDS} interleaved rounds of {SECONDS}s\n")
    print("| metric | direct | haproxy 2.6 | sluice | sluice / haproxy | sluice / direct |")
    print("|---|---|---|---|---|---|")
    print(f"| single-stream TCP, Gbit/s | {t['direct']:.2f} | {t['haproxy']:.2f} | {t['sluice']:.2f} | "
          f"{t['sluice'] / t['haproxy']:.2f}x | {t['sluice'] / t['direct']:.2f}x |")
    print(f"| new connections/s (wrk -c32, Connection: close) | {c['direct']:.0f} | {c['haproxy']:.0f} | "
          f"{c['sluice']:.0f} | {c['sluice'] / c['haproxy']:.2f}x | {c['sluice'] / c['direct']:.2f}x |")
    print(f"| RSS per idle proxied connection ({IDLE_CONNS}), KiB | - | {ha_per:.2f} | {sl_per:.2f} | "
          f"{sl_per / ha_per if ha_per else float('nan'):.2f}x | - |")
    print(f"| idle RSS, MB | - | {ha_idle / 1024:.1f} | {sl_idle / 1024:.1f} | - | - |")
    print(f"\nconfig: `sluice validate` on 9,999 resources (3,333 services x 10 endpoints): "
          f"{cfg_seconds * 1000:.0f} ms end to end, {cfg_rate:,.0f} resources/s (process start included)")
    subprocess.run([sys.executable, os.path.join(ROOT, "Benchmarks/bench_http.py"), "--print"],
                   input=json.dumps(h7), text=True, check=True)
    print_control_plane(cp)
    if kp:
        print_kernel_path(kp)
    else:
        print("\nkernel path: skipped (needs root)")


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
        subprocess.run(["pkill", "-f", f"haproxy -f {tmp}"], check=False)
