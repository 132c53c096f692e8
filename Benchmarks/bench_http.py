#!/usr/bin/env python3
"""HTTP/1.1 L7 benchmark: Sluice's gateway listener vs haproxy 2.6 (mode http, nbthread 1) vs nginx (one worker,
proxy_pass with upstream keep-alive) vs direct, interleaved in one run on loopback.

Every proxy runs the same policy: 10 route rules (9 path rules that do not match the benchmark's path, then a
catch-all) and a 90/10 weighted split over two backends (two nginx ports); Sluice also counts Istio's request
metrics. wrk: 1 thread, 64 keep-alive connections, small responses. Prints JSON (medians and raw rounds) on
stdout; progress on stderr.

Also measured: RSS per idle keep-alive HTTP connection (each connection has served one request) on Sluice and
haproxy.
"""
import json
import os
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
CONNS = 64
import resource
_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
IDLE_CONNS = int(os.environ.get("BENCH_IDLE_CONNS", str(min(5000, (_NOFILE - 300) // 2))))

P_V1, P_V2 = 26201, 26202
P_HA, P_NGX, P_SL = 26301, 26401, 26501
# HTTP/2 (h2c): nginx backends, haproxy in h2 mode, Sluice's HTTP2 gateway port.
P_H2_V1, P_H2_V2, P_H2_HA, P_H2_SL = 26211, 26212, 26311, 26511
H2_REQUESTS = int(os.environ.get("BENCH_H2_REQUESTS", "200000"))
# HTTPS (TLS 1.3 terminated by the proxy, same routes): haproxy `bind ssl`, nginx `listen ssl`, Sluice's HTTPS server.
P_TLS_HA, P_TLS_NGX, P_TLS_SL = 26321, 26421, 26531
PREFIXES = [f"/api/r{i}" for i in range(9)]

tmp = tempfile.mkdtemp(prefix="sluice-bench-http-")



def setup():
    pki = os.path.join(tmp, "pki")
    subprocess.run(["sh", os.path.join(ROOT, "Tests/Fixtures/make_certs.sh"), pki, "bench.example"], check=True)
    crt, key = os.path.join(pki, "bench.example.crt"), os.path.join(pki, "bench.example.key")
    with open(os.path.join(pki, "bench.pem"), "w") as f:
        f.write(open(crt).read() + open(key).read())
    backends = os.path.join(tmp, "backends.conf")
    with open(backends, "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {tmp}/backends.pid; error_log {tmp}/backends.err;
events {{ worker_connections 65536; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  server {{ listen 127.0.0.1:{P_V1} reuseport backlog=65535; location / {{ return 200 "v1 ok\\n"; }} }}
  server {{ listen 127.0.0.1:{P_V2} reuseport backlog=65535; location / {{ return 200 "v2 ok\\n"; }} }}
  server {{ listen 127.0.0.1:{P_H2_V1} http2 backlog=65535; location / {{ return 200 "v1 ok\\n"; }} }}
  server {{ listen 127.0.0.1:{P_H2_V2} http2 backlog=65535; location / {{ return 200 "v2 ok\\n"; }} }} }}
""")
    start(["nginx", "-c", backends, "-p", tmp])

    ha = os.path.join(tmp, "haproxy-http.cfg")
    acls = "".join(f"  acl r{i} path_beg {p}\n  use_backend b{i} if r{i}\n" for i, p in enumerate(PREFIXES))
    bks = "".join(f"backend b{i}\n  server s 127.0.0.1:{P_V1}\n" for i in range(len(PREFIXES)))
    with open(ha, "w") as f:
        f.write(f"""global
  nbthread 1
  maxconn {IDLE_CONNS + 200}
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout http-keep-alive 1h
  http-reuse always
frontend web
  bind 127.0.0.1:{P_HA}
  bind 127.0.0.1:{P_TLS_HA} ssl crt {pki}/bench.pem alpn http/1.1 ssl-min-ver TLSv1.3
{acls}  default_backend split
backend split
  balance random
  server v1 127.0.0.1:{P_V1} weight 90
  server v2 127.0.0.1:{P_V2} weight 10
{bks}frontend web2
  bind 127.0.0.1:{P_H2_HA} proto h2
  default_backend split2
backend split2
  balance random
  server v1 127.0.0.1:{P_H2_V1} weight 90 proto h2
  server v2 127.0.0.1:{P_H2_V2} weight 10 proto h2
""")
    start(["haproxy", "-f", ha])

    ngx = os.path.join(tmp, "nginx-proxy.conf")
    locs = "".join(f"    location {p} {{ proxy_pass http://127.0.0.1:{P_V1}; }}\n" for p in PREFIXES)
    with open(ngx, "w") as f:
        f.write(f"""worker_processes 1; daemon off; pid {tmp}/proxy.pid; error_log {tmp}/proxy.err;
events {{ worker_connections 65536; }}
http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 300s;
  split_clients "$request_id" $pool {{ 90% v1; * v2; }}
  upstream v1 {{ server 127.0.0.1:{P_V1}; keepalive 128; }}
  upstream v2 {{ server 127.0.0.1:{P_V2}; keepalive 128; }}
  server {{ listen 127.0.0.1:{P_NGX} backlog=65535; listen 127.0.0.1:{P_TLS_NGX} ssl backlog=65535;
    ssl_certificate {crt}; ssl_certificate_key {key}; ssl_protocols TLSv1.3;
    proxy_http_version 1.1; proxy_set_header Connection "";
{locs}    location / {{ proxy_pass http://$pool; }} }} }}
""")
    start(["nginx", "-c", ngx, "-p", tmp])

    mesh = os.path.join(tmp, "mesh")
    os.makedirs(mesh)
    rules = "".join(f"""  - match: [{{uri: {{prefix: {p}}}}}]
    route: [{{destination: {{host: app.bench.svc.cluster.local, subset: v1}}}}]
""" for p in PREFIXES)
    with open(os.path.join(mesh, "mesh.yaml"), "w") as f:
        f.write(f"""apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: web, namespace: bench}}
spec:
  servers:
  - port: {{number: {P_SL}, name: http, protocol: HTTP}}
    bind: 127.0.0.1
    hosts: ["*"]
  - port: {{number: {P_H2_SL}, name: http2, protocol: HTTP2}}
    bind: 127.0.0.1
    hosts: ["*"]
  - port: {{number: {P_TLS_SL}, name: https, protocol: HTTPS}}
    bind: 127.0.0.1
    hosts: ["*"]
    tls: {{mode: SIMPLE, serverCertificate: {crt}, privateKey: {key}, minProtocolVersion: TLSV1_3}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app, namespace: bench}}
spec:
  hosts: ["*"]
  gateways: [web]
  http:
  - match: [{{port: {P_H2_SL}}}]
    route:
    - {{destination: {{host: app2.bench.svc.cluster.local, subset: v1}}, weight: 90}}
    - {{destination: {{host: app2.bench.svc.cluster.local, subset: v2}}, weight: 10}}
{rules}  - route:
    - {{destination: {{host: app.bench.svc.cluster.local, subset: v1}}, weight: 90}}
    - {{destination: {{host: app.bench.svc.cluster.local, subset: v2}}, weight: 10}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: app, namespace: bench}}
spec:
  hosts: [app.bench.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {P_V1}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {P_V2}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: app, namespace: bench}}
spec:
  host: app.bench.svc.cluster.local
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: app2, namespace: bench}}
spec:
  hosts: [app2.bench.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 80, name: http2, protocol: HTTP2}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http2: {P_H2_V1}}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http2: {P_H2_V2}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: app2, namespace: bench}}
