#!/usr/bin/env bash
# One-host demo: two TCP backends and the agent balancing between them on 127.0.0.1:18080.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.build/debug/sluice
python3 Tests/Fixtures/backend.py tag:18081:backend-v1 tag:18082:backend-v2 &
BACKENDS=$!
python3 Tests/Fixtures/http_backend.py v1:18091 v2:18092 </dev/null >/dev/null &
HTTP_BACKENDS=$!
trap 'kill $BACKENDS $HTTP_BACKENDS 2>/dev/null; kill $AGENT $L7 2>/dev/null; wait 2>/dev/null' EXIT
sleep 0.5
$BIN agent --local-config examples/l4 --metrics 127.0.0.1:15020 --readiness 127.0.0.1:15021 &
AGENT=$!
for _ in $(seq 50); do curl -sf 127.0.0.1:15021/healthz/ready >/dev/null && break; sleep 0.1; done
echo
echo "Sluice agent is proxying 127.0.0.1:18080 -> echo.demo.svc.cluster.local (two endpoints, round robin)."
echo "Each connection answers with the backend's name, then echoes what you send."
echo "Try:   python3 -c 'import socket; s=socket.create_connection((\"127.0.0.1\",18080)); print(s.recv(64))'"
echo "       curl -s 127.0.0.1:15020/metrics | grep istio_tcp"
echo "Here are four connections:"
for i in 1 2 3 4; do
  python3 -c 'import socket; s=socket.create_connection(("127.0.0.1",18080)); print("  connection answered by", s.recv(64).decode().strip())'
done
echo
curl -s 127.0.0.1:15020/metrics | grep '^istio_tcp_connections_opened_total' | sed 's/{.*}/{...}/'

# HTTP through the control plane: `sluice control` holds the mesh, the agent gets its node's part over its stream
# (no --local-config), and `sluice apply` changes it live.
PKI=$(mktemp -d)
sh Tests/Fixtures/make_certs.sh "$PKI" shop.demo.example
mkdir -p "$PKI/credentials/shop-cert"
cp "$PKI/shop.demo.example.crt" "$PKI/credentials/shop-cert/tls.crt"
cp "$PKI/shop.demo.example.key" "$PKI/credentials/shop-cert/tls.key"
echo "tok-demo demo-node" > "$PKI/join-tokens"
echo "tok-demo" > "$PKI/demo-node.token"
$BIN control --state-dir "$PKI/control" --join-tokens "$PKI/join-tokens" --listen 127.0.0.1:15012 \
  --api 127.0.0.1:15017 --stream 127.0.0.1:15010 --metrics 127.0.0.1:15014 2>"$PKI/control.log" &
CONTROL=$!
trap 'kill $BACKENDS $HTTP_BACKENDS 2>/dev/null; kill $AGENT $L7 $CONTROL 2>/dev/null; wait 2>/dev/null' EXIT
for _ in $(seq 100); do grep -q "control plane ready" "$PKI/control.log" 2>/dev/null && break; sleep 0.1; done
sluice() { $BIN "$1" --kubeconfig "$PKI/control/admin.kubeconfig" "${@:2}"; }
echo
echo "Control plane on 127.0.0.1:15012 (CA), :15010 (agent stream), :15017 (config API). sluice apply -f examples/l7:"
sluice apply -f examples/l7 | sed 's/^/  /'
$BIN agent --control 127.0.0.1:15012 --ca-root "$PKI/control/root-cert.pem" --join-token "$PKI/demo-node.token" \
  --node demo-node --state-dir "$PKI/agent" --metrics 127.0.0.1:15040 --readiness 127.0.0.1:15041 \
  --admin 127.0.0.1:15042 --workers 1 --credentials-dir "$PKI/credentials" 2>"$PKI/agent.log" &
L7=$!
for _ in $(seq 100); do curl -sf 127.0.0.1:15041/healthz/ready >/dev/null && break; sleep 0.1; done
for _ in $(seq 100); do sluice status 2>/dev/null | grep -q SYNCED && break; sleep 0.1; done
echo "sluice status:"
sluice status | sed 's/^/  /'
echo
echo "HTTP gateway on 127.0.0.1:18090, pushed by the control plane:"
CFG=$(mktemp)
for _ in $(seq 200); do printf 'url = "http://127.0.0.1:18090/item"\noutput = "/dev/null"\n'; done > "$CFG"
split() { curl -s -K "$CFG" -w '%header{x-backend}\n' | sort | uniq -c | xargs; }
echo "  canary 90/10 over 200 requests: $(split)"
# Traffic keeps flowing while the weight changes: one request every 10 ms, none may fail.
( while :; do curl -s -o /dev/null -w '%{http_code}\n' --max-time 2 127.0.0.1:18090/item; sleep 0.01; done ) > "$PKI/during" &
TRAFFIC=$!
sleep 0.5
sed -e 's/subset: v1}, weight: 90/subset: v1}, weight: 50/' -e 's/subset: v2}, weight: 10/subset: v2}, weight: 50/' \
  examples/l7/mesh.yaml | sluice apply -f - | grep virtualservice | sed 's/^/  sluice apply (weights 50\/50): /'
