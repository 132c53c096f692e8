#!/usr/bin/env python3
"""HBONE benchmark (root): Sluice's mutual-TLS tunnels between two node agents vs a pair of haproxy instances doing
TLS origination and termination, and vs the bytes going direct (plaintext over the bridge), in one run.

Three network namespaces joined by a bridge (which has a namespace of its own), as the multi-node tests do:
node 0 runs `sluice control` (the CA), node 1 the client side, node 2 the servers (iperf3 and nginx).

  * direct:  client on node 1 -> server on node 2, plaintext.
  * haproxy: client -> haproxy on node 1 (mode tcp, nbthread 1, listening on node 1's loopback), which originates
             TLS 1.3 with a client certificate -> haproxy on node 2 (mode tcp, nbthread 1, `verify required`),
             which terminates it -> server. Both forced to TLS_AES_256_GCM_SHA384 (what Sluice negotiates with
             OpenSSL's defaults; the run checks both with `openssl s_client` and prints what each negotiated).
             Certificates: ECDSA P-256 from Tests/Fixtures/make_certs.sh (Sluice's mesh certificates are P-256).
  * sluice:  client in node 1's workloads cgroup dials the service's virtual address; node 1's agent (--workers 1)
             captures it with BPF and sends it through an HBONE tunnel (mutual TLS, HTTP/2 CONNECT) to node 2's
             agent (--workers 1) on 15008, which connects to the server.

Measured in interleaved rounds (the order rotates each round), medians reported:
  1. single-stream TCP throughput, iperf3 -t SECONDS, receiver bits/s; the CPU (user + sys, /proc/PID/stat) that
     the two proxies of a pair spent per GB carried.
  2. new connections/s: wrk -t1 -c32 with `Connection: close` to nginx on node 2 (a TCP port of the service, so
     Sluice relays it at L4). Each Sluice client connection is a new CONNECT stream over a pooled tunnel; each
     haproxy client connection is a new TLS connection between the pair (haproxy resumes TLS sessions on its
     server side by default: TLS 1.3 PSK + ECDHE, no certificates); also haproxy with `no-ssl-reuse` (a full
     handshake per connection), for the record.

Every client binds its source to node 1's workload address (iperf3 -B; wrk through a small LD_PRELOAD shim built
at start): Sluice names the caller by that address (see BIND_SHIM below).

Prints one JSON object on stdout (also written to Benchmarks/out/hbone.json); `--print` reads it and prints the
markdown table. Everything it creates (namespaces, cgroups, BPF pins, processes) is removed at the end, also on
failure; the logs stay in /tmp/sluice-bench-hbone-*. Environment: BENCH_HBONE_ROUNDS (default 5), BENCH_SECONDS
(5), SLUICE_BIN and SLUICE_BPF_DIR (default: the release build and .build/bpf).
"""
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import start, stop_all  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Overridable, e.g. to measure a snapshot of the binary and its BPF objects while the tree is being rebuilt.
SLUICE = os.environ.get("SLUICE_BIN", os.path.join(ROOT, ".build/release/sluice"))
BPF_DIR = os.environ.get("SLUICE_BPF_DIR", os.path.join(ROOT, ".build/bpf"))
ROUNDS = int(os.environ.get("BENCH_HBONE_ROUNDS", os.environ.get("BENCH_ROUNDS", "5")))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
CONNS = 32

PREFIX = "slbh"
ID = f"{PREFIX}{os.getpid()}"
SUBNET = "10.88.0"
NODES = 3
VIP = "240.10.0.1"
P_IPERF, P_HTTP = 5201, 8080                  # the servers on node 2 (and the service's ports)
P_HA1 = {"iperf": 25301, "http": 25302, "http_full": 25303}   # haproxy on node 1 (loopback)
P_HA2 = {"iperf": 15443, "http": 15444}       # haproxy on node 2 (TLS)
CIPHER = "TLS_AES_256_GCM_SHA384"
PIN = f"/sys/fs/bpf/{ID}-n1"
TICK = os.sysconf("SC_CLK_TCK")
SHIM = None

