#!/usr/bin/env bash
# End to end through the real binaries: `cargo lambda watch` serves the functions with the
# Cargo.toml router on a free local port, up to 8 instances of each function at once (separate
# processes and pools, as Lambda scales out), every one at RUST_LOG=trace. curl walks the
# contract: two users, keys, a message sent (and retried), fetched, confirmed in a batch and
# gone, an account deleted, the error answers on the way; then races through the emulator
# (simultaneous wrong logins, concurrent senders against a cursor-only reader), the messenger
# client's own end-to-end run, and a search of the whole log for any secret.
set -euo pipefail
cd "$(dirname "$0")/.."

# Up to 8 instances of every function each hold a connection of their own, as on Lambda: once
# the run has called every function and raced a few, that is more than a server's default
# max_connections (100) allows ("too many clients": 503 from whichever instance connects last).
# So the run has a cluster of its own sized for it, unless DATABASE_URL names a database.
if [ -z "${DATABASE_URL:-}" ]; then
    functions=$(ls functions/src/bin/*.rs | wc -l)
    DATABASE_URL="$(CLUSTER_ONLY=1 CLUSTER_DIR="$PWD/.local/e2e-pg" CLUSTER_PORT="${E2E_PG_PORT:-54332}" \
        CLUSTER_OPTIONS="-c max_connections=$((8 * functions + 50))" bash scripts/database-url.sh messenger_e2e)"
fi
export DATABASE_URL
port="${E2E_PORT:-$((9100 + RANDOM % 800))}"
base="http://127.0.0.1:$port"
work="$(mktemp -d)"
log="$work/watch.log"
# The origin scripts/browser-cors.sh serves its page from, one the API allows besides https://app.example.
browser_origin="http://127.0.0.1:$((port + 1000))"

cargo build -p functions --bins --quiet
./target/debug/migrate >/dev/null
# Per-address limits are raised: every run comes from 127.0.0.1 and the database outlives runs.
# The per-name lockout is exercised below with this run's own names.
JWT_SECRET="e2e-$(head -c 32 /dev/urandom | base64 | tr -d '\n/+=')" BCRYPT_COST=4 \
    METRICS_TOKEN=e2e-metrics-token REGISTER_MAX_PER_ADDRESS=1000000 \
    LOGIN_MAX_FAILURES_PER_ADDRESS=1000000 LOGIN_MAX_FAILURES=5 SEND_MAX_PER_WINDOW=100000 \
    RUST_LOG=trace CORS_ALLOWED_ORIGINS="https://app.example,$browser_origin" bash scripts/lambda-env.sh "$work/env"

.venv/bin/cargo-lambda lambda watch --invoke-address 127.0.0.1 --invoke-port "$port" \
    --concurrency 8 --disable-cors --ignore-changes --env-file "$work/env" >"$log" 2>&1 &
watch_pid=$!
trap 'kill $watch_pid 2>/dev/null; wait $watch_pid 2>/dev/null; rm -rf "$work"' EXIT

for _ in $(seq 1 120); do
    curl -sf "$base/health" >/dev/null 2>&1 && break
    kill -0 $watch_pid 2>/dev/null || { cat "$log"; echo "cargo lambda watch exited"; exit 1; }
    sleep 0.5
done

passed=0
failed=0
# call METHOD PATH EXPECTED_STATUS [BODY] [TOKEN] [EXTRA CURL ARGS...] -> the body in $body
call() {
    local method=$1 path=$2 expected=$3 data=${4:-} token=${5:-}
    shift $(($# < 5 ? $# : 5))
    local args=(-s -o "$work/body" -w '%{http_code}' -X "$method" "$base$path" -D "$work/headers" "$@")
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

# A retried send stores one message and gets the first answer again; the key with another
# ciphertext is refused.
second=$(printf 'second for bob %s' "$run" | base64)
call POST /messages 201 "{\"recipient_id\":\"$bob\",\"encrypted_data\":\"$second\"}" "$alice_token" -H "idempotency-key: retry-$run"
first_answer=$body
call POST /messages 201 "{\"recipient_id\":\"$bob\",\"encrypted_data\":\"$second\"}" "$alice_token" -H "idempotency-key: retry-$run"
expect "the retry is a replay" grep -qi '^idempotent-replayed: true' "$work/headers"
expect "the replay is the first answer" [ "$body" = "$first_answer" ]
call POST /messages 422 "{\"recipient_id\":\"$bob\",\"encrypted_data\":\"$ciphertext\"}" "$alice_token" -H "idempotency-key: retry-$run"
expect "idempotency_key_reused body" [ "$(jq -r .error <<<"$body")" = idempotency_key_reused ]
call POST /messages 400 "{\"recipient_id\":\"$bob\",\"encrypted_data\":\"$second\"}" "$alice_token" -H "idempotency-key: not valid"
# Bob confirms what he has in one batch call.
call GET /messages 200 "" "$bob_token"
expect "one message despite the retry" [ "$(jq '.messages | length' <<<"$body")" = 1 ]
pending=$(jq -c '[.messages[].id]' <<<"$body")
unknown=$(cat /proc/sys/kernel/random/uuid)
call POST /messages/delivered 200 "{\"ids\":$(jq -c ". + [\"$unknown\"]" <<<"$pending")}" "$bob_token"
expect "batch confirm counts and reports" [ "$(jq -c . <<<"$body")" = "{\"confirmed\":1,\"not_found\":[\"$unknown\"]}" ]
call POST /messages/delivered 400 '{"ids":["nope"]}' "$bob_token"
call POST /messages/delivered 422 '{"ids":[]}' "$bob_token"
call GET /messages 200 "" "$bob_token"
expect "batch-confirmed message is gone" [ "$(jq '.messages | length' <<<"$body")" = 0 ]

# A third account is deleted with its password; its token dies and its name is free again.
call POST /register 201 "{\"name\":\"carol$run\",\"password\":\"carol-password\",\"public_key\":$key_a}"
call POST /login 200 "{\"name\":\"carol$run\",\"password\":\"carol-password\"}"
carol_token=$(jq -r .access_token <<<"$body")
call DELETE /me 401 '{"password":"wrong-password"}' "$carol_token"
expect "invalid_credentials carries WWW-Authenticate" grep -qi '^www-authenticate: Bearer' "$work/headers"
call DELETE /me 204 '{"password":"carol-password"}' "$carol_token"
call GET /me 401 "" "$carol_token"
call POST /register 201 "{\"name\":\"carol$run\",\"password\":\"carol-password\",\"public_key\":$key_a}"

# A browser preflight allows the contract's request headers; responses expose its headers.
call OPTIONS /messages 204 "" "" -H "origin: https://app.example" -H "access-control-request-method: POST"
expect "preflight allows Idempotency-Key" grep -qi '^access-control-allow-headers:.*idempotency-key' "$work/headers"
expect "responses expose Idempotent-Replayed" grep -qi '^access-control-expose-headers:.*idempotent-replayed' "$work/headers"

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

# Devices and prekeys through the real binaries. Dave's device 1 shows a link code; his laptop
# joins with it and his password, logs in as device 2; alice seals one envelope per device, to the
# fingerprints the directory gives. OpenSSL, an implementation of its own, signs the laptop's
# signing key and prekey over the contract's byte layout; alice claims the prekey once.
hex_bytes() { printf "$(sed 's/../\\x&/g' <<<"$1")"; }
raw_key() { openssl pkey -pubin -in "$1" -outform DER | tail -c 32; }
sign_file() { openssl pkeyutl -sign -inkey "$1" -rawin -in "$2" | base64 -w0; }
openssl genpkey -algorithm X25519 -out "$work/laptop.key" 2>/dev/null
openssl pkey -in "$work/laptop.key" -pubout -out "$work/laptop.pub"
openssl genpkey -algorithm ED25519 -out "$work/signing.key" 2>/dev/null
openssl pkey -in "$work/signing.key" -pubout -out "$work/signing.pub"
openssl genpkey -algorithm X25519 -out "$work/prekey.key" 2>/dev/null
openssl pkey -in "$work/prekey.key" -pubout -out "$work/prekey.pub"
key_x=$(jq -Rs . < testdata/keys/x25519.pem)
call POST /register 201 "{\"name\":\"dave$run\",\"password\":\"dave-password\",\"public_key\":$key_x}"
dave=$(jq -r .id <<<"$body")
call POST /login 200 "{\"name\":\"dave$run\",\"password\":\"dave-password\"}"
dave_token=$(jq -r .access_token <<<"$body")
call POST /devices/link-codes 201 "" "$dave_token"
code=$(jq -r .code <<<"$body")
expect "a 12-character Crockford code" grep -qE '^[0-9A-HJKMNP-TV-Z]{12}$' <<<"$code"
laptop="{\"name\":\"dave$run\",\"password\":\"dave-password\",\"label\":\"laptop\",\"public_key\":$(jq -Rs . < "$work/laptop.pub")"
call POST /devices 403 "$laptop,\"link_code\":\"0000-0000-0000\"}"
call POST /devices 201 "$laptop,\"link_code\":\"$(tr 'A-Z' 'a-z' <<<"${code:0:4}-${code:4:4}-${code:8}")\"}"
expect "the laptop is device 2" [ "$(jq -r .device_id <<<"$body")" = 2 ]
call POST /devices 403 "$laptop,\"link_code\":\"$code\"}"
call POST /login 200 "{\"name\":\"dave$run\",\"password\":\"dave-password\",\"device_id\":2}"
laptop_token=$(jq -r .access_token <<<"$body")
call GET /me/devices 200 "" "$laptop_token"
expect "the laptop is the current device" [ "$(jq -c '[.devices[] | select(.current) | .device_id]' <<<"$body")" = "[2]" ]
call GET "/users/$dave/devices" 200 "" "$alice_token"
envelopes=$(jq -c --arg data "$ciphertext" '[.devices[] | {device_id, key_fingerprint, encrypted_data: $data}]' <<<"$body")
call POST /messages/devices 409 "{\"recipient_id\":\"$dave\",\"envelopes\":$(jq -c '.[:1]' <<<"$envelopes")}" "$alice_token"
expect "devices_changed names the missing device" [ "$(jq -c .missing <<<"$body")" = "[2]" ]
call POST /messages/devices 201 "{\"recipient_id\":\"$dave\",\"envelopes\":$envelopes}" "$alice_token"
expect "one message per device" [ "$(jq '.messages | length' <<<"$body")" = 2 ]
call GET /messages 200 "" "$laptop_token"
expect "the laptop reads its own envelope" [ "$(jq -c '[.messages[] | .recipient_device_id]' <<<"$body")" = "[2]" ]

{ printf 'sm-bind\0'; hex_bytes "$(tr -d '-' <<<"$dave")"; hex_bytes 00000002; raw_key "$work/laptop.pub"; raw_key "$work/signing.pub"; } > "$work/bind"
call PUT /keys/signing-key 200 "{\"signing_key\":$(jq -Rs . < "$work/signing.pub"),\"binding_sig\":\"$(sign_file "$work/signing.key" "$work/bind")\"}" "$laptop_token"
{ printf 'sm-prekey\0'; hex_bytes "$(tr -d '-' <<<"$dave")"; hex_bytes 00000002; hex_bytes 00000007; raw_key "$work/prekey.pub"; } > "$work/prekey"
prekey="{\"key_id\":7,\"public_key\":\"$(raw_key "$work/prekey.pub" | base64 -w0)\",\"signature\":\"$(sign_file "$work/signing.key" "$work/prekey")\"}"
call POST /keys/prekeys 422 "{\"prekeys\":[$(jq -c '.key_id = 8' <<<"$prekey")]}" "$laptop_token"
expect "a signature over another key id is invalid_signature" [ "$(jq -r .error <<<"$body")" = invalid_signature ]
call POST /keys/prekeys 200 "{\"prekeys\":[$prekey]}" "$laptop_token"
expect "one prekey available" [ "$(jq -c . <<<"$body")" = '{"available":1,"lowest_key_id":7}' ]
call GET "/keys/$dave" 200 "" "$alice_token"
expect "the directory shows the laptop's signing key" [ "$(jq -r '.devices[1].signing_key' <<<"$body")" = "$(cat "$work/signing.pub")" ]
call POST /keys/claim 200 "{\"user_id\":\"$dave\",\"device_ids\":[2]}" "$alice_token"
expect "the claim hands out prekey 7" [ "$(jq -c '.devices[0].prekey | [.key_id, .last_resort]' <<<"$body")" = "[7,false]" ]
call POST /keys/claim 200 "{\"user_id\":\"$dave\",\"device_ids\":[2]}" "$alice_token"
expect "a one-time prekey is handed out once" [ "$(jq -c '.devices[0].prekey' <<<"$body")" = null ]
call GET /keys/prekeys/count 200 "" "$laptop_token"
expect "none left" [ "$(jq -r .available <<<"$body")" = 0 ]
call DELETE /devices/2 204 '{"password":"dave-password"}' "$dave_token"
call GET /messages 401 "" "$laptop_token"
call DELETE /devices/1 403 '{"password":"dave-password"}' "$dave_token"

# Races through the emulator, 8 instances per function. 12 wrong passwords at once for one name
# from one address: at most LOGIN_MAX_FAILURES (5) are checked, the rest are 429.
call POST /register 201 "{\"name\":\"racer$run\",\"password\":\"racer-password\",\"public_key\":$key_a}"
statuses=$(seq 1 12 | xargs -P 12 -I{} curl -s -o /dev/null -w '%{http_code}\n' "$base/login" \
    -H 'content-type: application/json' -d "{\"name\":\"racer$run\",\"password\":\"wrong-password\"}")
checked=$(grep -c '^401$' <<<"$statuses" || true)
expect "at most 5 of 12 simultaneous wrong passwords checked (got $checked)" [ "$checked" -le 5 ]
expect "the others are 429" [ "$(grep -c '^429$' <<<"$statuses")" = $((12 - checked)) ]

# 8 senders send 25 messages each, at once, while the recipient polls only with its last
# cursor: every message arrives, none twice.
call POST /register 201 "{\"name\":\"inbox$run\",\"password\":\"inbox-password\",\"public_key\":$key_a}"
inbox=$(jq -r .id <<<"$body")
call POST /login 200 "{\"name\":\"inbox$run\",\"password\":\"inbox-password\"}"
inbox_token=$(jq -r .access_token <<<"$body")
senders=()
for s in 1 2 3 4 5 6 7 8; do
    (
        for n in $(seq 1 25); do
            curl -s -o /dev/null "$base/messages" -H "authorization: Bearer $alice_token" \
                -H 'content-type: application/json' \
                -d "{\"recipient_id\":\"$inbox\",\"encrypted_data\":\"$(printf '%s:%s' "$s" "$n" | base64)\"}"
        done
    ) &
    senders+=($!)
done
cursor=""
: > "$work/received"
for _ in $(seq 1 600); do
    page=$(curl -s "$base/messages?limit=100${cursor:+&after=$cursor}" -H "authorization: Bearer $inbox_token")
    jq -r '.messages[].encrypted_data' <<<"$page" >> "$work/received"
    last=$(jq -r '.messages[-1].id // empty' <<<"$page")
    [ -n "$last" ] && cursor=$last
    [ "$(wc -l < "$work/received")" -ge 200 ] && break
    sleep 0.1
done
wait "${senders[@]}"
expect "all 200 messages through the cursor (got $(wc -l < "$work/received"))" [ "$(wc -l < "$work/received")" = 200 ]
expect "none twice" [ "$(sort "$work/received" | uniq | wc -l)" = 200 ]

# part NAME FAIL_LINES COMMAND...: scripts/NAME.sh's run, as one check; its output is kept, and
# shown: its last line on a pass, its last FAIL_LINES lines on a failure.
part() {
    local name=$1 lines=$2
    shift 2
    if "$@" >"$work/$name.log" 2>&1; then
        passed=$((passed + 1))
        tail -n 1 "$work/$name.log"
    else
        failed=$((failed + 1))
        echo "FAIL: scripts/$name.sh"
        tail -n "$lines" "$work/$name.log"
    fi
}

cargo build -p client --quiet
messenger="$PWD/target/debug/messenger"
# The README's walk and its client section, as written.
part readme-run 30 env MESSENGER="$messenger" bash scripts/readme-run.sh "$base"
# The messenger client's own end-to-end run, on this API and database, with this log.
part client-e2e 30 env MESSENGER="$messenger" LOG_FILE="$log" bash scripts/client-e2e.sh "$base"
# CORS in headless Chromium: a page on $browser_origin walks the API, one on another origin is
# refused. Chromium comes from Debian's packages; without it the script says so and passes.
part browser-cors 40 env ALLOWED_ORIGIN="$browser_origin" bash scripts/browser-cors.sh "$base"

# The purge binary, invoked with the EventBridge schedule event the aws_lambda_events crate ships.
fixture=$(ls ~/.cargo/registry/src/*/aws_lambda_events-*/src/fixtures/example-eventbridge-schedule.json | head -n 1)
purge=$(.venv/bin/cargo-lambda lambda invoke --invoke-address 127.0.0.1 --invoke-port "$port" purge --data-file "$fixture")
expect "purge runs to completion: $purge" [ "$(jq -r .complete <<<"$purge")" = true ]

# The logs of the whole exchange hold no password, token or ciphertext.
for secret in alice-password bob-password carol-password racer-password wrong-password readme-walk-password \
    dave-password "$code" "$dave_token" "$laptop_token" \
    "$alice_token" "$bob_token" "$carol_token" "$ciphertext" "$second" e2e-metrics-token; do
    expect "logs do not contain a secret" bash -c '! grep -qF -- "$1" "$2"' _ "$secret" "$log"
done
expect "the log is verbose (RUST_LOG=trace reached the functions)" grep -q '"level":"DEBUG"' "$log"
# `cargo run --bin NAME`, which starts each function, found the build above up to date (the
# workspace's default-members): a rebuild there made a newcomer's first request wait a minute.
expect "cargo lambda watch started every function without building: $(grep -m1 -E '^ *Compiling ' "$log" || true)" \
    bash -c '! grep -qE "^ *Compiling " "$1"' _ "$log"
expect "one JSON log line per request" grep -q '"message":"request".*"function":"send-message"' "$log"

echo "e2e: $passed passed, $failed failed"
[ "$failed" = 0 ] || { echo "--- cargo lambda watch log ---"; tail -50 "$log"; exit 1; }
