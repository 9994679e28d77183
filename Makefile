# Secure Messenger API. `make dev` runs it locally; `make test` runs every test and check.
SHELL := /bin/bash
.DEFAULT_GOAL := help
export CARGO_TERM_COLOR ?= never
PORT ?= 9000
VENV := .venv/bin
# The tools in .venv/bin (cargo-lambda, sam, zig) first on PATH: `sam build` runs cargo-lambda by
# name, and cargo-lambda finds zig on PATH.
WITH_VENV := PATH="$(CURDIR)/.venv/bin:$$PATH"

.PHONY: help dev test test-unit test-client test-client-e2e test-browser test-readme test-e2e fuzz-api lint check-infra migrate test-purge-backlog build build-x86 deploy tools venv fmt clean-local
.PHONY: routes routes-check api-docs
.PHONY: deploy-infra setup-roles rotate-jwt-secret rotate-metrics-token smoke

help:
	@echo "make dev                 run the API at http://127.0.0.1:$(PORT) (cargo lambda watch)"
	@echo "make test                formatting, clippy, unit + integration tests, end-to-end, infra checks"
	@echo "make audit               dependencies: RustSec advisories (offline snapshot), licences, bans, sources"
	@echo "make test-client         the messenger client: unit, RFC 9180 vector, cross-language (pyhpke)"
	@echo "make test-client-e2e     the client end to end against the API of make dev (PORT=$(PORT))"
	@echo "make test-browser        CORS in headless Chromium (installed when missing) against the API of make dev"
	@echo "make test-readme         the README's walk and client section, as written, against the API of make dev"
	@echo "make fuzz-api            schemathesis against the local API and openapi.yaml (FUZZ_EXAMPLES=100)"
	@echo "make routes              write the watch router (and a new function's binary and template resource) from functions/src/routes.rs"
	@echo "make api-docs            write docs/API.md (the API reference) from openapi.yaml"
	@echo "make migrate             apply migrations to the local (or \$$DATABASE_URL) database"
	@echo "make test-purge-backlog  the slow purge test: 1,000,000 expired rows"
	@echo "make bench | soak        release benchmark report | soak run (SOAK_S=120): churn, sizes, p99 over time"
	@echo "make build | deploy      release build for Lambda (arm64) | sam build && sam deploy"
	@echo "make deploy-infra        network + database stack (ALARM_TOPIC_ARN=arn:aws:sns:... the first time); deletion protection on once created"
	@echo "make setup-roles         create the two database roles (once, after the first deploy)"
	@echo "make rotate-jwt-secret   new JWT key into the functions (live tokens stop working)"
	@echo "make rotate-metrics-token  likewise for the /metrics bearer token"
	@echo "make smoke API=https://... the README walk-through against a stage (ORIGIN=, METRICS_TOKEN=)"

# venv: the Python-packaged tools (what `make dev`, `build` and `deploy` use); tools: those and the
# test tools.
venv:
	@bash scripts/ensure-venv.sh

tools: venv
	@command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
	@cargo deny --version 2>/dev/null | grep -qx 'cargo-deny 0.20.2' || cargo install cargo-deny --version 0.20.2 --locked

dev: venv
	@bash scripts/dev.sh

migrate:
	@DATABASE_URL="$$(bash scripts/database-url.sh)" cargo run --quiet --bin migrate

test: tools lint audit routes-check test-client test-unit test-e2e fuzz-api check-infra
	@echo "==> make test: all passed"

# functions/src/routes.rs is the one route table: `make routes` writes the watch router (and the
# binary and template.yaml resource of a new function); make test fails when anything differs.
routes: venv
	@$(VENV)/python scripts/routes.py
routes-check: venv
	@$(VENV)/python scripts/routes.py --check

# docs/API.md is generated from openapi.yaml; infra/tests/test_api_docs.py fails when it differs.
api-docs: venv
	@$(VENV)/python scripts/api_docs.py

# The supply chain (deny.toml, scripts/audit.sh): RustSec advisories from ../shared/advisory-db
# offline (skipped, with one line, when it is absent), licences, bans, sources and path dependencies.
.PHONY: audit
audit: tools
	@bash scripts/audit.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings

# Unit tests and the in-process function tests (one fresh database per test). nextest runs each
# test in its own process, which sqlx's per-test databases need.
test-unit:
	DATABASE_URL="$$(bash scripts/database-url.sh messenger_test)" cargo nextest run --workspace --exclude client --no-fail-fast

