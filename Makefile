# The two commands: `make demo` and `make test`. Both bootstrap what they need (a Python venv in
# .venv with the pinned PostgreSQL 18 and ClickHouse wheels for local servers).
SHELL := /bin/bash
CARGO ?= cargo
# A nextest filter expression, e.g. TEST_FILTER='not test(/kill9/)'.
TEST_FILTER ?= all()
VENV_BIN := .venv/bin
# The Django publishing package (docs/publishing.md).
DJANGO_PKG := python/outbox-relay-django

.PHONY: demo test lint fmt bootstrap build fuzz bench bench-json deny

bootstrap:
	bash tools/bootstrap.sh

build:
	$(CARGO) build -p outbox-relay

demo: bootstrap build
	$(CARGO) run -q -p relay-tests --bin demo

test: bootstrap build
	@command -v cargo-nextest >/dev/null || $(CARGO) install cargo-nextest --locked
	$(CARGO) nextest run --workspace --profile ci -E '$(TEST_FILTER)'

lint: bootstrap
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(VENV_BIN)/actionlint .github/workflows/*.yml
	$(VENV_BIN)/hadolint deploy/Dockerfile
	$(VENV_BIN)/ruff check $(DJANGO_PKG)
	$(VENV_BIN)/ruff format --check $(DJANGO_PKG)
	cd $(DJANGO_PKG) && $(CURDIR)/$(VENV_BIN)/mypy --strict src
	@if command -v docker-compose >/dev/null; then docker-compose -f docker-compose.yml config -q && echo "docker-compose.yml: valid"; \
	 elif docker compose version >/dev/null 2>&1; then docker compose config -q && echo "docker-compose.yml: valid"; \
	 else echo "docker compose not installed: docker-compose.yml not validated"; fi

fmt:
	$(CARGO) fmt --all

fuzz:
	cd crates/pgoutput/fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run decode -- -max_total_time=60

# The benchmark (bench/README.md): release builds, local servers, bench/results.json.
bench: bootstrap
	$(CARGO) build --release -p outbox-relay
	$(CARGO) build --release -p relay-tests --bin bench
	target/release/bench

# event_context layouts in ClickHouse (docs/design.md): bench/json_layouts.json, ~5 minutes.
bench-json: bootstrap
	$(CARGO) build --release -p relay-tests --bin json-bench
	target/release/json-bench

# Licenses, bans and sources (advisories need the RustSec database from GitHub: CI runs them).
deny:
	$(CARGO) deny check licenses bans sources
