#!/usr/bin/env bash
# `make dev`: the API at http://127.0.0.1:${PORT:-9000} with the contract's paths, through
# `cargo lambda watch` and the router in Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
export DATABASE_URL="${DATABASE_URL:-$(bash scripts/database-url.sh messenger)}"
port="${PORT:-9000}"

echo "==> building every function (so the first request is fast)"
cargo build -p functions --bins --quiet
echo "==> applying migrations"
./target/debug/migrate
bash scripts/lambda-env.sh .local/dev.env
echo "==> serving on http://127.0.0.1:$port (Ctrl-C stops)"
# --disable-cors: our not-found function answers preflights, as it does behind API Gateway.
# CONCURRENCY: instances per function (separate processes and pools), as Lambda scales out.
exec .venv/bin/cargo-lambda lambda watch --invoke-address 127.0.0.1 --invoke-port "$port" \
    --concurrency "${CONCURRENCY:-1}" --disable-cors --env-file .local/dev.env