# The messenger client: unit tests, RFC 9180's vector, and the cross-language test against
# Python's pyhpke (in its own .venv-client-interop/). Its end-to-end test, scripts/client-e2e.sh,
# needs a running API: `make dev` in one terminal, `make test-client-e2e` in another.
test-client:
	@bash scripts/client-interop-venv.sh
	MESSENGER_INTEROP_REQUIRED=1 cargo nextest run -p client --no-fail-fast

test-client-e2e:
	@bash scripts/client-e2e.sh http://127.0.0.1:$(PORT)

# CORS in headless Chromium (scripts/browser-cors.sh; Debian's chromium-headless-shell, installed
# when missing) against the API of make dev, whose CORS_ALLOWED_ORIGINS allows the page's origin,
# http://localhost:3000. make test runs it inside test-e2e.
test-browser:
	@bash scripts/browser-cors.sh http://127.0.0.1:$(PORT)

# The README's walk and its client section run as written (scripts/readme-run.sh; make test
# runs it inside test-e2e). make dev keeps the deployed limits: 4 registrations a run.
test-readme:
	cargo build -p client --quiet
	@bash scripts/readme-run.sh http://127.0.0.1:$(PORT)

test-e2e: tools
	@bash scripts/e2e.sh

# Property-based fuzzing of the running API against openapi.yaml (schemathesis).
fuzz-api: tools
	@bash scripts/fuzz-api.sh

check-infra: tools
	@bash infra/check.sh

test-purge-backlog:
	DATABASE_URL="$$(bash scripts/database-url.sh messenger_test)" cargo nextest run -p functions \
		--run-ignored ignored-only --no-capture purge_clears_a_million_row_backlog

# Release build, then the benchmark (bench/): handler vs SQL cost, cold starts, sizes, memory,
# bcrypt, as aligned tables. Uses the local PostgreSQL's messenger_bench database, which it
# empties (BENCH_DATABASE_URL to point elsewhere; the name must contain "bench").
.PHONY: bench
bench:
	cargo build --release --bins
	DATABASE_URL="$${BENCH_DATABASE_URL:-$$(env -u DATABASE_URL bash scripts/database-url.sh messenger_bench)}" \
		cargo run --release --quiet -p bench

# The soak run (not part of `make test`): register/login/send/fetch/confirm from 8 in-process
# instances in the deployed configuration, TTL 30 s, the purge every 5 s, for SOAK_S seconds
# (default 120); per 20-second slice: throughput, p50/p99 per operation, size of `messages` and
# its indexes, dead tuples, autovacuum runs. On a cluster of its own (scripts/soak-database.sh)
# with autovacuum on; SOAK_DATABASE_URL to point elsewhere (the name must contain "soak").
.PHONY: soak
soak:
	cargo build --release -p bench
	DATABASE_URL="$$(bash scripts/soak-database.sh)" SOAK_S="$${SOAK_S:-120}" \
		cargo run --release --quiet -p bench -- soak

# Lambda packages: arm64 through zig (the ziglang wheel cargo-lambda pulls into .venv, found on
# PATH), or x86_64 with plain cargo.
build: venv
	$(WITH_VENV) $(VENV)/cargo-lambda lambda build --release --arm64 --output-format zip -p functions
build-x86: venv
	$(WITH_VENV) $(VENV)/cargo-lambda lambda build --release --compiler cargo --output-format zip -p functions

deploy: venv
	$(WITH_VENV) $(VENV)/sam build && $(WITH_VENV) $(VENV)/sam deploy

# The operator's path (infra/README.md). STACK / INFRA_STACK name the stacks (defaults
# secure-messenger / secure-messenger-infra); AWS credentials and region come from the AWS CLI.
deploy-infra:
	@bash scripts/deploy-infra.sh
setup-roles:
	@bash scripts/setup-roles.sh
rotate-jwt-secret:
	@bash scripts/rotate-secret.sh jwt
rotate-metrics-token:
	@bash scripts/rotate-secret.sh metrics

# The contract walk-through against a running API: a deployed stage, or `make dev`'s.
API ?= http://127.0.0.1:$(PORT)
smoke:
	@API="$(API)" bash scripts/smoke.sh

fmt:
	cargo fmt --all

# Stops .local's clusters as the owner of each data directory, and removes .local only once none runs.
clean-local:
	@bash scripts/clean-local.sh
