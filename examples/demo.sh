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

# HTTP: a Gateway listener routes each request with a VirtualService (examples/l7/mesh.yaml); its HTTPS server
# presents a certificate from a throwaway CA.
PKI=$(mktemp -d)
sh Tests/Fixtures/make_certs.sh "$PKI" shop.demo.example
mkdir -p "$PKI/credentials/shop-cert"
cp "$PKI/shop.demo.example.crt" "$PKI/credentials/shop-cert/tls.crt"
cp "$PKI/shop.demo.example.key" "$PKI/credentials/shop-cert/tls.key"
$BIN agent --local-config examples/l7 --metrics 127.0.0.1:15040 --readiness 127.0.0.1:15041 --admin 127.0.0.1:15042 \
  --workers 1 --credentials-dir "$PKI/credentials" 2>/dev/null &
L7=$!
for _ in $(seq 50); do curl -sf 127.0.0.1:15041/healthz/ready >/dev/null && break; sleep 0.1; done
echo
echo "HTTP gateway on 127.0.0.1:18090 (examples/l7/mesh.yaml):"
CFG=$(mktemp)
for _ in $(seq 200); do printf 'url = "http://127.0.0.1:18090/item"\noutput = "/dev/null"\n'; done > "$CFG"
echo "  canary 90/10 over 200 requests: $(curl -s -K "$CFG" -w '%header{x-backend}\n' | sort | uniq -c | xargs)"
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
  trap 'kill $BACKENDS $HTTP_BACKENDS $AGENT $L7 $CAPTURE 2>/dev/null; wait 2>/dev/null; $BIN agent --uninstall-bpf --pin-dir '$PIN' >/dev/null; rmdir '"$CG"' 2>/dev/null' EXIT
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