tmp = tempfile.mkdtemp(prefix="sluice-bench-hbone-")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def addr(i):
    return f"{SUBNET}.{i + 1}"


def ns(i):
    return f"{ID}-n{i}"


BRIDGE_NS = f"{ID}-br"


def cgroup2_mount():
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.startswith("cgroup2 "):
                return left.split()[4]
    raise SystemExit("no cgroup2 mount (needed to capture a node's workloads)")


CG_ROOT = os.path.join(cgroup2_mount(), ID)


def cg(i, leaf):
    return f"{CG_ROOT}/node{i}/{leaf}"


def ip(*args, check=True):
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SystemExit(f"ip {' '.join(args)} failed: {r.stderr.strip()}")
    return r


def in_node(i, cmd, leaf=None):
    """argv that runs `cmd` in node i's network namespace, in its cgroup `leaf` (agent/workloads) if given."""
    enter = ["nsenter", f"--net=/run/netns/{ns(i)}"]
    if leaf is None:
        return enter + cmd
    return ["/bin/sh", "-c", f'echo $$ > {cg(i, leaf)}/cgroup.procs && exec "$@"', "sh", *enter, *cmd]


def run(i, cmd, leaf=None, timeout=None, check=False):
    return subprocess.run(in_node(i, cmd, leaf), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          errors="replace", timeout=timeout, check=check)


# ---------------------------------------------------------------------------------------------------------------
# network and cgroups


def remove_cgroup(path):
    if not os.path.isdir(path):
        return
    for child in os.listdir(path):
        if os.path.isdir(os.path.join(path, child)):
            remove_cgroup(os.path.join(path, child))
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            pids = f.read().split()
        for pid in pids:
            try:
                with open(os.path.join(cgroup2_mount(), "cgroup.procs"), "w") as f:
                    f.write(pid)
            except OSError:
                pass
        os.rmdir(path)
    except OSError as e:
        log(f"could not remove cgroup {path}: {e}")


def sweep_stale():
    """Removes namespaces, cgroups and pins of earlier runs whose process is gone."""
    def dead(name):
        m = re.match(rf"{PREFIX}(\d+)", name)
        if not m:
            return False
        try:
            os.kill(int(m.group(1)), 0)
            return False
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split(" ")[0]
        if dead(name):
            ip("netns", "del", name, check=False)
    root = cgroup2_mount()
    for entry in os.listdir(root):
        if entry.startswith(PREFIX) and dead(entry):
            remove_cgroup(os.path.join(root, entry))
    if os.path.isdir("/sys/fs/bpf"):
        for entry in os.listdir("/sys/fs/bpf"):
            if entry.startswith(PREFIX) and dead(entry):
                subprocess.run([SLUICE, "agent", "--uninstall-bpf", "--pin-dir", f"/sys/fs/bpf/{entry}"],
                               capture_output=True)


def make_network():
    ip("netns", "add", BRIDGE_NS)
    ip("-n", BRIDGE_NS, "link", "add", "br0", "type", "bridge")
    ip("-n", BRIDGE_NS, "link", "set", "br0", "up")
    for i in range(NODES):
        ip("netns", "add", ns(i))
        a, b = f"{ID}a{i}", f"{ID}b{i}"
        ip("link", "add", a, "type", "veth", "peer", "name", b)
        ip("link", "set", a, "netns", ns(i))
        ip("link", "set", b, "netns", BRIDGE_NS)
        ip("-n", ns(i), "link", "set", a, "name", "eth0")
        ip("-n", ns(i), "addr", "add", f"{addr(i)}/24", "dev", "eth0")
        ip("-n", ns(i), "link", "set", "eth0", "up")
        ip("-n", ns(i), "link", "set", "lo", "up")
        ip("-n", BRIDGE_NS, "link", "set", b, "master", "br0")
        ip("-n", BRIDGE_NS, "link", "set", b, "up")
        # Short connections by the ten thousand: the whole port range, and TIME_WAIT reuse for outgoing ones.
        run(i, ["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1",
                "net.core.somaxconn=65535"], check=True)
        for leaf in ("agent", "workloads"):
            os.makedirs(cg(i, leaf), exist_ok=True)


