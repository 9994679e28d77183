#!/usr/bin/env bash
# End to end through the real binaries: `cargo lambda watch` serves the functions with the
# Cargo.toml router on a free local port, and curl walks the contract: two users, keys, a
# message sent, fetched, confirmed and gone, and the error answers on the way.
set -euo pipefail
cd "$(dirname "$0")/.."

export DATABASE_URL="$(bash scripts/database-url.sh messenger_e2e)"
port="${E2E_PORT:-$((9100 + RANDOM % 800))}"
base="http://127.0.0.1:$port"
work="$(mktemp -d)"
log="$work/watch.log"

cargo build -p functions --bins --quiet
./target/debug/migrate >/dev/null
# Per-address limits are raised: every run comes from 127.0.0.1 and the database outlives runs.
# The per-name lockout is exercised below with this run's own names.
JWT_SECRET="e2e-$(head -c 32 /dev/urandom | base64 | tr -d '\n/+=')" BCRYPT_COST=4 \
    METRICS_TOKEN=e2e-metrics-token REGISTER_MAX_PER_ADDRESS=1000000 \
    LOGIN_MAX_FAILURES_PER_ADDRESS=1000000 LOGIN_MAX_FAILURES=5 bash scripts/lambda-env.sh "$work/env"

.venv/bin/cargo-lambda lambda watch --invoke-address 127.0.0.1 --invoke-port "$port" \
    --disable-cors --ignore-changes --env-file "$work/env" >"$log" 2>&1 &
watch_pid=$!
trap 'kill $watch_pid 2>/dev/null; wait $watch_pid 2>/dev/null; rm -rf "$work"' EXIT

for _ in $(seq 1 120); do
    curl -sf "$base/health" >/dev/null 2>&1 && break
    kill -0 $watch_pid 2>/dev/null || { cat "$log"; echo "cargo lambda watch exited"; exit 1; }
    sleep 0.5
done

passed=0
failed=0
# call METHOD PATH EXPECTED_STATUS [BODY] [TOKEN] -> the response body in $body
call() {
    local method=$1 path=$2 expected=$3 data=${4:-} token=${5:-}
    local args=(-s -o "$work/body" -w '%{http_code}' -X "$method" "$base$path" -D "$work/headers")
    [ -n "$data" ] && args+=(-H 'content-type: application/json' --data-binary "$data")
    [ -n "$token" ] && args+=(-H "authorization: Bearer $token")
    local status
    status=$(curl "${args[@]}")
    body=$(cat "$work/body")
    if [ "$status" = "$expected" ]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "FAIL: $method $path: expected $expected, got $status: $body"
    fi
}
expect() { # DESCRIPTION TEST-COMMAND...
    local what=$1
    shift
    if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAIL: $what"; fi
}

run=$RANDOM$RANDOM
key_a=$(jq -Rs . < testdata/keys/ed25519.pem)
key_b=$(jq -Rs . < testdata/keys/p256.pem)
key_c=$(jq -Rs . < testdata/keys/rsa2048.pem)

call POST /register 201 "{\"name\":\"alice$run\",\"password\":\"alice-password\",\"public_key\":$key_a}"
alice=$(jq -r .id <<<"$body")
call POST /register 201 "{\"name\":\"bob$run\",\"password\":\"bob-password\",\"public_key\":$key_b}"
bob=$(jq -r .id <<<"$body")
call POST /register 409 "{\"name\":\"ALICE$run\",\"password\":\"alice-password\",\"public_key\":$key_a}"
call POST /register 422 "{\"name\":\"x\",\"password\":\"alice-password\",\"public_key\":$key_a}"
call POST /login 401 "{\"name\":\"alice$run\",\"password\":\"wrong-password\"}"
expect "invalid_credentials body" [ "$(jq -r .error <<<"$body")" = invalid_credentials ]
call POST /login 200 "{\"name\":\"alice$run\",\"password\":\"alice-password\"}"
alice_token=$(jq -r .access_token <<<"$body")
expect "token_type bearer" [ "$(jq -r .token_type <<<"$body")" = bearer ]
call POST /login 200 "{\"name\":\"BOB$run\",\"password\":\"bob-password\"}"
bob_token=$(jq -r .access_token <<<"$body")

