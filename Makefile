# flagmesh developer commands. Needs only the Rust toolchain (cargo, with
# rustfmt and clippy); everything else the tests need is fetched by cargo.

CARGO ?= cargo

.PHONY: all build test unit fmt fmt-check lint bench bench-engine clean

all: build

build:
	$(CARGO) build --workspace --all-targets

## test: formatting, lints and every test (unit, property, conformance kit)
test: fmt-check lint unit

unit:
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