def teardown():
    stop_all()
    subprocess.run([SLUICE, "agent", "--uninstall-bpf", "--pin-dir", PIN], capture_output=True)
    for i in range(NODES):
        ip("netns", "del", ns(i), check=False)
    ip("netns", "del", BRIDGE_NS, check=False)
    remove_cgroup(CG_ROOT)


# ---------------------------------------------------------------------------------------------------------------
# processes


def start_in(i, cmd, leaf, name):
    """Starts `cmd` in node i (cgroup leaf), its output in tmp/name.log. The Popen pid is the program's own: sh and
    nsenter exec it."""
    out = open(os.path.join(tmp, f"{name}.log"), "w")
    return start(in_node(i, cmd, leaf), stdout=out, stderr=subprocess.STDOUT)


def read_log(name):
    try:
        with open(os.path.join(tmp, f"{name}.log"), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def wait_for(what, condition, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what} (logs in {tmp})")


def wait_port(i, host, port, timeout=15):
    script = (f"for n in $(seq {timeout * 10}); do (exec 3<>/dev/tcp/{host}/{port}) 2>/dev/null && exit 0; "
              f"sleep 0.1; done; exit 1")
    if run(i, ["bash", "-c", script]).returncode != 0:
        raise SystemExit(f"nothing listens on {host}:{port} in node {i} (logs in {tmp})")


def cpu_seconds(pids):
    """user + system CPU seconds each process (all its threads) has used so far."""
    out = []
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) + int(fields[12])) / TICK)
    return out


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


# Sluice names the calling workload by the captured connection's source address, and the kernel picks the source of
# a connection to the service address after the BPF program rewrote its destination to the agent's loopback
# listener: 127.0.0.1, no workload. Clients therefore bind their source to the workload's address first (as the
# integration tests do: `curl --interface`, `socket.bind`): iperf3 with -B, wrk with this LD_PRELOAD shim that
# binds every IPv4 stream socket before connect() (IP_BIND_ADDRESS_NO_PORT: the port is still chosen by connect()
# against the whole 4-tuple). Every path gets the same client, shim included.
BIND_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <stdlib.h>
#include <sys/socket.h>
int connect(int fd, const struct sockaddr *to, socklen_t len) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    const char *a = getenv("BIND_ADDRESS");
    if (a && to && to->sa_family == AF_INET) {
        struct sockaddr_in me = {.sin_family = AF_INET};
        socklen_t n = sizeof me;
        if (getsockname(fd, (struct sockaddr *)&me, &n) == 0 && me.sin_addr.s_addr == 0 && me.sin_port == 0) {
            int one = 1;
            setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
            struct sockaddr_in src = {.sin_family = AF_INET};
            inet_pton(AF_INET, a, &src.sin_addr);
            bind(fd, (struct sockaddr *)&src, sizeof src);
        }
    }
    return real(fd, to, len);
}
"""


def build_shim():
    src = write(os.path.join(tmp, "bindshim.c"), BIND_SHIM)
    lib = os.path.join(tmp, "bindshim.so")
    cc = next((c for c in ("cc", "gcc", "clang") if subprocess.run(["which", c], capture_output=True).returncode == 0),
              None)
    if cc is None:
        raise SystemExit("no C compiler for the source-binding shim (apt-get install gcc)")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", lib, src, "-ldl"], check=True)
    return lib


def start_servers():
    """iperf3 and nginx (keep-alive off: one request per connection) on node 2, as its workloads."""
    start_in(2, ["iperf3", "-s", "-B", addr(2), "-p", str(P_IPERF)], "workloads", "iperf3")
    conf = write(os.path.join(tmp, "nginx.conf"), f"""worker_processes 1; daemon off; pid {tmp}/nginx.pid;
error_log {tmp}/nginx.err;
events {{ worker_connections 65536; }}
http {{ access_log off;
  server {{ listen {addr(2)}:{P_HTTP} reuseport backlog=65535; keepalive_timeout 0;
    location / {{ return 200 "ok\\n"; }} }} }}