call GET /me 401
expect "401 carries WWW-Authenticate" grep -qi '^www-authenticate: Bearer' "$work/headers"
call GET /me 200 "" "$alice_token"
expect "me is alice" [ "$(jq -r .id <<<"$body")" = "$alice" ]
call GET "/users?name=BOB$run" 200 "" "$alice_token"
expect "lookup finds bob" [ "$(jq -r .user_id <<<"$body")" = "$bob" ]
call GET "/users?name=nobody$run" 404 "" "$alice_token"
call GET "/public-key/$bob" 200 "" "$alice_token"
expect "bob's key" [ "$(jq .public_key <<<"$body")" = "$key_b" ]
call GET /public-key/not-a-uuid 400 "" "$alice_token"
call PUT /update-key 200 "{\"public_key\":$key_c}" "$bob_token"
call GET "/public-key/$bob" 200 "" "$alice_token"
expect "bob's new key" [ "$(jq .public_key <<<"$body")" = "$key_c" ]

ciphertext=$(printf 'sealed for bob %s' "$run" | base64)
call POST /messages 201 "{\"recipient_id\":\"$bob\",\"encrypted_data\":\"$ciphertext\"}" "$alice_token"
message=$(jq -r .id <<<"$body")
call POST /messages 404 "{\"recipient_id\":\"$(cat /proc/sys/kernel/random/uuid)\",\"encrypted_data\":\"$ciphertext\"}" "$alice_token"
call GET /messages 200 "" "$alice_token"
expect "alice sees none of bob's messages" [ "$(jq '.messages | length' <<<"$body")" = 0 ]
call GET "/messages?limit=10" 200 "" "$bob_token"
expect "bob gets the ciphertext" [ "$(jq -r '.messages[0].encrypted_data' <<<"$body")" = "$ciphertext" ]
call GET "/messages?limit=0" 422 "" "$bob_token"
call PUT "/messages/$message/delivered" 404 "" "$alice_token"
call PUT "/messages/$message/delivered" 204 "" "$bob_token"
call PUT "/messages/$message/delivered" 204 "" "$bob_token"
call GET /messages 200 "" "$bob_token"
expect "confirmed message is gone" [ "$(jq '.messages | length' <<<"$body")" = 0 ]

call GET /health 200
call GET /health/ready 200
expect "database ok" [ "$(jq -r .database <<<"$body")" = ok ]
call GET /metrics 401
call GET /metrics 200 "" e2e-metrics-token
expect "metrics exposition" grep -q '^messenger_users ' "$work/body"
call GET /no-such-path 404
expect "not_found body" [ "$(jq -r .error <<<"$body")" = not_found ]
call DELETE /messages 405
expect "method_not_allowed body" [ "$(jq -r .error <<<"$body")" = method_not_allowed ]
call GET / 404

# Five failures lock the name, even for the right password, with Retry-After.
for _ in 1 2 3 4 5; do
    call POST /login 401 "{\"name\":\"bob$run\",\"password\":\"wrong-password\"}"
done
call POST /login 429 "{\"name\":\"bob$run\",\"password\":\"bob-password\"}"
expect "429 carries Retry-After" grep -qi '^retry-after: [0-9]' "$work/headers"
call POST /login 200 "{\"name\":\"alice$run\",\"password\":\"alice-password\"}"

# The purge binary, invoked with the EventBridge schedule event the aws_lambda_events crate ships.
fixture=$(ls ~/.cargo/registry/src/*/aws_lambda_events-*/src/fixtures/example-eventbridge-schedule.json | head -n 1)
purge=$(.venv/bin/cargo-lambda lambda invoke --invoke-address 127.0.0.1 --invoke-port "$port" purge --data-file "$fixture")
expect "purge runs to completion: $purge" [ "$(jq -r .complete <<<"$purge")" = true ]

# The logs of the whole exchange hold no password, token or ciphertext.
for secret in alice-password bob-password "$alice_token" "$bob_token" "$ciphertext" e2e-metrics-token; do
    expect "logs do not contain a secret" bash -c '! grep -qF -- "$1" "$2"' _ "$secret" "$log"
done
expect "one JSON log line per request" grep -q '"message":"request".*"function":"send-message"' "$log"

echo "e2e: $passed passed, $failed failed"
[ "$failed" = 0 ] || { echo "--- cargo lambda watch log ---"; tail -50 "$log"; exit 1; }
