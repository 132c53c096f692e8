# Sluice: `make demo` runs the main job, `make test` installs what is missing, builds and runs every test.
SHELL := /bin/bash
SWIFT ?= swift
# Debian packages the build, the tests, the demo and the benchmarks need.
DEB_PACKAGES := liburing-dev libbpf-dev libelf-dev libssl-dev libnghttp2-dev libyaml-dev pkgconf bpftool python3 curl iproute2 \
                procps
BENCH_PACKAGES := haproxy iperf3 wrk nginx-light iptables
# Static Swift runtime: the agent maps only the runtime code it uses (idle RSS ~25 MB instead of ~32 MB).
RELEASE_FLAGS := -c release --static-swift-stdlib

.PHONY: all deps bpf bench-deps build build-release test test-unit test-integration demo bench bench-config bench-bpf clean

all: build

# Installs only what is missing, so a machine that has everything does no network work.
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

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

# All tiers: pure unit tests, loopback integration tests (in-process and the sluice binary).
test: deps bpf
	$(SWIFT) build
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build --disable-swift-testing

demo: build
	@bash examples/demo.sh

bench: bench-deps bpf build-release
	@bash Benchmarks/bench.sh

# Only the kernel-path figures (root): kernel-balanced throughput and connect() latency added by the programs.
bench-bpf: bench-deps bpf build-release
	@python3 Benchmarks/bench.py --kernel-path

# Only the control-plane figures (decode, compile, incremental): no peers needed, ~1 minute.
bench-config: deps build-release
	@python3 Benchmarks/bench.py --control-plane

clean:
	rm -rf .build