""")
    start_in(2, ["nginx", "-c", conf, "-p", tmp], "workloads", "nginx")
    wait_port(2, addr(2), P_IPERF)
    wait_port(2, addr(2), P_HTTP)


def start_haproxy_pair():
    pki = os.path.join(tmp, "pki")
    subprocess.run(["sh", os.path.join(ROOT, "Tests/Fixtures/make_certs.sh"), pki, "server.bench", "client.bench"],
                   check=True)
    for name in ("server.bench", "client.bench"):
        with open(os.path.join(pki, f"{name}.pem"), "w") as f:
            f.write(open(os.path.join(pki, f"{name}.crt")).read() + open(os.path.join(pki, f"{name}.key")).read())
    common = """defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
"""
    # Node 1: originates TLS 1.3 with a client certificate, verifies the server's (name and CA).
    tls = (f"ssl crt {pki}/client.bench.pem ca-file {pki}/ca.crt verify required verifyhost server.bench "
           f"sni str(server.bench)")
    conf1 = write(os.path.join(tmp, "haproxy-n1.cfg"), f"""global
  nbthread 1
  maxconn 4000
  ssl-default-server-ciphersuites {CIPHER}
  ssl-default-server-options ssl-min-ver TLSv1.3
{common}listen iperf
  bind 127.0.0.1:{P_HA1['iperf']}
  server s {addr(2)}:{P_HA2['iperf']} {tls}
listen http
  bind 127.0.0.1:{P_HA1['http']}
  server s {addr(2)}:{P_HA2['http']} {tls}
listen http_full
  bind 127.0.0.1:{P_HA1['http_full']}
  server s {addr(2)}:{P_HA2['http']} {tls} no-ssl-reuse
""")
    # Node 2: terminates TLS 1.3, requires a client certificate from the same CA.
    bind = f"ssl crt {pki}/server.bench.pem ca-file {pki}/ca.crt verify required"
    conf2 = write(os.path.join(tmp, "haproxy-n2.cfg"), f"""global
  nbthread 1
  maxconn 4000
  ssl-default-bind-ciphersuites {CIPHER}
  ssl-default-bind-options ssl-min-ver TLSv1.3
{common}listen iperf
  bind {addr(2)}:{P_HA2['iperf']} {bind}
  server s {addr(2)}:{P_IPERF}
listen http
  bind {addr(2)}:{P_HA2['http']} {bind}
  server s {addr(2)}:{P_HTTP}
""")
    # In the nodes' agent cgroups (infrastructure, not captured).
    ha2 = start_in(2, ["haproxy", "-f", conf2], "agent", "haproxy-n2")
    ha1 = start_in(1, ["haproxy", "-f", conf1], "agent", "haproxy-n1")
    for port in P_HA2.values():
        wait_port(2, addr(2), port)
    for port in P_HA1.values():
        wait_port(1, "127.0.0.1", port)
    return [ha1.pid, ha2.pid], pki


MESH = f"""apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: client, namespace: shop, annotations: {{sluice.dev/node: n1}}}}
spec: {{address: {addr(1)}, labels: {{app: client}}, serviceAccount: client}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: server, namespace: shop, annotations: {{sluice.dev/node: n2}}}}
spec: {{address: {addr(2)}, labels: {{app: server}}, serviceAccount: server}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: server, namespace: shop}}
spec:
  hosts: [server.shop.svc.cluster.local]
  addresses: [{VIP}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: {P_IPERF}, name: tcp-bench, protocol: TCP}}
  - {{number: {P_HTTP}, name: tcp-web, protocol: TCP}}
  workloadSelector: {{labels: {{app: server}}}}
