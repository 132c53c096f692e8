#!/usr/bin/env bash
# Peer benchmark: Sluice vs haproxy (mode tcp, nbthread 1) vs direct, same run, same machine.
# Called by `make bench` after a release build; writes Benchmarks/out/results.json and prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
# Raise the soft limit as far as the hard limit allows (sandboxes may cap it without CAP_SYS_RESOURCE).
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 Benchmarks/bench.py "$@"