spec:
  host: app2.bench.svc.cluster.local
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
""")
    agent = start([SLUICE, "agent", "--local-config", mesh, "--workers", "1", "--metrics", "127.0.0.1:26520",
                   "--readiness", "127.0.0.1:26521", "--admin", "127.0.0.1:26522", "--state-dir", tmp],
                  stderr=open(os.path.join(tmp, "agent.log"), "w"))
    for p in [P_V1, P_V2, P_HA, P_NGX, P_SL, P_H2_V1, P_H2_V2, P_H2_HA, P_H2_SL, P_TLS_HA, P_TLS_NGX, P_TLS_SL]:
        wait_port(p)
    ha_pid = int(subprocess.check_output(["pgrep", "-n", "-f", f"haproxy -f {ha}"]).split()[0])
    master = int(subprocess.check_output(["pgrep", "-n", "-f", f"nginx -c {ngx}"]).split()[0])
    ngx_pids = [master] + [int(p) for p in subprocess.check_output(["pgrep", "-P", str(master)]).split()]
    return agent.pid, ha_pid, ngx_pids


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids):
    """(user, system) CPU seconds the processes have used so far (/proc/PID/stat)."""
    user = system = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11]) / TICK
        system += int(fields[12]) / TICK
    return user, system


def wrk(port, pids=(), scheme="http"):
    """requests/s, p99 ms, and the proxy's (user, system) CPU microseconds per request during the run."""
    before = cpu_seconds(pids)
    out = subprocess.check_output(["wrk", "-t1", f"-c{CONNS}", f"-d{SECONDS}s", "--latency",
                                   f"{scheme}://127.0.0.1:{port}/app/item"], text=True)
    after = cpu_seconds(pids)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    cpu = [(a - b) * 1e6 / max(1, requests) for a, b in zip(after, before)]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    if non2xx or errors:
        print(f"  wrk on {port}: non-2xx {non2xx and non2xx.group(1)}, errors {errors and errors.group(1)}",
              file=sys.stderr)
    return rps, p99, cpu