"""


def start_sluice():
    mesh = os.path.join(tmp, "mesh")
    os.makedirs(mesh)
    write(os.path.join(mesh, "mesh.yaml"), MESH)
    write(os.path.join(tmp, "tokens"), "tok-n1 n1\ntok-n2 n2\n")
    start_in(0, [SLUICE, "control", "--state-dir", f"{tmp}/ca", "--config", mesh, "--join-tokens", f"{tmp}/tokens",
                 "--listen", f"{addr(0)}:15012", "--metrics", "127.0.0.1:15014"], "agent", "control")
    wait_for("the CA", lambda: os.path.exists(f"{tmp}/ca/control.crt"), 20)
    agents = []
    for node in (1, 2):
        token = write(os.path.join(tmp, f"n{node}.token"), f"tok-n{node}\n")
        args = [SLUICE, "agent", "--local-config", mesh, "--node", f"n{node}", "--workers", "1",
                "--control", f"{addr(0)}:15012", "--ca-root", f"{tmp}/ca/root-cert.pem", "--join-token", token,
                "--state-dir", f"{tmp}/n{node}", "--dns-port", "0", "--metrics", "127.0.0.1:15020",
                "--readiness", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
        if node == 1:
            args += ["--cgroup", cg(1, "workloads"), "--pin-dir", PIN, "--bpf-dir", BPF_DIR]
        agents.append(start_in(node, args, "agent", f"agent-n{node}"))
    for node in (1, 2):
        wait_for(f"node {node}'s tunnel credentials",
                 lambda: "tunnel credentials loaded" in read_log(f"agent-n{node}") or agents[node - 1].poll() is not None,
                 30)
        if agents[node - 1].poll() is not None:
            raise SystemExit(f"node {node}'s agent exited:\n{read_log(f'agent-n{node}')[-3000:]}")
    return [a.pid for a in agents]


def warm_up():
    """One request through each path (opens Sluice's tunnel, and haproxy's first TLS session)."""
    urls = {"direct": (None, f"http://{addr(2)}:{P_HTTP}/"), "haproxy": (None, f"http://127.0.0.1:{P_HA1['http']}/"),
            "sluice": ("workloads", f"http://{VIP}:{P_HTTP}/")}
    for name, (leaf, url) in urls.items():
        end = time.time() + 20
        while True:
            r = run(1, ["curl", "-s", "--max-time", "3", "--interface", addr(1), "-o", "/dev/null", "-w",
                        "%{http_code}", url], leaf)
            if r.stdout == "200":
                break
            if time.time() > end:
                raise SystemExit(f"{name}: {url} does not answer 200 ({r.stdout!r}); logs in {tmp}")
            time.sleep(0.2)


def negotiated(i, target, sni, cert, key, ca):
    """What `openssl s_client` negotiates with target (protocol, cipher suite, group)."""
    r = run(i, ["openssl", "s_client", "-connect", target, "-servername", sni, "-cert", cert, "-key", key,
                "-CAfile", ca, "-brief"], timeout=10)
    text = r.stdout + r.stderr
    proto = re.search(r"Protocol version: (\S+)", text)
    suite = re.search(r"Ciphersuite: (\S+)", text)
    group = re.search(r"(?:Negotiated TLS1.3 group|Server Temp Key): ([^\n]+)", text)
    return " ".join(m.group(1).strip() for m in (proto, suite, group) if m) or text.strip()[-300:]


def hbone_metrics(i):
    """Node i's sluice_hbone_* counters, summed over workers, keyed by name and the labels other than worker."""
    r = run(i, ["curl", "-s", "--max-time", "5", "http://127.0.0.1:15020/metrics"])
    out = {}
    for line in r.stdout.splitlines():
        if not line.startswith("sluice_hbone_"):
            continue
        name_labels, _, value = line.rpartition(" ")
        key = re.sub(r'worker="[^"]*",?', "", name_labels).replace(",}", "}").replace("{}", "")
        out[key] = out.get(key, 0) + float(value)
    return out


# ---------------------------------------------------------------------------------------------------------------
# measurements


