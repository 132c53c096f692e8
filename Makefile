# Sluice: `make demo` runs the main job, `make test` installs what is missing, builds and runs every test.
SHELL := /bin/bash
SWIFT ?= swift
# Debian packages the build, the tests, the demo and the benchmarks need.
DEB_PACKAGES := liburing-dev libbpf-dev libelf-dev libssl-dev libnghttp2-dev libyaml-dev libsqlite3-dev pkgconf bpftool python3 curl iproute2 \
                procps nghttp2-client python3-pip tcpdump
# PyPI packages the tests use (real gRPC clients and servers, the Kubernetes client, schemathesis for the config API).
PY_PACKAGES := grpcio kubernetes schemathesis
BENCH_PACKAGES := haproxy iperf3 wrk nginx-light iptables nghttp2-client linux-perf openssl
# Static Swift runtime: the agent maps only the runtime code it uses (idle RSS ~25 MB instead of ~32 MB).
RELEASE_FLAGS := -c release --static-swift-stdlib

.PHONY: all deps bpf bench-deps build build-release test test-unit test-integration demo bench bench-config bench-bpf bench-http bench-hbone bench-control fuzz clean proto

all: build

# Installs only what is missing, so a machine that has everything does no network work.
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v kubectl >/dev/null || { echo "installing: kubernetes-client (kubectl, for the config API tests)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null; }
	@test -x .build/kubectl-1.20/usr/bin/kubectl || { echo "unpacking: Debian's kubernetes-client 1.20 (the old-kubectl tests)"; \
	  mkdir -p .build/kubectl-1.20 && cd .build/kubectl-1.20 && \
	  { apt-get download kubernetes-client >/dev/null 2>&1 || { apt-get update -qq && apt-get download kubernetes-client >/dev/null; }; } && \
	  dpkg-deb -x kubernetes-client_*.deb . && rm -f kubernetes-client_*.deb; }
	@python3 -c "import grpc, kubernetes, schemathesis" 2>/dev/null || { echo "installing: $(PY_PACKAGES) (pip)"; \
	  python3 -m pip install -q $(PY_PACKAGES) 2>/dev/null || python3 -m pip install -q --break-system-packages $(PY_PACKAGES); }

bench-deps: deps
	@missing=$$(for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# BPF programs: one object per attach point, built with the toolchain's clang (it has the bpf target).
BPF_SRC := $(wildcard bpf/*.bpf.c)
BPF_OBJ := $(patsubst bpf/%.bpf.c,.build/bpf/%.bpf.o,$(BPF_SRC))
BPF_CFLAGS := -O2 -g -target bpf -Wall -Werror -I/usr/include/$(shell uname -m)-linux-gnu

.build/bpf/%.bpf.o: bpf/%.bpf.c $(wildcard bpf/lib/*.h)
	@mkdir -p .build/bpf
	clang $(BPF_CFLAGS) -c $< -o $@

bpf: deps $(BPF_OBJ)

build: deps bpf
	$(SWIFT) build

build-release: deps
	$(SWIFT) build $(RELEASE_FLAGS)

# The agent stream's Swift code from Sources/SluiceProtocol/Proto (run after editing a .proto; the output is
# committed, so builds never need the plugins, whose own build takes ~10 minutes).
PLUGINS := .build-plugins
proto:
	@command -v protoc >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null; }
	@mkdir -p $(PLUGINS) && printf '%s\n' '// swift-tools-version:6.1' 'import PackageDescription' \
	  'let package = Package(name: "plugins", dependencies: [' \
	  '  .package(url: "https://github.com/apple/swift-protobuf", exact: "1.39.0"),' \
	  '  .package(url: "https://github.com/grpc/grpc-swift-protobuf", exact: "2.4.1"),' '], targets: [])' \
	  > $(PLUGINS)/Package.swift
	cd $(PLUGINS) && $(SWIFT) build -c release --product protoc-gen-swift && $(SWIFT) build -c release --product protoc-gen-grpc-swift-2
	protoc --plugin=protoc-gen-swift=$(PLUGINS)/.build/release/protoc-gen-swift \
	  --plugin=protoc-gen-grpc-swift-2=$(PLUGINS)/.build/release/protoc-gen-grpc-swift-2 \
	  -I Sources/SluiceProtocol/Proto --swift_out=Sources/SluiceProtocol/Generated --swift_opt=Visibility=Public \
	  --grpc-swift-2_out=Sources/SluiceProtocol/Generated --grpc-swift-2_opt=Visibility=Public \
	  Sources/SluiceProtocol/Proto/*.proto

# All tiers: pure unit tests, loopback integration tests (in-process and the sluice binary), then a short fuzz run
# of the HTTP/1.1 wire layer from its corpus of smuggling shapes.
test: deps bpf
	$(SWIFT) build
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build --disable-swift-testing
	$(MAKE) fuzz FUZZ_SECONDS=20

# libFuzzer (+ AddressSanitizer) on the HTTP/1.1 parser and streaming reader; FUZZ_SECONDS sets the budget.
FUZZ_SECONDS ?= 120
.build/fuzz/http1: $(wildcard Sources/SluiceHTTP/HTTP1*.swift) Sources/SluiceHTTP/BodyDecoder.swift Fuzz/HTTP1Fuzz.swift
	@mkdir -p .build/fuzz && rm -f $@
	swiftc -sanitize=fuzzer,address -parse-as-library -O -module-name SluiceHTTPFuzz \
	  Sources/SluiceHTTP/HTTP1*.swift Sources/SluiceHTTP/BodyDecoder.swift Fuzz/HTTP1Fuzz.swift -o $@ 2>&1 \
	  | grep -v "Cannot export local symbol" || true
	@test -x $@ || { echo "the fuzz target $@ did not build (errors above)"; exit 1; }

# The HTTP/2 path: H2Session over libnghttp2, compiled against the C target's header through a module map.
H2_FUZZ_SOURCES = Sources/SluiceHTTP/H2Session.swift Sources/SluiceHTTP/StreamMap.swift Fuzz/H2Fuzz.swift
.build/fuzz/h2: $(H2_FUZZ_SOURCES) Sources/CSluiceLinux/include/CSluiceLinux.h
	@mkdir -p .build/fuzz/cmod && rm -f $@
	@printf 'module CSluiceLinux {\n  header "%s/Sources/CSluiceLinux/include/CSluiceLinux.h"\n  link "nghttp2"\n  export *\n}\n' \
	  "$(CURDIR)" > .build/fuzz/cmod/module.modulemap
	swiftc -sanitize=fuzzer,address -parse-as-library -O -module-name SluiceH2Fuzz -I .build/fuzz/cmod \
	  $(H2_FUZZ_SOURCES) -o $@ 2>&1 | grep -v "Cannot export local symbol" || true
	@test -x $@ || { echo "the fuzz target $@ did not build (errors above)"; exit 1; }

fuzz: .build/fuzz/http1 .build/fuzz/h2
	@for t in http1 h2; do \
	  rm -rf .build/fuzz/$$t-work && mkdir -p .build/fuzz/$$t-work; \
	  echo "fuzz $$t for $(FUZZ_SECONDS)s"; \
	  .build/fuzz/$$t -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -timeout=5 -rss_limit_mb=1024 -print_final_stats=1 \
	    .build/fuzz/$$t-work Fuzz/corpus/$$t 2>&1 | grep -E "^Done|ERROR|SUMMARY|stat::number_of_executed_units"; \
	  test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

demo: build
	@bash examples/demo.sh

# Only the HTTP/1.1 L7 comparison (wrk against sluice, haproxy, nginx, direct).
bench-http: bench-deps build-release
	@python3 Benchmarks/bench_http.py | python3 Benchmarks/bench_http.py --print

bench: bench-deps bpf build-release
	@bash Benchmarks/bench.sh
	@$(BENCH_HBONE)

# Only the HBONE figures (root): two node agents' mutual-TLS tunnels vs a haproxy pair doing TLS origination and
# termination vs direct, across network namespaces on one bridge (~4 minutes).
BENCH_HBONE = set -o pipefail; ulimit -n 1048576 2>/dev/null || ulimit -n "$$(ulimit -Hn)"; \
	python3 Benchmarks/bench_hbone.py | python3 Benchmarks/bench_hbone.py --print
bench-hbone: bench-deps bpf build-release
	@$(BENCH_HBONE)

# Only the kernel-path figures (root): kernel-balanced throughput and connect() latency added by the programs.
bench-bpf: bench-deps bpf build-release
	@python3 Benchmarks/bench.py --kernel-path

# Only the control-plane figures (decode, compile, incremental): no peers needed, ~1 minute.
bench-config: deps build-release
	@python3 Benchmarks/bench.py --control-plane

# The control plane at mesh scale (10,000 services, 100,000 endpoints, 500 simulated agents on real streams): push
# latency, reconnect storms, RSS, API reads and writes per second (wrk). ~10 minutes.
bench-control: bench-deps build-release
	@ulimit -n 65536 2>/dev/null || ulimit -n "$$(ulimit -Hn)"; mkdir -p Benchmarks/out; .build/release/ControlBench --sluice .build/release/sluice | tee Benchmarks/out/control.json

clean:
	rm -rf .build