def h2load(port):
    """h2c: 100 concurrent streams over 10 connections; returns requests/s (only if every request succeeded)."""
    out = subprocess.check_output(["h2load", "-n", str(H2_REQUESTS), "-c", "10", "-m", "10",
                                   f"http://127.0.0.1:{port}/app/item"], text=True)
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    ok = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if not ok or int(ok.group(1)) != H2_REQUESTS:
        print(f"  h2load on {port}: {ok and ok.group(0)}", file=sys.stderr)
    return float(m.group(1))


def idle_keepalive_rss(pid, port):
    """KiB of proxy RSS per idle keep-alive connection that has served one request."""
    time.sleep(0.5)
    before = rss_kib(pid)
    socks = []
    for _ in range(IDLE_CONNS):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /app/item HTTP/1.1\r\nHost: bench\r\n\r\n")
        socks.append(s)
    for s in socks:
        data = b""
        while b"ok\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    time.sleep(1)
    after = rss_kib(pid)
    for s in socks:
        s.close()
    time.sleep(1)
    return (after - before) / IDLE_CONNS


def mallocs_per_request(pid, port):
    """libc malloc calls per request in the agent under wrk (a perf uprobe; root with perf only), else None."""
    if os.geteuid() != 0 or subprocess.run(["which", "perf"], capture_output=True).returncode != 0:
        return None
    libc = next((p for p in ["/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6"] if os.path.exists(p)), None)
    if libc is None:
        return None
    subprocess.run(["perf", "probe", "-q", "-x", libc, "malloc"], capture_output=True)
    load = subprocess.Popen(["wrk", "-t1", f"-c{CONNS}", "-d6s", f"http://127.0.0.1:{port}/app/item"],
                            stdout=subprocess.DEVNULL)
    time.sleep(1.5)
    before = metrics_count()
    out = subprocess.run(["perf", "stat", "-x,", "-e", "probe_libc:malloc", "-p", str(pid), "--", "sleep", "3"],
                         capture_output=True, text=True).stderr
    after = metrics_count()
    load.wait()
    m = re.search(r"^(\d+),", out, re.M)
    return int(m.group(1)) / max(1, after - before) if m else None


def metrics_count():
    out = subprocess.run(["curl", "-s", "http://127.0.0.1:26520/metrics"], capture_output=True, text=True).stdout
    return sum(float(l.split()[-1]) for l in out.splitlines() if l.startswith("istio_requests_total{"))


def main():
    if not os.path.exists(SLUICE):
        raise SystemExit("build first: make build-release")
    agent_pid, ha_pid, ngx_pids = setup()
    targets = {"direct": P_V1, "haproxy": P_HA, "nginx": P_NGX, "sluice": P_SL}
    proxy_pids = {"direct": [], "haproxy": [ha_pid], "nginx": ngx_pids, "sluice": [agent_pid]}
    raw = {n: {"rps": [], "p99_ms": [], "user_us": [], "sys_us": []} for n in targets}
    for r in range(ROUNDS):
        for name, port in targets.items():
            rps, p99, (user, system) = wrk(port, proxy_pids[name])
            raw[name]["rps"].append(rps)
            raw[name]["p99_ms"].append(p99)
            raw[name]["user_us"].append(user)
            raw[name]["sys_us"].append(system)
            print(f"round {r + 1} {name:8s} {rps:9.0f} req/s  p99 {p99:.2f} ms  proxy CPU/request "
                  f"{user:.1f} us user + {system:.1f} us sys", file=sys.stderr)
    tls_targets = {"haproxy": P_TLS_HA, "nginx": P_TLS_NGX, "sluice": P_TLS_SL}
    tlsraw = {n: {"rps": [], "p99_ms": [], "cpu_us": []} for n in tls_targets}
    for r in range(ROUNDS):
        for name, port in tls_targets.items():
            rps, p99, (user, system) = wrk(port, proxy_pids[name], scheme="https")
            tlsraw[name]["rps"].append(rps)
            tlsraw[name]["p99_ms"].append(p99)
            tlsraw[name]["cpu_us"].append(user + system)
            print(f"round {r + 1} https {name:8s} {rps:9.0f} req/s  p99 {p99:.2f} ms  CPU/request {user + system:.1f} us",
                  file=sys.stderr)
    h2_targets = {"direct": P_H2_V1, "haproxy": P_H2_HA, "sluice": P_H2_SL}
    h2raw = {n: [] for n in h2_targets}
    for r in range(ROUNDS):
        for name, port in h2_targets.items():
            rps = h2load(port)
            h2raw[name].append(rps)
            print(f"round {r + 1} h2 {name:8s} {rps:9.0f} req/s", file=sys.stderr)
    counted = metrics_count()
    mallocs = mallocs_per_request(agent_pid, P_SL)
    sl_conn = idle_keepalive_rss(agent_pid, P_SL)
    ha_conn = idle_keepalive_rss(ha_pid, P_HA)
    med = {n: {k: statistics.median(v) for k, v in d.items()} for n, d in raw.items()}
    json.dump({"rounds": ROUNDS, "seconds": SECONDS, "connections": CONNS, "raw": raw, "median": med,
               "tls_raw": tlsraw, "tls_median": {n: {k: statistics.median(v) for k, v in d.items()}
                                                  for n, d in tlsraw.items()},
               "h2_raw": h2raw, "h2_median": {n: statistics.median(v) for n, v in h2raw.items()},
               "h2_requests": H2_REQUESTS,
               "sluice_requests_counted": counted, "idle_conns": IDLE_CONNS, "mallocs_per_request": mallocs,
               "idle_keepalive_kib_per_conn": {"sluice": sl_conn, "haproxy": ha_conn}}, sys.stdout, indent=2)
    print()