def iperf(target, leaf, pids):
    """(Gbit/s received, [CPU seconds per GB received of each proxy: node 1's, node 2's] or None, error or None)."""
    host, port = target
    before = cpu_seconds(pids)
    r = run(1, ["iperf3", "-B", addr(1), "-c", host, "-p", str(port), "-t", str(SECONDS), "-J"], leaf,
            timeout=SECONDS + 30)
    after = cpu_seconds(pids)
    try:
        end = json.loads(r.stdout)["end"]["sum_received"]
        gb = end["bytes"] / 1e9
        return end["bits_per_second"] / 1e9, ([(a - b) / gb for a, b in zip(after, before)] or None), None
    except (ValueError, KeyError) as e:
        return None, None, f"iperf3 exit {r.returncode}: {(r.stdout + r.stderr).strip()[-400:]} ({e})"


def conn_rate(url, leaf, pids):
    """(connections/s, [CPU microseconds per connection of each proxy] or None, error text or None)."""
    before = cpu_seconds(pids)
    r = run(1, ["env", f"LD_PRELOAD={SHIM}", f"BIND_ADDRESS={addr(1)}", "wrk", "-t1", f"-c{CONNS}",
                f"-d{SECONDS}s", "-H", "Connection: close", url], leaf, timeout=SECONDS + 30)
    after = cpu_seconds(pids)
    m = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    total = re.search(r"(\d+) requests in", r.stdout)
    if not m:
        return None, None, f"wrk exit {r.returncode}: {(r.stdout + r.stderr).strip()[-400:]}"
    problems = [p.group(0) for p in (re.search(r"Socket errors: .*", r.stdout),
                                     re.search(r"Non-2xx or 3xx responses: \d+", r.stdout)) if p]
    cpu = [(a - b) * 1e6 / max(1, int(total.group(1))) for a, b in zip(after, before)] or None
    return float(m.group(1)), cpu, ("; ".join(problems) or None)


def median(values):
    v = [x for x in values if x is not None]
    return statistics.median(v) if v else None