for _ in $(seq 100); do sluice status 2>/dev/null | grep -q SYNCED && break; sleep 0.05; done
sleep 0.5
kill $TRAFFIC; wait $TRAFFIC 2>/dev/null || true
echo "  while it changed: $(sort "$PKI/during" | uniq -c | xargs) (HTTP status: requests)"
echo "  canary 50/50 over 200 requests: $(split)"
rm -f "$CFG"
echo "  /flaky fails twice, retries hide it: $(curl -s 127.0.0.1:18090/flaky/demo-$$/2)"
echo "  fault injection on /teapot: HTTP $(curl -s -o /dev/null -w '%{http_code}' 127.0.0.1:18090/teapot)"
HTTPS="curl -s --cacert $PKI/ca.crt --resolve shop.demo.example:18443:127.0.0.1"
echo "  HTTPS on 18443 (TLS terminated by the agent): $($HTTPS -o /dev/null -w 'HTTP/%{http_version} %{http_code}, certificate verified: %{ssl_verify_result}' https://shop.demo.example:18443/item) (0 = ok)"
echo "  and HTTP/1.1 by ALPN: $($HTTPS --http1.1 -o /dev/null -w 'HTTP/%{http_version} %{http_code}' https://shop.demo.example:18443/item)"
rm -rf "$PKI"
curl -s 127.0.0.1:15040/metrics | grep -E '^istio_requests_total' | sed -E 's/\{.*destination_version="([^"]*)".*response_code="([^"]*)".*\}/{version=\1,code=\2}/; s/^/  /'

# Kernel capture (root only): the same backends behind service addresses, dialled from a cgroup.
if [ "$(id -u)" = 0 ]; then
  CG2=$(awk '$0 ~ / - cgroup2 / {print $5; exit}' /proc/self/mountinfo)
  if [ -z "$CG2" ]; then mkdir -p /run/sluice/cgroup2 && mount -t cgroup2 none /run/sluice/cgroup2 && CG2=/run/sluice/cgroup2; fi
  CG=$CG2/sluice-demo
  PIN=/sys/fs/bpf/sluice-demo
  mkdir -p "$CG"
  $BIN agent --local-config examples/capture --node demo-node --cgroup "$CG" --pin-dir $PIN --workers 1 \
    --metrics 127.0.0.1:15030 --readiness 127.0.0.1:15031 --admin 127.0.0.1:15032 --outbound-port 15101 \
    --dns-port 15153 --dns-upstream 127.0.0.1:9 2>/dev/null &
  CAPTURE=$!
  trap 'kill $BACKENDS $HTTP_BACKENDS $AGENT $L7 $CONTROL $CAPTURE 2>/dev/null; wait 2>/dev/null; $BIN agent --uninstall-bpf --pin-dir '$PIN' >/dev/null; rmdir '"$CG"' 2>/dev/null' EXIT
  for _ in $(seq 50); do curl -sf 127.0.0.1:15031/healthz/ready >/dev/null && break; sleep 0.1; done
  echo
  echo "Kernel capture: a process in cgroup $CG dials service addresses (examples/capture/mesh.yaml)."
  sh -c "echo \$\$ > $CG/cgroup.procs && exec python3 -" <<'PY'
import socket, struct
for i in range(4):
    s = socket.create_connection(("127.96.0.10", 9000))
    print("  echo.demo (127.96.0.10:9000, balanced in the kernel) answered by", s.recv(64).decode().strip(),
          "- peer seen by the app:", "%s:%d" % s.getpeername())
import http.client
for canary in ("no", "yes"):
    c = http.client.HTTPConnection("127.96.0.11", 80, timeout=5)
    c.request("GET", "/", headers={"Host": "web.demo.svc.cluster.local", "x-canary": canary})
    r = c.getresponse()
    print("  web.demo (127.96.0.11:80, HTTP: captured, routed by its VirtualService), x-canary: %s ->" % canary,
          r.status, r.getheader("x-backend"))
q = struct.pack(">HHHHHH", 7, 0x100, 1, 0, 0, 0) + b"".join(bytes([len(l)]) + l.encode() for l in "echo.demo.svc.cluster.local".split(".")) + b"\0\0\1\0\1"
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
u.sendto(q, ("127.0.0.53", 53))
r, src = u.recvfrom(512)
print("  DNS echo.demo.svc.cluster.local ->", socket.inet_ntoa(r[-4:]), "(answered by the agent; reply from %s:%d)" % src)
PY
  curl -s 127.0.0.1:15030/metrics | grep -E '^sluice_bpf_(connects|balanced|redirected|dns_queries)_total' | sed 's/^/  /'
fi
if [ -t 0 ] && [ -z "${DEMO_EXIT:-}" ]; then
  echo "Agent keeps running; press Ctrl-C to stop."
  wait $AGENT
fi
