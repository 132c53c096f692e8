#!/usr/bin/env bash
# One-host demo: two TCP backends and the agent balancing between them on 127.0.0.1:18080.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.build/debug/sluice
python3 Tests/Fixtures/backend.py tag:18081:backend-v1 tag:18082:backend-v2 &
BACKENDS=$!
trap 'kill $BACKENDS 2>/dev/null; kill $AGENT 2>/dev/null; wait 2>/dev/null' EXIT
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
if [ -t 0 ] && [ -z "${DEMO_EXIT:-}" ]; then
  echo "Agent keeps running; press Ctrl-C to stop."
  wait $AGENT
fi