def main():
    if os.geteuid() != 0:
        raise SystemExit("bench_hbone.py needs root (network namespaces, cgroups, BPF)")
    if not os.path.exists(SLUICE):
        raise SystemExit("build first: make build-release")
    sweep_stale()
    try:
        global SHIM
        SHIM = build_shim()
        make_network()
        start_servers()
        ha_pids, pki = start_haproxy_pair()
        sl_pids = start_sluice()
        warm_up()
        tls = {
            "sluice": negotiated(1, f"{addr(2)}:15008", "server.shop.hbone.sluice",
                                 f"{tmp}/n1/certs/shop_client.crt", f"{tmp}/n1/certs/shop_client.key",
                                 f"{tmp}/ca/root-cert.pem"),
            "haproxy": negotiated(1, f"{addr(2)}:{P_HA2['iperf']}", "server.bench", f"{pki}/client.bench.crt",
                                  f"{pki}/client.bench.key", f"{pki}/ca.crt"),
        }
        log(f"TLS negotiated: sluice {tls['sluice']}; haproxy {tls['haproxy']}")
        metrics_before = {n: hbone_metrics(n) for n in (1, 2)}
        iperf_targets = {"direct": ((addr(2), P_IPERF), None, []),
                         "haproxy": (("127.0.0.1", P_HA1["iperf"]), None, ha_pids),
                         "sluice": ((VIP, P_IPERF), "workloads", sl_pids)}
        http_targets = {"direct": (f"http://{addr(2)}:{P_HTTP}/", None, []),
                        "haproxy": (f"http://127.0.0.1:{P_HA1['http']}/", None, ha_pids),
                        "haproxy_full": (f"http://127.0.0.1:{P_HA1['http_full']}/", None, ha_pids),
                        "sluice": (f"http://{VIP}:{P_HTTP}/", "workloads", sl_pids)}
        raw = {"gbps": {n: [] for n in iperf_targets}, "cpu_s_per_gb": {n: [] for n in iperf_targets},
               "conns_per_s": {n: [] for n in http_targets}, "cpu_us_per_conn": {n: [] for n in http_targets},
               "errors": []}
        for r in range(ROUNDS):
            names = list(iperf_targets)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                target, leaf, pids = iperf_targets[name]
                g, cpu, err = iperf(target, leaf, pids)
                raw["gbps"][name].append(g)
                raw["cpu_s_per_gb"][name].append(cpu)
                if err:
                    raw["errors"].append(f"round {r + 1} iperf {name}: {err}")
                    log(f"round {r + 1} iperf {name}: FAILED {err}")
                else:
                    log(f"round {r + 1} iperf {name:12s} {g:6.2f} Gbit/s" +
                        (f"  proxies' CPU {sum(cpu):.2f} s/GB (n1 {cpu[0]:.2f} + n2 {cpu[1]:.2f})" if cpu else ""))
            names = list(http_targets)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                url, leaf, pids = http_targets[name]
                c, cpu, err = conn_rate(url, leaf, pids)
                raw["conns_per_s"][name].append(c)
                raw["cpu_us_per_conn"][name].append(cpu)
                if err:
                    raw["errors"].append(f"round {r + 1} wrk {name}: {err}")
                    log(f"round {r + 1} wrk {name}: {err}")
                if c is not None:
                    log(f"round {r + 1} conns {name:12s} {c:8.0f}/s" +
                        (f"  proxies' CPU {sum(cpu):.0f} us/conn (n1 {cpu[0]:.0f} + n2 {cpu[1]:.0f})" if cpu else ""))
        metrics_after = {n: hbone_metrics(n) for n in (1, 2)}
        delta = {n: {k: v - metrics_before[n].get(k, 0) for k, v in metrics_after[n].items()
                     if v - metrics_before[n].get(k, 0)} for n in (1, 2)}
        failed_logs = {}
        for node in (1, 2):
            lines = [l for l in read_log(f"agent-n{node}").splitlines()
                     if re.search(r"level=(warning|error)", l) and "opens no listener" not in l]
            if lines:
                failed_logs[f"agent-n{node}"] = lines[-20:]
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()} {os.cpu_count()} cores, kernel {platform.release()}",
            "rounds": ROUNDS, "seconds": SECONDS, "connections": CONNS,
            "haproxy_version": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n")[0],
            "tls": tls,
            "sluice_binary": SLUICE,
            "bpf_dir": BPF_DIR,
            "raw": raw,
            "median": {
                "gbps": {n: median(v) for n, v in raw["gbps"].items()},
                "conns_per_s": {n: median(v) for n, v in raw["conns_per_s"].items()},
                "cpu_s_per_gb": {n: median([sum(x) if x else None for x in v]) for n, v in raw["cpu_s_per_gb"].items()},
                "cpu_us_per_conn": {n: median([sum(x) if x else None for x in v])
                                    for n, v in raw["cpu_us_per_conn"].items()},
                "cpu_s_per_gb_by_node": {n: [median([x[i] if x else None for x in v]) for i in (0, 1)]
                                         for n, v in raw["cpu_s_per_gb"].items()},
                "cpu_us_per_conn_by_node": {n: [median([x[i] if x else None for x in v]) for i in (0, 1)]
                                            for n, v in raw["cpu_us_per_conn"].items()},
            },
            "hbone_metrics_delta": {f"n{n}": d for n, d in delta.items()},
            "hbone_metrics_total": {f"n{n}": metrics_after[n] for n in (1, 2)},
            "agent_log_warnings": failed_logs,
        }
        os.makedirs(os.path.join(ROOT, "Benchmarks/out"), exist_ok=True)
        with open(os.path.join(ROOT, "Benchmarks/out/hbone.json"), "w") as f:
            json.dump(result, f, indent=2)
        json.dump(result, sys.stdout, indent=2)
        print()
    finally:
        teardown()


