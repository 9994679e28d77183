#!/usr/bin/env bash
# Writes the functions' environment for `cargo lambda watch` to the file $1: every variable of
# API.md's configuration table (and our DB_* extensions) that is set here is passed through;
# the rest get local defaults, including a generated JWT secret kept in .local/.
#
# Every value reaches the functions byte for byte. `cargo lambda watch --env-file` reads the file
# with the env-file-reader crate: a value is one token, bare or in '...', `...` or "..." (where \"
# stands for "), and inside any quotes the two characters \n become a newline; nothing else is an
# escape. So a value is written in single quotes when it has no ', else in backticks when it has
# no `, else in double quotes with each " written \" (unless it ends with \, which would swallow the
# closing quote). A value that none of these can carry (one holding a backslash followed by n, or
# ending with \ and holding both ' and `) is left out of the file, with a note: the functions then
# inherit it from the environment of `cargo lambda watch`, which scripts/dev.sh runs in the
# environment this script was given.
# infra/tests/test_dev_env.py writes such values here and reads them back through cargo-lambda.
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
      MAX_PENDING_BYTES_PER_RECIPIENT METRICS_TOKEN RUST_LOG
      JWT_PREVIOUS_SECRET MAX_PENDING_FROM_ONE_SENDER MAX_DEVICES_PER_ACCOUNT LINK_CODE_TTL_SECONDS
      LINK_CODES_MAX_PER_WINDOW LINK_MAX_FAILURES LINK_WINDOW_SECONDS PREKEY_UPLOAD_MAX
      PREKEY_MAX_STORED PREKEY_CLAIMS_PER_WINDOW PREKEY_CLAIMS_PER_TARGET PREKEY_CLAIM_WINDOW_SECONDS)
# NAME VALUE -> the line NAME=<value quoted as above>; fails when no quoting carries the value.
env_file_line() {
    local name=$1 value=$2 quote='"' escaped='\"'
    [[ $value == *'\n'* ]] && return 1
    if [[ $value != *"'"* ]]; then
        printf "%s='%s'\n" "$name" "$value"
    elif [[ $value != *'`'* ]]; then
        printf '%s=`%s`\n' "$name" "$value"
    elif [[ $value != *'\' ]]; then
        printf '%s="%s"\n' "$name" "${value//"$quote"/"$escaped"}"
    else
        return 1
    fi
}
: > "$out"
chmod 600 "$out"
for var in "${vars[@]}"; do
    value="${!var:-${defaults[$var]:-}}"
    [ -n "$value" ] || continue
    if ! env_file_line "$var" "$value" >> "$out"; then
        echo "lambda-env: $var is not in $out (no quoting of the env file carries its value);" \
            "the functions inherit it from the environment of cargo lambda watch" >&2
    fi
done