def print_table(h):
    m = h["median"]
    print(f"\nHTTP/1.1 L7 (`Benchmarks/bench_http.py`: wrk -t1 -c{h['connections']} keep-alive, 10 route rules, 90/10 "
          f"split, one worker/thread each; medians of {h['rounds']} rounds of {h['seconds']}s):\n")
    print("| metric | direct | haproxy 2.6 | nginx | sluice | sluice / haproxy | target |")
    print("|---|---|---|---|---|---|---|")
    print(f"| requests/s | {m['direct']['rps']:,.0f} | {m['haproxy']['rps']:,.0f} | {m['nginx']['rps']:,.0f} | "
          f"{m['sluice']['rps']:,.0f} | {m['sluice']['rps'] / m['haproxy']['rps']:.2f}x | >= 1.2x |")
    print(f"| p99 latency, ms | {m['direct']['p99_ms']:.2f} | {m['haproxy']['p99_ms']:.2f} | {m['nginx']['p99_ms']:.2f} | "
          f"{m['sluice']['p99_ms']:.2f} | {m['sluice']['p99_ms'] / m['haproxy']['p99_ms']:.2f}x | <= 1.0x |")
    t = h.get("tls_median")
    if t:
        print(f"| HTTPS requests/s (TLS 1.3 terminated, keep-alive) | - | {t['haproxy']['rps']:,.0f} | "
              f"{t['nginx']['rps']:,.0f} | {t['sluice']['rps']:,.0f} | {t['sluice']['rps'] / t['haproxy']['rps']:.2f}x | - |")
        print(f"| HTTPS proxy CPU per request, us | - | {t['haproxy']['cpu_us']:.1f} | {t['nginx']['cpu_us']:.1f} | "
              f"{t['sluice']['cpu_us']:.1f} | {t['sluice']['cpu_us'] / t['haproxy']['cpu_us']:.2f}x | - |")
    h2 = h.get("h2_median")
    if h2:
        print(f"| h2c requests/s (h2load -c10 -m10, {h['h2_requests']:,} requests) | {h2['direct']:,.0f} | "
              f"{h2['haproxy']:,.0f} | - | {h2['sluice']:,.0f} | {h2['sluice'] / h2['haproxy']:.2f}x | >= 1.2x |")
    if "user_us" in m["sluice"]:
        cpu = {n: m[n]["user_us"] + m[n]["sys_us"] for n in ("haproxy", "nginx", "sluice")}
        print(f"| proxy CPU per request, us (user + sys) | - | {cpu['haproxy']:.1f} ({m['haproxy']['user_us']:.1f} + "
              f"{m['haproxy']['sys_us']:.1f}) | {cpu['nginx']:.1f} | {cpu['sluice']:.1f} ({m['sluice']['user_us']:.1f} + "
              f"{m['sluice']['sys_us']:.1f}) | {cpu['sluice'] / cpu['haproxy']:.2f}x | - |")
    k = h["idle_keepalive_kib_per_conn"]
    print(f"| RSS per idle keep-alive connection ({h['idle_conns']}), KiB | - | {k['haproxy']:.2f} | - | "
          f"{k['sluice']:.2f} | - | <= 4 KiB |")
    if h.get("mallocs_per_request") is not None:
        print(f"| libc malloc calls per request, steady-state HTTP/1.1 (perf uprobe) | - | - | - | "
              f"{h['mallocs_per_request']:.1f} | - | 0, or each explained |")
    print(f"\nistio_requests_total counted {h['sluice_requests_counted']:,.0f} requests during the run.")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--print":
        print_table(json.load(sys.stdin))
        sys.exit(0)
    try:
        main()
    finally:
        stop_all()
        subprocess.run(["pkill", "-f", f"nginx -c {tmp}"], check=False)
        subprocess.run(["pkill", "-f", f"haproxy -f {tmp}"], check=False)
