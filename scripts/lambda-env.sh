#!/usr/bin/env bash
# Writes the functions' environment for `cargo lambda watch` to the file $1: every variable of
# API.md's configuration table (and our DB_* extensions) that is set here is passed through;
# the rest get local defaults, including a generated JWT secret kept in .local/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="$1"
mkdir -p .local
if [ ! -s .local/dev-jwt-secret ]; then
    head -c 48 /dev/urandom | base64 | tr -d '\n/+=' > .local/dev-jwt-secret
fi
declare -A defaults=(
    [JWT_SECRET]="$(cat .local/dev-jwt-secret)"
    # Local default only: cost 10 keeps a debug-build login near 0.2 s (12 in AWS).
    [BCRYPT_COST]=10
    # A web client's usual local origin, so preflights can be tried locally (make smoke does).
    [CORS_ALLOWED_ORIGINS]=http://localhost:3000
    [RUST_LOG]=info
)
vars=(DATABASE_URL DB_HOST DB_PORT DB_NAME DB_USER DB_IAM_AUTH DB_SSL_MODE DB_SSL_ROOT_CERT
      DB_STATEMENT_CACHE_CAPACITY DB_MAX_CONNECTIONS DB_ACQUIRE_TIMEOUT_MS
      JWT_SECRET JWT_TTL_SECONDS JWT_ISSUER JWT_AUDIENCE BCRYPT_COST MESSAGE_TTL_SECONDS
      MAX_MESSAGE_BYTES CORS_ALLOWED_ORIGINS LOGIN_MAX_FAILURES LOGIN_MAX_FAILURES_PER_NAME
      LOGIN_MAX_FAILURES_PER_ADDRESS LOGIN_WINDOW_SECONDS REGISTER_MAX_PER_ADDRESS
      REGISTER_WINDOW_SECONDS SEND_MAX_PER_WINDOW SEND_WINDOW_SECONDS MAX_PENDING_PER_RECIPIENT
      MAX_PENDING_BYTES_PER_RECIPIENT METRICS_TOKEN RUST_LOG)
: > "$out"
chmod 600 "$out"
for var in "${vars[@]}"; do
    value="${!var:-${defaults[$var]:-}}"
    [ -n "$value" ] && printf '%s=%s\n' "$var" "$value" >> "$out"
done
