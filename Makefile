# The two commands: `make demo` and `make test`. Both bootstrap what they need (a Python venv in
# .venv with the pinned PostgreSQL 18 and ClickHouse wheels for local servers).
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: demo test lint fmt bootstrap build fuzz bench

bootstrap:
	bash tools/bootstrap.sh

build:
	$(CARGO) build -p outbox-relay

demo: bootstrap build
	$(CARGO) run -q -p relay-tests --bin demo

test: bootstrap build
	@command -v cargo-nextest >/dev/null || $(CARGO) install cargo-nextest --locked
	$(CARGO) nextest run --workspace --profile ci

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

fuzz:
	cd crates/pgoutput/fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run decode -- -max_total_time=60