def fmt(v, spec):
    return "failed" if v is None else format(v, spec)


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def print_table(h):
    m = h["median"]
    g, c = m["gbps"], m["conns_per_s"]
    gb, conn = m["cpu_s_per_gb"], m["cpu_us_per_conn"]
    gbn, connn = m["cpu_s_per_gb_by_node"], m["cpu_us_per_conn_by_node"]

    def split(total, sides, spec):
        if total is None:
            return "failed"
        return f"{format(total, spec)} ({format(sides[0], spec)} + {format(sides[1], spec)})"

    print(f"\nHBONE between two nodes (`Benchmarks/bench_hbone.py`, {h['date']}, {h['machine']}; network namespaces on "
          f"one bridge; medians of {h['rounds']} interleaved rounds of {h['seconds']}s; one worker/thread per proxy):\n")
    print("| metric | direct (plaintext) | haproxy pair (TLS 1.3, mutual) | sluice pair (HBONE) | sluice / haproxy | "
          "sluice / direct | target |")
    print("|---|---|---|---|---|---|---|")
    print(f"| single-stream TCP node 1 -> node 2 (iperf3 -t{h['seconds']}), Gbit/s | {fmt(g['direct'], '.2f')} | "
          f"{fmt(g['haproxy'], '.2f')} | {fmt(g['sluice'], '.2f')} | **{ratio(g['sluice'], g['haproxy'])}** | "
          f"{ratio(g['sluice'], g['direct'])} | >= 1.0x haproxy |")
    print(f"| CPU of the two proxies per GB carried, s (node 1 + node 2) | - | "
          f"{split(gb['haproxy'], gbn['haproxy'], '.2f')} | {split(gb['sluice'], gbn['sluice'], '.2f')} | "
          f"{ratio(gb['sluice'], gb['haproxy'])} | - | - |")
    print(f"| new connections/s (wrk -t1 -c{h['connections']}, `Connection: close`) | {fmt(c['direct'], '.0f')} | "
          f"{fmt(c['haproxy'], '.0f')} (a TLS connection each, session resumed) | "
          f"{fmt(c['sluice'], '.0f')} (a CONNECT stream each, pooled tunnel) | "
          f"**{ratio(c['sluice'], c['haproxy'])}** | {ratio(c['sluice'], c['direct'])} | - |")
    print(f"| CPU of the two proxies per connection, us (node 1 + node 2) | - | "
          f"{split(conn['haproxy'], connn['haproxy'], '.0f')} | {split(conn['sluice'], connn['sluice'], '.0f')} | "
          f"{ratio(conn['sluice'], conn['haproxy'])} | - | - |")
    print(f"| new connections/s, haproxy `no-ssl-reuse` (full handshake each) | - | {fmt(c['haproxy_full'], '.0f')} "
          f"(CPU {split(conn['haproxy_full'], connn['haproxy_full'], '.0f')} us) | - | "
          f"{ratio(c['sluice'], c['haproxy_full'])} | - | for the record |")
    print(f"\nTLS as negotiated (`openssl s_client` from node 1): sluice `{h['tls']['sluice']}`; "
          f"haproxy pair `{h['tls']['haproxy']}` ({h['haproxy_version']}).")
    for node, d in h["hbone_metrics_delta"].items():
        if d:
            print(f"\n{node} HBONE counters during the measured rounds: " +
                  ", ".join(f"`{k}` +{v:,.0f}" for k, v in sorted(d.items())))
    opened = {n: sum(v for k, v in t.items() if k.startswith("sluice_hbone_tunnels_opened_total"))
              for n, t in h["hbone_metrics_total"].items()}
    print(f"\nHBONE tunnels opened in the whole run (warm-up included): " +
          ", ".join(f"{n} {v:,.0f}" for n, v in opened.items()) + " (node 2's count includes the `openssl s_client` probe).")
    r = h["raw"]
    print("\nRounds: " + "; ".join(f"{n} " + "/".join(fmt(x, ".2f") for x in r["gbps"][n]) + " Gbit/s"
                                    for n in r["gbps"]) + " — " +
          "; ".join(f"{n} " + "/".join(fmt(x, ".0f") for x in r["conns_per_s"][n]) + " conn/s"
                    for n in r["conns_per_s"]) + ".")
    if r["errors"]:
        print("\nErrors: " + " | ".join(r["errors"]))
    for name, lines in h.get("agent_log_warnings", {}).items():
        print(f"\n{name} log warnings/errors (last {len(lines)}):\n" + "\n".join(f"    {l}" for l in lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--print":
        print_table(json.load(sys.stdin))
        sys.exit(0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
